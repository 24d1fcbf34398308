"""The cost of a ``compile`` check against an eager one, before and after the harness's operation-free
frames stopped being traced (``modes.UNTRACED_HARNESS_FRAMES``).

    python -m benchmarks.compile_cost [--per-capability N] [--backend aot_eager|inductor]

For every capability, ``N`` scenarios of the fixed corpus are checked with each of the capability's
catalog rows three ways, interleaved scenario by scenario (the order rotating, so that drift and
warm caches favour none): eager; compiled as before (every frame traced: a sandbox child forked with
``UNTRACED_HARNESS_FRAMES = False``); compiled as now. Every variant has its own sandbox per row,
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
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics

import torch

from isolation_suite import catalog, check
from isolation_suite.execution import modes
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.judging.judge import clear_reference_cache
from isolation_suite.techniques import in_mode

from ._common import corpus, table, timed, write

VARIANTS = ("eager", "compile before", "compile after")


def _rows() -> dict:
    out: dict = {}
    for name, technique in catalog().items():
        for capability in technique.capabilities:
            out.setdefault(capability, []).append(name)
    return out


def _check(variant: str, technique, scenario, sandbox: Sandbox):
    """One check of ``variant``: its sandbox's child is forked (first, or again after a retirement)
    with ``UNTRACED_HARNESS_FRAMES`` set for it, and keeps the value it was forked with."""
    saved = modes.UNTRACED_HARNESS_FRAMES
    modes.UNTRACED_HARNESS_FRAMES = variant != "compile before"
    try:
        return check(technique, scenario, sandbox=sandbox)
    finally:
        modes.UNTRACED_HARNESS_FRAMES = saved


def _in_variant(variant: str, scenario, backend: str):
    if variant == "eager":
        return scenario
    compiled = in_mode(scenario, "compile")
    return dataclasses.replace(compiled, mode=dataclasses.replace(compiled.mode, backend=backend))


def _outcome(verdict) -> str:
    return "held" if verdict.ok else f"violated: {verdict.first.invariant}"


def main(per_capability: int = 4, backend: str = "aot_eager", cold_children: bool = False) -> dict:
    torch.set_num_threads(1)
    if not cold_children:
        for module in ("torch._functorch.partitioners", "torch._inductor.pattern_matcher"):
            importlib.import_module(module)
    warm_up: dict[str, list[float]] = {v: [] for v in VARIANTS}
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    moved: list[tuple[str, str, str]] = []  # (row, scenario, before -> after) where a verdict differs
    checks: list[dict] = []  # every check: row, capability, scenario index, seconds per variant
    for capability, names in sorted(_rows().items(), key=lambda kv: kv[0].value):
        scenarios = corpus(capability, per_capability)
        for name in names:
            technique = catalog()[name]
            sandboxes = {variant: Sandbox(technique) for variant in VARIANTS}
            try:
                for variant in VARIANTS:  # apart: a process's first check pays for imports and warm-up
                    clear_reference_cache()
                    warm_up[variant].append(timed(_check, variant, technique,
                                                  _in_variant(variant, scenarios[0], backend), sandboxes[variant])[1])
                for i, scenario in enumerate(scenarios):
                    verdicts = {}
                    for variant in VARIANTS[i % 3:] + VARIANTS[:i % 3]:
                        clear_reference_cache()
                        verdicts[variant], spent = timed(_check, variant, technique,
                                                         _in_variant(variant, scenario, backend), sandboxes[variant])
                        seconds[variant].append(spent)
                    checks.append({"row": name, "capability": capability.value, "scenario": i,
                                   **{v: seconds[v][-1] for v in VARIANTS}})
                    before, after = _outcome(verdicts["compile before"]), _outcome(verdicts["compile after"])
                    if before != after:
                        moved.append((name, repr(scenario.architecture)[:80], f"{before} -> {after}"))
            finally:
                for sandbox in sandboxes.values():
                    sandbox.close()
    eager = seconds["eager"]
    rows, data = [], {"backend": backend, "per_capability": per_capability, "verdicts_moved": moved,
                      "checks": checks, "cold_children": cold_children}
    for variant in VARIANTS:
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
    slowest = sorted(checks, key=lambda c: -c["compile after"])[:5]
    print("slowest compiled checks (after):", ", ".join(f"{c['row']}#{c['scenario']} {c['compile after']:.2f}s"
                                                        for c in slowest))
    print(f"verdicts that differ before/after: {len(moved)}")
    for row in moved:
        print("  ", *row)
    print(f"-> {write('compile_cost' if backend == 'aot_eager' else f'compile_cost_{backend}', data)}")
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-capability", type=int, default=4)
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--cold-children", action="store_true",
                        help="do not import the partitioner's modules in the parent before forking")
    args = parser.parse_args()
    main(args.per_capability, args.backend, args.cold_children)
