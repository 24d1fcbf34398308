"""The cost of a ``compile`` check against an eager one, before and after a cost cut: Dynamo's cache
kept across runs (``modes.CACHE_ACROSS_RUNS``, the default) or the harness's operation-free frames
left untraced (``--before untraced``: ``modes.UNTRACED_HARNESS_FRAMES``).

    python -m benchmarks.compile_cost [--per-capability N] [--backend aot_eager|inductor] [--before cache|untraced]
    python -m benchmarks.compile_cost --backends aot_eager,inductor [--per-capability N] [--corpus-seed S]

For every capability, ``N`` scenarios of the fixed corpus are checked with each of the capability's
catalog rows three ways, interleaved scenario by scenario (the order rotating, so that drift and
warm caches favour none): eager; compiled as before (a sandbox child forked with the cut's flag
off: every run from an empty cache, or every frame traced); compiled as now. Every variant has its own sandbox per row,
as a search keeps one, warmed by one untimed check. A process's first compiled graph imports what
AOT autograd's partitioner needs (``torch._inductor.pattern_matcher``: 1.5-2.7 s, once per sandbox
child, not per check); the benchmark's parent imports it before forking, so the children inherit it
(``--cold-children``: they do not, and the warm-up check may not absorb it). The warm-up checks'
seconds are reported apart.
Every check pays for its reference (the cache is cleared before each), as a search's example does.
A "check" is what a search pays per example: the technique's run, the reference, the invariants and,
for a float32 mismatch, the float64 twin. Reported per variant: the median and the worst check, and
the median and the total over eager's; and how many verdicts before and after differ (the change
must not move any). One torch thread, as one worker.

With ``--backends A,B`` the variants are eager and the compiled check (as now) with each backend,
interleaved the same way; the verdicts compared are A's and B's (a backend that rounds otherwise
must not move a verdict either: float32 mismatches are confirmed on the float64 twin). Every catalog
row is checked, known-bad ones too, on the corpus drawn from ``--corpus-seed``. The ``compile`` mode
runs inductor with ``execution.modes.INDUCTOR_CONFIG`` (random numbers drawn as eager draws them,
kernels compiled in the run's own thread); ``--inductor-defaults`` drops them in this process before
the sandboxes fork, to measure what torch's defaults do to the verdicts.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
from dataclasses import dataclass

import torch

from isolation_suite import catalog, check
from isolation_suite.execution import modes
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.judging.judge import clear_reference_cache
from isolation_suite.techniques import in_mode

from ._common import corpus, table, timed, write

@dataclass(frozen=True)
class Variant:
    """One way to check a scenario: eager (no backend), or compiled with ``backend``, its harness
    frames traced or not, its Dynamo cache kept across runs or not."""

    name: str
    backend: str | None = None
    untraced: bool = True
    cached: bool = True


#: the cost cuts a before/after run can take away: ``--before`` -> the variant without it
CUTS = {"cache": {"cached": False}, "untraced": {"untraced": False}}


def before_after(backend: str, cut: str = "cache") -> tuple[Variant, ...]:
    return (Variant("eager"), Variant("compile before", backend, **CUTS[cut]), Variant("compile after", backend))


def backends(names: list[str]) -> tuple[Variant, ...]:
    return (Variant("eager"), *(Variant(f"compile {b}", b) for b in names))



def _rows() -> dict:
    out: dict = {}
    for name, technique in catalog().items():
        for capability in technique.capabilities:
            out.setdefault(capability, []).append(name)
    return out


def _check(variant: Variant, technique, scenario, sandbox: Sandbox):
    """One check of ``variant``: its sandbox's child is forked (first, or again after a retirement)
    with ``UNTRACED_HARNESS_FRAMES`` and ``CACHE_ACROSS_RUNS`` set for it, and keeps the values it was
    forked with."""
    saved = modes.UNTRACED_HARNESS_FRAMES, modes.CACHE_ACROSS_RUNS
    modes.UNTRACED_HARNESS_FRAMES, modes.CACHE_ACROSS_RUNS = variant.untraced, variant.cached
    try:
        return check(technique, scenario, sandbox=sandbox)
    finally:
        modes.UNTRACED_HARNESS_FRAMES, modes.CACHE_ACROSS_RUNS = saved


def _in_variant(variant: Variant, scenario):
    if variant.backend is None:
        return scenario
    compiled = in_mode(scenario, "compile")
    return dataclasses.replace(compiled, mode=dataclasses.replace(compiled.mode, backend=variant.backend))


def _outcome(verdict) -> str:
    return "held" if verdict.ok else f"violated: {verdict.first.invariant}"


def main(per_capability: int = 4, backend: str = "aot_eager", cold_children: bool = False,
         compared: list[str] | None = None, corpus_seed: int = 1234, inductor_defaults: bool = False,
         cut: str = "cache") -> dict:
    """``compared``: backends to check against each other (the variants are eager and one per backend);
    else compiled checks before and after the cost cut ``cut`` (``CUTS``), with ``backend``."""
    torch.set_num_threads(1)
    if inductor_defaults:  # what the compile mode did before it applied INDUCTOR_CONFIG
        modes.INDUCTOR_CONFIG = {}
    variants = backends(compared) if compared else before_after(backend, cut)
    names = [v.name for v in variants]
    if not cold_children:
        for module in ("torch._functorch.partitioners", "torch._inductor.pattern_matcher"):
            importlib.import_module(module)
    warm_up: dict[str, list[float]] = {v: [] for v in names}
    seconds: dict[str, list[float]] = {v: [] for v in names}
    moved: list[tuple[str, str, str]] = []  # (row, scenario, one -> other) where the compared verdicts differ
    checks: list[dict] = []  # every check: row, capability, scenario index, seconds per variant
    one, other = variants[-2], variants[-1]  # the two compiled variants whose verdicts must agree
    for capability, rows in sorted(_rows().items(), key=lambda kv: kv[0].value):
        scenarios = corpus(capability, per_capability, corpus_seed)
        for name in rows:
            technique = catalog()[name]
            sandboxes = {variant.name: Sandbox(technique) for variant in variants}
            try:
                for variant in variants:  # apart: a process's first check pays for imports and warm-up
                    clear_reference_cache()
                    warm_up[variant.name].append(timed(_check, variant, technique, _in_variant(variant, scenarios[0]),
                                                       sandboxes[variant.name])[1])
                for i, scenario in enumerate(scenarios):
                    verdicts = {}
                    turn = i % len(variants)
                    for variant in variants[turn:] + variants[:turn]:
                        clear_reference_cache()
                        verdicts[variant.name], spent = timed(_check, variant, technique,
                                                              _in_variant(variant, scenario), sandboxes[variant.name])
                        seconds[variant.name].append(spent)
                    checks.append({"row": name, "capability": capability.value, "scenario": i,
                                   **{v: seconds[v][-1] for v in names},
                                   **{f"verdict {v}": _outcome(verdicts[v]) for v in names}})
                    a, b = _outcome(verdicts[one.name]), _outcome(verdicts[other.name])
                    if a != b:
                        moved.append((name, repr(scenario.architecture)[:80], f"{a} -> {b}"))
            finally:
                for sandbox in sandboxes.values():
                    sandbox.close()
    eager = seconds["eager"]
    rows, data = [], {"backend": backend, "cut": None if compared else cut, "compared": [one.name, other.name], "inductor_defaults": inductor_defaults,
                      "per_capability": per_capability,
                      "corpus_seed": corpus_seed, "verdicts_moved": moved, "checks": checks,
                      "cold_children": cold_children}
    for variant in names:
        values = seconds[variant]
        data[variant] = {"checks": len(values), "median_s": statistics.median(values), "worst_s": max(values),
                         "total_s": sum(values),
                         "median_over_eager": statistics.median(values) / statistics.median(eager),
                         "total_over_eager": sum(values) / sum(eager),
                         "warm_up_median_s": statistics.median(warm_up[variant]),
                         "warm_up_worst_s": max(warm_up[variant])}
        rows.append([variant, len(values), f"{1000 * statistics.median(values):.0f}",
                     f"{1000 * max(values):.0f}", f"{data[variant]['median_over_eager']:.1f}x",
                     f"{data[variant]['total_over_eager']:.1f}x",
                     f"{1000 * statistics.median(warm_up[variant]):.0f} / {1000 * max(warm_up[variant]):.0f}"])
    print(table(rows, ["variant", "checks", "median ms/check", "worst ms/check", "median vs eager",
                       "total vs eager", "first check of a child: median / worst ms"]))
    slowest = sorted(checks, key=lambda c: -c[other.name])[:5]
    print(f"slowest checks ({other.name}):", ", ".join(f"{c['row']}#{c['scenario']} {c[other.name]:.2f}s"
                                                       for c in slowest))
    print(f"verdicts that differ, {one.name} / {other.name}: {len(moved)}")
    for row in moved:
        print("  ", *row)
    out = (("compile_backends_defaults" if inductor_defaults else "compile_backends") if compared else
           ("compile_cost" if backend == "aot_eager" else f"compile_cost_{backend}")
           + ("" if cut == "cache" else f"_{cut}"))
    print(f"-> {write(out if corpus_seed == 1234 else f'{out}_{corpus_seed}', data)}")
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-capability", type=int, default=4)
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--cold-children", action="store_true",
                        help="do not import the partitioner's modules in the parent before forking")
    parser.add_argument("--backends", help="compare these compile backends instead (a comma list, e.g. "
                                           "aot_eager,inductor): eager and one compiled variant each")
    parser.add_argument("--corpus-seed", type=int, default=1234, help="the corpus's Hypothesis seed")
    parser.add_argument("--inductor-defaults", action="store_true",
                        help="compile with torch's default inductor settings, not the compile mode's "
                             "INDUCTOR_CONFIG (what the mode did before it applied them)")
    parser.add_argument("--before", choices=sorted(CUTS), default="cache",
                        help="the cost cut the 'before' variant goes without (default: the cache kept across runs)")
    args = parser.parse_args()
    main(args.per_capability, args.backend, args.cold_children,
         [b.strip() for b in args.backends.split(",")] if args.backends else None, args.corpus_seed,
         args.inductor_defaults, args.before)
