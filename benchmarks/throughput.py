"""Checks per second per worker on a fixed corpus, against their floors, measured interleaved.

    python -m benchmarks.throughput [--size 60]

**Per-technique checks** (what a search does per example): each check runs the technique (in its
sandbox child, one per technique as in a search) and the reference (one training loop each), judges
the invariants and, for a float32 ``matches-reference`` mismatch, re-runs both in float64. The same
check in-process (``ISOLATION_SANDBOX=off``) and the *two-loop floor* (the two bare training loops a
check needs, ``benchmarks._common.bare_pair``, with no harness at all) are timed scenario by scenario
beside it, so all three see the machine at the same speed.

**The sweep** (``isolation_suite.engine.sweep``) judges every technique of a capability on each
scenario against one reference computed once, in batches (``sweep.judge_batch``): a check is one
technique x scenario. Its *physical floor* is each technique's own bare loop plus its share (1/k, for
k techniques) of one bare reference loop per scenario: nothing that runs every technique's code and
the reference can do less. Sandboxed and in-process are timed batch by batch beside the floor.

Wall-clock and CPU time are both reported: a sandboxed check's child runs while this process computes
the reference (or judges another technique's runs), so on a machine with a spare core the wall-clock
rate can exceed the single-threaded floor; the CPU time (this process's and its children's) is the
work done, and the two-loop and physical floors are single-threaded work too.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from isolation_suite import catalog, check
from isolation_suite.engine.sweep import MAX_BATCH, judge_batch
from isolation_suite.execution.reference import Reference
from isolation_suite.execution.runner import TechniqueDriver
from isolation_suite.execution.sandbox import SANDBOX_ENV, Sandbox
from isolation_suite.judging.judge import SharedReference, clear_reference_cache

from ._common import bare_loop, bare_pair, corpus, env_restored, median, table, timed, write

TARGET_SEARCH = 0.8  # per-technique checks, sandboxed: share of the two-loop floor
TARGET_SWEEP = 0.7  # the sweep, sandboxed: share of its physical floor, for every capability


class Clock:
    """Wall-clock and CPU seconds (this process's and the given sandboxes' children's) of ``with`` blocks."""

    def __init__(self, sandboxes=()):
        self.sandboxes, self.wall, self.cpu = list(sandboxes), 0.0, 0.0

    def now(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time() + sum(s.child_cpu for s in self.sandboxes)

    def __enter__(self):
        self._start = self.now()
        return self

    def __exit__(self, *exc):
        wall, cpu = self.now()
        self.wall, self.cpu = self.wall + wall - self._start[0], self.cpu + cpu - self._start[1]


def _sandbox_env(value: str) -> None:
    os.environ[SANDBOX_ENV] = value


def per_technique(technique, scenarios) -> dict:
    """One technique's checks on ``scenarios``, sandboxed and in-process, and the two-loop floor."""
    with env_restored(SANDBOX_ENV), Sandbox(technique) as box, Sandbox(technique) as own:
        _sandbox_env("on")
        check(technique, scenarios[0], sandbox=box)  # the child started before the clock
        sandboxed, in_process, floor = Clock([box]), Clock(), Clock()
        worst = 0.0
        for scenario in scenarios:
            _sandbox_env("on")
            clear_reference_cache()  # every check pays for its reference, as in a search
            before = sandboxed.wall
            with sandboxed:
                check(technique, scenario, sandbox=box)
            worst = max(worst, sandboxed.wall - before)
            _sandbox_env("off")
            clear_reference_cache()
            with in_process:
                check(technique, scenario, sandbox=own)
            with floor:
                bare_pair(technique, scenario)
    n = len(scenarios)
    return {"checks": n, "floor_cpu_s": floor.cpu, "floor_wall_s": floor.wall, "worst_check_ms": 1000 * worst,
            **{f"{name}_{kind}_s": getattr(clock, kind) for name, clock in
               (("sandboxed", sandboxed), ("in_process", in_process)) for kind in ("wall", "cpu")}}


def sweep_group(techniques, scenarios) -> dict:
    """The sweep over one capability's techniques, batch by batch: sandboxed, in-process, and the floors."""
    with env_restored(SANDBOX_ENV):
        return _sweep_group(techniques, scenarios)


def _sweep_group(techniques, scenarios) -> dict:
    k = len(techniques)
    children = [Sandbox(t) for t in techniques]  # one child per technique, as a sweep keeps
    own = [Sandbox(t) for t in techniques]  # the same without children (used while ISOLATION_SANDBOX=off)
    sandboxed, in_process, loops, reference_loops = Clock(children), Clock(), Clock(), Clock()
    try:
        _sandbox_env("on")
        judge_batch([(t, box, scenarios[:1]) for t, box in zip(techniques, children)])  # start the children
        for first in range(0, len(scenarios), MAX_BATCH):
            batch = scenarios[first:first + MAX_BATCH]
            for env, boxes, clock in (("on", children, sandboxed), ("off", own, in_process)):
                _sandbox_env(env)
                clear_reference_cache()
                with clock:
                    judge_batch([(t, box, batch) for t, box in zip(techniques, boxes)],
                                references={id(s): SharedReference(s) for s in batch})
            time_floor(techniques, batch, loops, reference_loops)
    finally:
        for box in children + own:
            box.close()
    checks = k * len(scenarios)
    physical = {kind: getattr(loops, kind) + getattr(reference_loops, kind) for kind in ("wall", "cpu")}
    two_loop = {kind: getattr(loops, kind) + k * getattr(reference_loops, kind) for kind in ("wall", "cpu")}
    return {"techniques": k, "checks": checks,
            **{f"physical_floor_{kind}_s": physical[kind] for kind in physical},
            **{f"two_loop_floor_{kind}_s": two_loop[kind] for kind in two_loop},
            **{f"{name}_{kind}_s": getattr(clock, kind) for name, clock in
               (("sandboxed", sandboxed), ("in_process", in_process)) for kind in ("wall", "cpu")}}


def time_floor(techniques, batch, loops: Clock, reference_loops: Clock) -> None:
    """The physical floor's parts for ``batch``: each technique's bare loop on each scenario (timed on
    ``loops``) and one bare reference loop per scenario (on ``reference_loops``)."""
    with loops:
        for technique in techniques:
            for scenario in batch:
                _bare_technique_loop(technique, scenario)
    with reference_loops:
        for scenario in batch:
            bare_loop(scenario, Reference())


def _bare_technique_loop(technique, scenario) -> None:
    try:
        bare_loop(scenario, TechniqueDriver(technique))
    except Exception:  # noqa: BLE001 - a known-bad technique may crash; the run stops there too
        pass


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=60, help="scenarios per capability")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one worker = one thread, as under xdist
    rows, group_rows, data, groups = [], [], {}, {}
    with env_restored(SANDBOX_ENV):
        for capability, names in _by_capability().items():
            scenarios, gen_seconds = timed(corpus, capability, args.size)
            techniques = [catalog()[name] for name in names]
            for technique in techniques:
                d = data[technique.name] = {"capability": capability.value, **per_technique(technique, scenarios),
                                            "generation_ms_per_scenario": 1000 * gen_seconds / len(scenarios)}
                rows.append([technique.name, capability.value, d["checks"],
                             f"{d['checks'] / d['floor_cpu_s']:.1f}",
                             f"{d['checks'] / d['sandboxed_wall_s']:.1f}", f"{d['floor_wall_s'] / d['sandboxed_wall_s']:.0%}",
                             f"{d['floor_cpu_s'] / d['sandboxed_cpu_s']:.0%}",
                             f"{d['checks'] / d['in_process_wall_s']:.1f}", f"{d['floor_cpu_s'] / d['in_process_cpu_s']:.0%}",
                             f"{d['worst_check_ms']:.0f}", f"{d['generation_ms_per_scenario']:.1f}"])
            g = groups[capability.value] = sweep_group(techniques, scenarios)
            group_rows.append([capability.value, g["techniques"], g["checks"],
                               f"{g['checks'] / g['physical_floor_cpu_s']:.1f}",
                               f"{g['checks'] / g['sandboxed_wall_s']:.1f}",
                               f"{g['physical_floor_wall_s'] / g['sandboxed_wall_s']:.0%}",
                               f"{g['physical_floor_cpu_s'] / g['sandboxed_cpu_s']:.0%}",
                               f"{g['checks'] / g['in_process_wall_s']:.1f}",
                               f"{g['physical_floor_cpu_s'] / g['in_process_cpu_s']:.0%}",
                               f"{g['two_loop_floor_cpu_s'] / g['sandboxed_cpu_s']:.2f}x"])
    summary = _summary(data, groups)
    data["_sweep"], data["_summary"] = groups, summary
    print(table(rows, ["technique", "capability", "checks", "floor checks/s", "sandboxed checks/s",
                       "of floor (wall)", "of floor (cpu)", "in-process checks/s", "of floor (cpu)",
                       "worst ms", "gen ms/scenario"]))
    print()
    print(table(group_rows, ["sweep: capability", "techniques", "checks", "physical floor checks/s",
                             "sandboxed checks/s", "of floor (wall)", "of floor (cpu)", "in-process checks/s",
                             "of floor (cpu)", "two-loop floor / sandboxed (cpu)"]))
    s = summary
    print(f"\nper-technique checks, whole catalog: sandboxed {s['search_sandboxed_wall']:.0%} of the two-loop floor "
          f"by the clock, {s['search_sandboxed_cpu']:.0%} by CPU time; in-process {s['search_in_process_cpu']:.0%} "
          f"(target >= {TARGET_SEARCH:.0%} sandboxed); worst row {s['worst_row']} {s['worst_row_share']:.0%} (wall); "
          f"rows within target: {s['rows_within']:.0%} (wall)")
    print(f"sweep: sandboxed, worst capability {s['sweep_worst_group']} {s['sweep_worst_wall']:.0%} of its physical "
          f"floor by the clock, {s['sweep_worst_cpu']:.0%} by CPU time; whole catalog {s['sweep_sandboxed_wall']:.0%} "
          f"(wall), {s['sweep_sandboxed_cpu']:.0%} (cpu); in-process {s['sweep_in_process_cpu']:.0%} "
          f"(target >= {TARGET_SWEEP:.0%} for every capability)")
    print(f"-> {write('throughput', data)}")
    return data


def _summary(data: dict, groups: dict) -> dict:
    rows = {name: d for name, d in data.items() if not name.startswith("_")}
    total = lambda key, of=rows: sum(d[key] for d in of.values())  # noqa: E731
    shares = {name: d["floor_wall_s"] / d["sandboxed_wall_s"] for name, d in rows.items()}
    worst_row = min(shares, key=shares.get)
    sweep_share = {c: g["physical_floor_wall_s"] / g["sandboxed_wall_s"] for c, g in groups.items()}
    worst_group = min(sweep_share, key=sweep_share.get)
    return {"search_sandboxed_wall": total("floor_wall_s") / total("sandboxed_wall_s"),
            "search_sandboxed_cpu": total("floor_cpu_s") / total("sandboxed_cpu_s"),
            "search_in_process_cpu": total("floor_cpu_s") / total("in_process_cpu_s"),
            "catalog_checks_per_s_sandboxed": total("checks") / total("sandboxed_wall_s"),
            "catalog_floor_checks_per_s": total("checks") / total("floor_cpu_s"),
            "worst_row": worst_row, "worst_row_share": shares[worst_row],
            "median_row_share": median(list(shares.values())),
            "rows_within": sum(v >= TARGET_SEARCH for v in shares.values()) / len(shares),
            "sweep_worst_group": worst_group, "sweep_worst_wall": sweep_share[worst_group],
            "sweep_worst_cpu": groups[worst_group]["physical_floor_cpu_s"] / groups[worst_group]["sandboxed_cpu_s"],
            "sweep_sandboxed_wall": total("physical_floor_wall_s", groups) / total("sandboxed_wall_s", groups),
            "sweep_sandboxed_cpu": total("physical_floor_cpu_s", groups) / total("sandboxed_cpu_s", groups),
            "sweep_in_process_cpu": total("physical_floor_cpu_s", groups) / total("in_process_cpu_s", groups),
            "targets": {"search": TARGET_SEARCH, "sweep": TARGET_SWEEP}}


def _by_capability():
    out: dict = {}
    for name, technique in catalog().items():
        (capability,) = technique.capabilities
        out.setdefault(capability, []).append(name)
    return out


if __name__ == "__main__":
    main()
