"""Where a ``compile`` check's time goes, against torch's own floor: what one compiled graph costs.

    python -m benchmarks.compile_breakdown [--per-capability N] [--floor-shapes K]

The floor: a one-operation function (``x * 2``) compiled at ``K`` new shapes with each backend
(``eager``: Dynamo alone; ``aot_eager``: what the ``compile`` mode runs), a forward and a backward
each, after the process's first compiles. Whatever a compiled run traces, each new graph costs at
least this much; it is reported in milliseconds and in eager checks of the corpus.

The checks: ``N`` scenarios per capability of the fixed corpus, checked with every sound catalog row,
first eagerly and then compiled, in this process the way a sandbox child runs them
(``modes.own_compile_cache``: Dynamo's cache kept across runs; the child's code path is the same),
after one untimed compiled pass over another corpus so that no first-compile cost of the process is
counted. Reported: the median eager and compiled check, the compiled total over the eager one, how
many frames Dynamo was handed per check and how many graphs it compiled, and the share of the
compiled checks' time in each of torch's compile phases (``torch._dynamo.utils.compilation_time_metrics``:
tracing the bytecode, the restarts after a graph break, AOT autograd, guards), the rest being the runs
themselves. One torch thread, as one worker.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from isolation_suite import catalog, check
from isolation_suite.execution import modes
from isolation_suite.execution.sandbox import SANDBOX_ENV
from isolation_suite.techniques import movable

from ._common import corpus, env_restored, table, timed, write

#: torch's compile phases reported, in the order printed (a phase this torch does not time is left out)
PHASES = (
    ("_compile.compile_inner", "Dynamo, all of it"),
    ("compile_attempt_1", "  tracing again after a graph break"),
    ("bytecode_tracing", "  tracing the bytecode"),
    ("OutputGraph.call_user_compiler", "  the backend (AOT autograd)"),
    ("build_guards", "  building guards"),
)


def graph_floor(backend: str, shapes: int) -> float:
    """Seconds to compile ``x * 2`` at one new shape with ``backend``, forward and backward."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x * 2, backend=backend, dynamic=False)
    with torch._dynamo.config.patch(**modes.RECOMPILE_LIMITS), modes.unread_diagnostics():
        compiled(torch.ones(1, requires_grad=True)).sum().backward()  # the process's first compile
        start = time.perf_counter()
        for n in range(2, shapes + 2):
            compiled(torch.ones(n, requires_grad=True)).sum().backward()
        return (time.perf_counter() - start) / shapes


def _work(per_capability: int, corpus_seed: int, besides: list | None = None) -> list:
    """(technique, its capability's scenarios that a compiled run can judge) for every sound row,
    leaving out the scenarios of ``besides`` (both corpora start with the same simplest scenarios)."""
    seen = {s for _, scenarios in besides or [] for s in scenarios}
    out = []
    for _, technique in sorted(catalog().items()):
        if technique.sound:
            for capability in sorted(technique.capabilities, key=lambda c: c.value):
                out.append((technique, [s for s in corpus(capability, per_capability, corpus_seed)
                                        if movable(s, "compile") and s not in seen]))
    return out


def _checks(work: list, mode: str) -> list[float]:
    return [timed(check, technique, movable(scenario, mode))[1]
            for technique, scenarios in work for scenario in scenarios]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-capability", type=int, default=4)
    parser.add_argument("--floor-shapes", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with env_restored(SANDBOX_ENV, "off"):  # this process plays the child: its counters are read here
        return _measure(args.per_capability, args.floor_shapes)


def _measure(per_capability: int, floor_shapes: int) -> dict:
    from torch._dynamo.utils import compilation_time_metrics, counters

    floors = {backend: graph_floor(backend, floor_shapes) for backend in ("eager", "aot_eager")}
    torch._dynamo.reset()
    modes.own_compile_cache()
    modes.compile_warm_up()
    work = _work(per_capability, corpus_seed=1234)
    _checks(_work(2, corpus_seed=99, besides=work), "compile")  # other scenarios: the process's first compiles
    _checks(work, "eager")  # the references, cached for both timed passes
    eager = _checks(work, "eager")
    counters.clear()
    compilation_time_metrics.clear()
    compiled = _checks(work, "compile")
    spent = {key: sum(compilation_time_metrics.get(key, ())) for key, _ in PHASES}
    n, total, eager_total = len(compiled), sum(compiled), sum(eager)
    eager_median = statistics.median(eager)
    data = {
        "checks": n, "eager_median_ms": 1000 * eager_median, "compile_median_ms": 1000 * statistics.median(compiled),
        "compile_over_eager": total / eager_total,
        "frames_per_check": counters["frames"]["total"] / n, "graphs_per_check": counters["stats"]["unique_graphs"] / n,
        "graph_breaks_per_check": sum(counters["graph_break"].values()) / n,
        "phase_share": {key: spent[key] / total for key, _ in PHASES if key in compilation_time_metrics},
        "floor_ms": {backend: 1000 * s for backend, s in floors.items()},
        "floor_in_eager_checks": {backend: s / eager_median for backend, s in floors.items()},
    }
    print(table([[backend, f"{1000 * s:.1f}", f"{s / eager_median:.1f}"] for backend, s in floors.items()],
                ["one new graph of x * 2, backend", "ms", "eager checks (median)"]))
    print()
    print(table([["eager", n, f"{1000 * eager_median:.1f}", f"{eager_total:.2f}", "1.00x", "-", "-"],
                 ["compile", n, f"{data['compile_median_ms']:.1f}", f"{total:.2f}",
                  f"{data['compile_over_eager']:.2f}x",
                  f"{data['frames_per_check']:.1f}", f"{data['graphs_per_check']:.2f}"]],
                ["mode", "checks", "median ms", "total s", "over eager", "frames/check", "graphs/check"]))
    print()
    print(table([[label, f"{spent[key]:.2f}", f"{spent[key] / total:.0%}"] for key, label in PHASES
                 if key in compilation_time_metrics],
                ["where the compiled checks' time went", "s", "share"]))
    print(f"-> {write('compile_breakdown', data)}")
    return data


if __name__ == "__main__":
    main()
