"""Where a sweep's time goes, per check (technique x scenario), sandboxed and in-process.

    python -m benchmarks.sweep_profile

The corpus and the judging order are those of ``benchmarks.throughput``'s sweep (each scenario's
reference computed once, then every technique of the capability judged on it). Each check's time
is split into: its share of the reference; the technique's training run (sandboxed: the loop in
the child, and the round trip around it: sending the scenario, the child's state checks and trace
conversion, the trace back); the invariants; the float64 twin confirmations (the twin's runs and
comparison, for a float32 mismatch); and the rest of ``judge``. The floor's two bare loops are
timed interleaved with them, scenario by scenario.
"""
from __future__ import annotations

import collections
import os
import time

import torch

from isolation_suite import catalog
from isolation_suite.judging import judge as judge_mod
from isolation_suite.judging.judge import SharedReference, clear_reference_cache, judge
from isolation_suite.execution.sandbox import SANDBOX_ENV, Sandbox

from ._common import bare_pair, corpus, table, write
from .throughput import _by_capability

PARTS = ("reference share", "technique run", "round trip", "invariants", "float64 twin", "rest of judge")


class Clock:
    """Seconds spent inside a few of ``judge``'s steps, wrapped for the duration of a profile."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.depth = 0  # inside a twin confirmation: its runs count as the twin's

    def wrap(self, owner, name: str, part: str):
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            twin = name == "_confirmed"
            self.depth += twin
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.depth -= twin
                if twin or not self.depth:
                    self.seconds[part] += time.perf_counter() - start
        setattr(owner, name, timed)
        return lambda: setattr(owner, name, real)


def profile(techniques, scenarios, sandboxed: bool) -> dict[str, float]:
    """ms per check for each of ``PARTS``, and the floor's."""
    previous = os.environ.get(SANDBOX_ENV)
    os.environ[SANDBOX_ENV] = "on" if sandboxed else "off"
    clock = Clock()
    sandboxes = [Sandbox(t) for t in techniques]
    undo = []
    floor = total = reference = 0.0
    try:
        for technique, sandbox in zip(techniques, sandboxes):  # start the children before the clock
            judge(technique, scenarios[0], sandbox=sandbox)
            sandbox.run = _timed_run(sandbox, clock, sandboxed)  # the technique's own runs, not the twin's
        undo = [clock.wrap(judge_mod, "evaluate", "invariants"), clock.wrap(judge_mod, "divergence", "invariants"),
                clock.wrap(judge_mod, "_confirmed", "float64 twin")]
        clear_reference_cache()
        for scenario in scenarios:
            for technique in techniques:
                start = time.perf_counter()
                bare_pair(technique, scenario)
                floor += time.perf_counter() - start
            start = time.perf_counter()
            shared = SharedReference(scenario)
            shared.trace
            reference += time.perf_counter() - start
            for technique, sandbox in zip(techniques, sandboxes):
                start = time.perf_counter()
                judge(technique, scenario, sandbox=sandbox, reference=shared)
                total += time.perf_counter() - start
    finally:
        for restore in undo:
            restore()
        for sandbox in sandboxes:
            sandbox.close()
        if previous is None:
            os.environ.pop(SANDBOX_ENV, None)
        else:
            os.environ[SANDBOX_ENV] = previous
    checks = len(techniques) * len(scenarios)
    parts = {"reference share": reference, **{p: clock.seconds[p] for p in PARTS[1:5]}}
    parts["rest of judge"] = total - sum(parts[p] for p in PARTS[1:5])
    out = {p: 1000 * parts[p] / checks for p in PARTS}
    out["check"] = 1000 * (total + reference) / checks
    out["floor"] = 1000 * floor / checks
    return out


def _timed_run(sandbox: Sandbox, clock: Clock, sandboxed: bool):
    """``sandbox.run``, timed: in the child's training loop, and the round trip around it (in-process
    runs have no round trip: their state checks count as the run)."""
    real = sandbox.run

    def run(*args):
        child, start = sandbox.child_seconds, time.perf_counter()
        try:
            return real(*args)
        finally:
            if not clock.depth:
                wall = time.perf_counter() - start
                inside = sandbox.child_seconds - child if sandboxed else wall
                clock.seconds["technique run"] += inside
                clock.seconds["round trip"] += wall - inside
    return run


def main() -> dict:
    torch.set_num_threads(1)
    data, rows = {}, []
    for capability, names in _by_capability().items():
        scenarios = corpus(capability, 60)
        techniques = [catalog()[name] for name in names]
        for mode, sandboxed in (("sandboxed", True), ("in-process", False)):
            ms = profile(techniques, scenarios, sandboxed)
            data[f"{capability.value} {mode}"] = ms
            rows.append([capability.value, mode, len(techniques), f"{ms['floor']:.2f}", f"{ms['check']:.2f}",
                         *(f"{ms[p]:.2f}" for p in PARTS), f"{ms['floor'] / ms['check']:.2f}x"])
    print(table(rows, ["capability", "mode", "techniques", "floor ms", "check ms", *PARTS, "over floor"]))
    print(f"-> {write('sweep_profile', data)}")
    return data


if __name__ == "__main__":
    main()
