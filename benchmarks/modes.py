"""The cost of a check in each execution mode, relative to eager, on one fixed corpus.

    python -m benchmarks.modes [--per-capability N] [--modes eager,ddp,fsdp]

For every capability, ``N`` scenarios of the fixed corpus are moved into each mode (the way the
search moves its trigger examples: ``techniques.in_mode``) and checked with the capability's sound
catalog rows, each row in each mode in its own sandbox, as a search keeps one per item (an item is one
technique in one mode: a ddp search's pool of ranks then serves all its runs, where runs of other modes
in the same child would make it fork rank 1 again; ``--one-sandbox-per-row``: one child serves a row's
checks in every mode, as before). A check runs the technique and the
reference (the reference's trace is cached across modes that it does not share: eager serves
checkpoint and compile), so "per check" is what a search pays per example. Reported per mode: the
median and the worst check, the ratio of the mode's total to eager's by the clock and in CPU time
(this process's and the sandbox child's: an eager check's child runs while this process computes the
reference, which the clock sees and the CPU time does not), and the median and worst ratio of a
check to the same scenario's eager check (compile and ddp are expected to cost a lot: the figures
are reported, not hidden). Only the corpus scenarios every
compared mode can judge are timed (``techniques.movable``: a mode of several ranks takes no training
BatchNorm, ``fsdp`` no Rprop), so each mode's total is over the same checks. One torch thread, as one
worker.
"""
from __future__ import annotations

import argparse
import statistics
import time

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


def main(per_capability: int = 8, modes: list[str] | None = None, one_sandbox_per_row: bool = False) -> dict:
    torch.set_num_threads(1)
    modes = modes or [m.kind for m in MODE_INFOS]
    if "eager" not in modes:
        modes = ["eager"] + modes
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    cpu_seconds: dict[str, list[float]] = {m: [] for m in modes}  # this process's and the child's
    failures: dict[str, int] = {m: 0 for m in modes}
    for capability, names in sorted(_sound_rows().items(), key=lambda kv: kv[0].value):
        scenarios = [s for s in corpus(capability, per_capability) if all(movable(s, m) for m in modes)]
        if not scenarios:
            continue
        for name in names:
            technique = catalog()[name]
            shared = Sandbox(technique) if one_sandbox_per_row else None
            boxes = {mode: shared or Sandbox(technique) for mode in modes}
            try:
                for mode in modes:  # untimed: the first check in a process pays for imports and warm-up
                    check(technique, movable(scenarios[0], mode), sandbox=boxes[mode])
                for mode in modes:
                    clear_reference_cache()
                    sandbox = boxes[mode]
                    for scenario in scenarios:
                        moved = movable(scenario, mode)
                        cpu = time.process_time() + sandbox.child_cpu
                        verdict, spent = timed(check, technique, moved, sandbox=sandbox)
                        seconds[mode].append(spent)
                        cpu_seconds[mode].append(time.process_time() + sandbox.child_cpu - cpu)
                        # a violation this row is known for in this mode is its verdict, not a false alarm
                        failures[mode] += not verdict.ok and verdict.first.invariant not in technique.expected_in(mode)
            finally:
                for box in set(boxes.values()):
                    box.close()
    eager_total, eager_cpu = sum(seconds["eager"]), sum(cpu_seconds["eager"])
    rows, data = [], {}
    for mode in modes:
        values, cpu = seconds[mode], cpu_seconds[mode]
        ratios = [a / b for a, b in zip(values, seconds["eager"])]  # per check, against the same scenario's
        data[mode] = {"checks": len(values), "median_s": statistics.median(values), "worst_s": max(values),
                      "total_s": sum(values), "relative_to_eager": sum(values) / eager_total,
                      "cpu_total_s": sum(cpu), "cpu_relative_to_eager": sum(cpu) / eager_cpu,
                      "median_check_ratio": statistics.median(ratios), "worst_check_ratio": max(ratios),
                      "unexpected_violations": failures[mode]}
        rows.append([mode, len(values), f"{1000 * statistics.median(values):.0f}", f"{1000 * max(values):.0f}",
                     f"{sum(values) / eager_total:.2f}x", f"{sum(cpu) / eager_cpu:.2f}x",
                     f"{statistics.median(ratios):.1f}x", f"{max(ratios):.1f}x", failures[mode]])
    print(table(rows, ["mode", "checks", "median ms/check", "worst ms/check", "total vs eager (wall)",
                       "total vs eager (cpu)", "median check vs eager", "worst check vs eager",
                       "unexpected violations"]))
    print(f"-> {write('modes', data)}")
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-capability", type=int, default=8)
    parser.add_argument("--modes", default=None, help="a comma list (default: every mode); eager is always timed")
    parser.add_argument("--one-sandbox-per-row", action="store_true",
                        help="one sandbox child serves a row's checks in every mode (not one per mode, as a search)")
    args = parser.parse_args()
    main(args.per_capability, args.modes.split(",") if args.modes else None, args.one_sandbox_per_row)
