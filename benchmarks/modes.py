"""The cost of a check in each execution mode, relative to eager, on one fixed corpus.

    python -m benchmarks.modes [--per-capability N] [--modes eager,ddp,fsdp]

For every capability, ``N`` scenarios of the fixed corpus are moved into each mode (the way the
search moves its trigger examples: ``techniques.in_mode``) and checked with the capability's sound
catalog rows, each in its own sandbox as a search keeps it. A check runs the technique and the
reference (the reference's trace is cached across modes that it does not share: eager serves
checkpoint and compile), so "per check" is what a search pays per example. Reported per mode: the
median and the worst check, and the ratio of the mode's total to eager's (compile and ddp are
expected to cost a lot: the figures are reported, not hidden). Only the corpus scenarios every
compared mode can judge are timed (``techniques.movable``: a mode of several ranks takes no training
BatchNorm, ``fsdp`` no Rprop), so each mode's total is over the same checks. One torch thread, as one
worker.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from isolation_suite import catalog, check
from isolation_suite.judging.judge import clear_reference_cache
from isolation_suite.execution.modes import MODE_INFOS
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.techniques import movable

from ._common import corpus, table, timed, write


def _sound_rows() -> dict:
    out: dict = {}
    for name, technique in catalog().items():
        if technique.sound:
            for capability in technique.capabilities:
                out.setdefault(capability, []).append(name)
    return out


def main(per_capability: int = 8, modes: list[str] | None = None) -> dict:
    torch.set_num_threads(1)
    modes = modes or [m.kind for m in MODE_INFOS]
    if "eager" not in modes:
        modes = ["eager"] + modes
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    failures: dict[str, int] = {m: 0 for m in modes}
    for capability, names in sorted(_sound_rows().items(), key=lambda kv: kv[0].value):
        scenarios = [s for s in corpus(capability, per_capability) if all(movable(s, m) for m in modes)]
        if not scenarios:
            continue
        for name in names:
            technique = catalog()[name]
            with Sandbox(technique) as sandbox:
                for mode in modes:  # untimed: the first check in a process pays for imports and warm-up
                    check(technique, movable(scenarios[0], mode), sandbox=sandbox)
                for mode in modes:
                    clear_reference_cache()
                    for scenario in scenarios:
                        moved = movable(scenario, mode)
                        verdict, spent = timed(check, technique, moved, sandbox=sandbox)
                        seconds[mode].append(spent)
                        # a violation this row is known for in this mode is its verdict, not a false alarm
                        failures[mode] += not verdict.ok and verdict.first.invariant not in technique.expected_in(mode)
    eager_total = sum(seconds["eager"])
    rows, data = [], {}
    for mode in modes:
        values = seconds[mode]
        data[mode] = {"checks": len(values), "median_s": statistics.median(values), "worst_s": max(values),
                      "total_s": sum(values), "relative_to_eager": sum(values) / eager_total,
                      "unexpected_violations": failures[mode]}
        rows.append([mode, len(values), f"{1000 * statistics.median(values):.0f}", f"{1000 * max(values):.0f}",
                     f"{sum(values) / eager_total:.2f}x", failures[mode]])
    print(table(rows, ["mode", "checks", "median ms/check", "worst ms/check", "total vs eager",
                       "unexpected violations"]))
    print(f"-> {write('modes', data)}")
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-capability", type=int, default=8)
    parser.add_argument("--modes", default=None, help="a comma list (default: every mode); eager is always timed")
    args = parser.parse_args()
    main(args.per_capability, args.modes.split(",") if args.modes else None)
