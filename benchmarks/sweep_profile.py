"""Where a sweep's time goes, per check (technique x scenario), sandboxed and in-process, in CPU time.

    python -m benchmarks.sweep_profile [--size 60] [--children-at-once N]

The corpus and the batches are those of ``benchmarks.throughput``'s sweep (``sweep.judge_batch``:
each technique's child is sent a batch of scenarios and runs them back to back while this process
computes their references and judges each run while the child runs the next). A check's CPU time is split
into, in this process: its share of the references, the invariants, the float64 twin confirmations
(the twin reference, the comparison) and the rest of judging (receiving and converting the trace, the
verdict); and in the technique's child (sandboxed; in-process these are this process's too): the
training loop, and the rest of the child's time (reading the request, its state checks around each
run, sending the trace). The wall-clock time per check and the physical floor (the technique's bare
loop and 1/k of the reference's) are timed batch by batch beside them. ``--children-at-once 1``
judges with one technique's child running at a time (``sweep.CHILDREN_AT_ONCE``; 3 by default).
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from isolation_suite import catalog
from isolation_suite.engine import sweep
from isolation_suite.engine.sweep import MAX_BATCH, judge_batch
from isolation_suite.execution import sandbox as sandbox_mod
from isolation_suite.execution.sandbox import SANDBOX_ENV, Sandbox
from isolation_suite.judging import judge as judge_mod
from isolation_suite.judging.judge import SharedReference, clear_reference_cache

from ._common import corpus, env_restored, table, write
from .throughput import Clock, _by_capability, time_floor

PARTS = ("reference share", "invariants", "float64 twin", "rest of judging", "technique loop", "child's rest")


class PartClock:
    """This process's CPU seconds inside a few functions, wrapped for the duration of a profile
    (a function called inside another wrapped one counts for the outer one only)."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.depth = 0

    def wrap(self, owner, name: str, part: str):
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            self.depth += 1
            start = time.process_time()
            try:
                return real(*args, **kwargs)
            finally:
                self.depth -= 1
                if not self.depth:
                    self.seconds[part] += time.process_time() - start
        setattr(owner, name, timed)
        return lambda: setattr(owner, name, real)


def profile(techniques, scenarios, sandboxed: bool) -> dict[str, float]:
    """CPU ms per check for each of ``PARTS``, the wall-clock ms per check and the physical floor's."""
    with env_restored(SANDBOX_ENV, "on" if sandboxed else "off"):
        return _profile(techniques, scenarios, sandboxed)


def _profile(techniques, scenarios, sandboxed: bool) -> dict[str, float]:
    clock = PartClock()
    boxes = [Sandbox(t) for t in techniques]
    undo, wall, cpu = [], 0.0, 0.0
    loops, reference_loops = Clock(), Clock()
    try:
        judge_batch([(t, box, scenarios[:1]) for t, box in zip(techniques, boxes)])  # start the children
        undo = [clock.wrap(judge_mod, "_reference", "reference share"),
                clock.wrap(judge_mod, "evaluate", "invariants"), clock.wrap(judge_mod, "divergence", "invariants"),
                clock.wrap(judge_mod, "_confirmed", "float64 twin")]
        if not sandboxed:  # the technique's loop runs here: timed as the child's is
            undo.append(clock.wrap(sandbox_mod, "run", "technique loop"))
        child_cpu = sum(box.child_cpu for box in boxes)
        child_loop = sum(box.child_seconds for box in boxes)
        for first in range(0, len(scenarios), MAX_BATCH):
            batch = scenarios[first:first + MAX_BATCH]
            clear_reference_cache()
            start, start_cpu = time.perf_counter(), time.process_time()
            judge_batch([(t, box, batch) for t, box in zip(techniques, boxes)],
                        references={id(s): SharedReference(s) for s in batch})
            wall += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            time_floor(techniques, batch, loops, reference_loops)
        child_cpu = sum(box.child_cpu for box in boxes) - child_cpu
        child_loop = sum(box.child_seconds for box in boxes) - child_loop
    finally:
        for restore in undo:
            restore()
        for box in boxes:
            box.close()
    checks = len(techniques) * len(scenarios)
    parts = {p: clock.seconds[p] for p in PARTS[:3]}
    if sandboxed:
        parts["technique loop"], parts["child's rest"] = child_loop, child_cpu - child_loop
        parts["rest of judging"] = cpu - sum(parts[p] for p in PARTS[:3])
    else:
        parts["technique loop"], parts["child's rest"] = clock.seconds["technique loop"], 0.0
        parts["rest of judging"] = cpu - sum(parts[p] for p in PARTS[:3]) - parts["technique loop"]
    out = {p: 1000 * parts[p] / checks for p in PARTS}
    out["cpu"] = 1000 * sum(parts.values()) / checks
    out["wall"] = 1000 * wall / checks
    out["floor"] = 1000 * (loops.cpu + reference_loops.cpu) / checks
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=60, help="scenarios per capability")
    parser.add_argument("--children-at-once", type=int, default=sweep.CHILDREN_AT_ONCE,
                        help="techniques' children running at once in a batch (sweep.CHILDREN_AT_ONCE)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sweep.CHILDREN_AT_ONCE = args.children_at_once
    data, rows = {}, []
    for capability, names in _by_capability().items():
        scenarios = corpus(capability, args.size)
        techniques = [catalog()[name] for name in names]
        for mode, sandboxed in (("sandboxed", True), ("in-process", False)):
            ms = profile(techniques, scenarios, sandboxed)
            data[f"{capability.value} {mode}"] = ms
            rows.append([capability.value, mode, len(techniques), f"{ms['floor']:.2f}", f"{ms['wall']:.2f}",
                         f"{ms['cpu']:.2f}", *(f"{ms[p]:.2f}" for p in PARTS),
                         f"{ms['floor'] / ms['wall']:.0%}", f"{ms['floor'] / ms['cpu']:.0%}"])
    print(table(rows, ["capability", "mode", "techniques", "floor ms", "wall ms", "cpu ms", *PARTS,
                       "of floor (wall)", "of floor (cpu)"]))
    print(f"-> {write('sweep_profile', data)}")
    return data


if __name__ == "__main__":
    main()
