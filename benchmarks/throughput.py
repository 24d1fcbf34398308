"""Checks per second per worker on a fixed corpus; generation timed separately; the sweep beside it.

    python -m benchmarks.throughput

Each check runs the technique (in the sandbox's child process, one per technique as in a
search; ``ISOLATION_SANDBOX=off`` measures the in-process path) and the reference (one
training loop each), judges the invariants and, for a float32 ``matches-reference``
mismatch, re-runs both in float64.
The "floor" column is what a worker would do if the harness cost nothing: the two
bare training loops alone (``benchmarks._common.bare_pair``).

The sweep (``isolation_suite.engine.sweep``) judges every technique of a capability on each scenario
against one reference computed once: a check is one technique x scenario, and each row is charged
its own judging plus its share of the scenario's reference. It is measured in the same run, both
sandboxed (one child per technique) and in-process, interleaved scenario by scenario with the
floor's two bare loops (the "sweep: floor" column), so all three see the machine at the same speed.
"""
from __future__ import annotations

import os
import time

import torch

from isolation_suite import catalog, check
from isolation_suite.judging.judge import SharedReference, clear_reference_cache, judge
from isolation_suite.execution.sandbox import SANDBOX_ENV, Sandbox

from ._common import bare_pair, corpus, table, timed, write

TARGET = 1.5  # sweep checks/s per technique over the floor's


def main() -> dict:
    torch.set_num_threads(1)  # one worker = one thread, as under xdist
    rows, data, sweeps = [], {}, {}
    for capability, names in _by_capability().items():
        scenarios, gen_seconds = timed(corpus, capability, 60)
        techniques = [catalog()[name] for name in names]
        for technique in techniques:
            name = technique.name
            clear_reference_cache()
            # one sandbox (one child process) for the corpus, as a search keeps one for all its examples
            with Sandbox(technique) as sandbox:
                _, cold = timed(lambda: [check(technique, s, sandbox=sandbox) for s in scenarios])
                _, warm = timed(lambda: [check(technique, s, sandbox=sandbox) for s in scenarios])  # cached reference
            _, bare = timed(lambda: [bare_pair(technique, s) for s in scenarios])
            n = len(scenarios)
            data[name] = {"capability": capability.value, "scenarios": n, "checks_per_s_cold": n / cold,
                          "checks_per_s_cached_reference": n / warm, "floor_checks_per_s": n / bare,
                          "share_of_floor": bare / cold, "generation_ms_per_scenario": 1000 * gen_seconds / n}
        timings = _sweep(techniques, scenarios)
        checks = len(scenarios) * len(techniques)
        floor_seconds = sum(timings["floor"].values())
        for name, seconds in timings["floor"].items():
            data[name]["sweep_floor_checks_per_s"] = len(scenarios) / seconds
        for mode in ("sandboxed", "in-process"):
            for name, seconds in timings[mode].items():
                data[name][f"sweep_checks_per_s_{mode}"] = len(scenarios) / seconds
            sweeps.setdefault(mode, {})[capability.value] = {
                "techniques": len(techniques), "checks": checks,
                "checks_per_s": checks / sum(timings[mode].values()), "floor_checks_per_s": checks / floor_seconds,
                "over_floor": floor_seconds / sum(timings[mode].values()),
                # where a check's time goes, in ms: the floor's two bare loops, and the sweep's share of
                # the reference plus the technique's own judging (its run, the round trip, the invariants)
                "ms_per_check": {"floor": 1000 * floor_seconds / checks,
                                 "reference_share": 1000 * timings["reference"][mode] / checks,
                                 "judging": 1000 * (sum(timings[mode].values()) - timings["reference"][mode]) / checks}}
    for name, v in data.items():
        rows.append([name, v["capability"], v["scenarios"], f"{v['checks_per_s_cold']:.1f}",
                     f"{v['checks_per_s_cached_reference']:.1f}", f"{v['floor_checks_per_s']:.1f}",
                     f"{v['share_of_floor']:.0%}", f"{v['sweep_floor_checks_per_s']:.1f}",
                     f"{v['sweep_checks_per_s_sandboxed']:.1f}",
                     f"{v['sweep_checks_per_s_sandboxed'] / v['sweep_floor_checks_per_s']:.2f}x",
                     f"{v['sweep_checks_per_s_in-process']:.1f}",
                     f"{v['sweep_checks_per_s_in-process'] / v['sweep_floor_checks_per_s']:.2f}x",
                     f"{v['generation_ms_per_scenario']:.1f}"])
    cold = [v["checks_per_s_cold"] for v in data.values()]
    total_checks = sum(v["scenarios"] for v in data.values())
    total_seconds = sum(v["scenarios"] / v["checks_per_s_cold"] for v in data.values())
    floor_seconds = sum(v["scenarios"] / v["floor_checks_per_s"] for v in data.values())
    summary = {"min_checks_per_s_cold": min(cold), "mean_checks_per_s_cold": sum(cold) / len(cold),
               "catalog_checks_per_s": total_checks / total_seconds,
               "catalog_floor_checks_per_s": total_checks / floor_seconds, "target": 50,
               "sweep_target_over_floor": TARGET}
    for mode, groups in sweeps.items():
        seconds = sum(g["checks"] / g["checks_per_s"] for g in groups.values())
        rates = {name: v[f"sweep_checks_per_s_{mode}"] / v["sweep_floor_checks_per_s"] for name, v in data.items()}
        sweep_floor_seconds = sum(v["scenarios"] / v["sweep_floor_checks_per_s"] for v in data.values())
        worst_row = min(rates, key=rates.get)
        worst_group = min(groups, key=lambda c: groups[c]["over_floor"])
        summary[f"sweep_{mode}"] = {
            "catalog_checks_per_s": total_checks / seconds, "floor_checks_per_s": total_checks / sweep_floor_seconds,
            "over_floor": sweep_floor_seconds / seconds,
            "worst_group": worst_group, "worst_group_over_floor": groups[worst_group]["over_floor"],
            "worst_row": worst_row, "worst_row_over_floor": rates[worst_row], "groups": groups}
    data["_summary"] = summary
    print(table(rows, ["technique", "capability", "scenarios", "checks/s", "checks/s (ref cached)", "floor checks/s",
                       "floor share", "sweep: floor", "sandboxed", "/floor", "in-process", "/floor",
                       "gen ms/scenario"]))
    s = data["_summary"]
    print(f"\nper-technique search: whole catalog {s['catalog_checks_per_s']:.1f} checks/s per worker (floor "
          f"{s['catalog_floor_checks_per_s']:.1f}); per row min {min(cold):.1f}, mean {sum(cold) / len(cold):.1f} "
          f"(target >= 50)")
    for mode in ("sandboxed", "in-process"):
        w = s[f"sweep_{mode}"]
        groups = ", ".join(f"{c} {g['over_floor']:.2f}x ({g['techniques']} techniques; ms per check: floor "
                           f"{ms['floor']:.1f}, reference share {ms['reference_share']:.1f}, "
                           f"judging {ms['judging']:.1f})"
                           for c, g in w["groups"].items() for ms in (g["ms_per_check"],))
        print(f"sweep, {mode}: whole catalog {w['catalog_checks_per_s']:.1f} checks/s per worker = "
              f"{w['over_floor']:.2f}x the floor of {w['floor_checks_per_s']:.1f} (target >= {TARGET}x); "
              f"worst group {w['worst_group']} "
              f"{w['worst_group_over_floor']:.2f}x, worst row {w['worst_row']} {w['worst_row_over_floor']:.2f}x; "
              f"per group: {groups}")
    print(f"-> {write('throughput', data)}")
    return data


def _sweep(techniques, scenarios) -> dict[str, dict[str, float]]:
    """Seconds per technique for the corpus: ``floor`` (its two bare loops per scenario) and the sweep
    ``sandboxed`` and ``in-process`` (its own judging plus an equal share of each scenario's
    reference, computed once, as ``sweep.judge_shared`` does). The three are interleaved scenario by
    scenario, so a change in the machine's speed during the run hits them alike."""
    seconds = {mode: {t.name: 0.0 for t in techniques} for mode in ("floor", "sandboxed", "in-process")}
    seconds["reference"] = {"sandboxed": 0.0, "in-process": 0.0}  # what the shares add up to
    previous = os.environ.get(SANDBOX_ENV)
    children = [Sandbox(t) for t in techniques]  # one child per technique, as a sweep keeps
    own = [Sandbox(t) for t in techniques]  # the same without children (ISOLATION_SANDBOX=off while used)
    try:
        for technique, sandbox in zip(techniques, children):  # start the children before the clock
            judge(technique, scenarios[0], sandbox=sandbox)
        for scenario in scenarios:
            for technique in techniques:
                start = time.perf_counter()
                bare_pair(technique, scenario)
                seconds["floor"][technique.name] += time.perf_counter() - start
            for mode, sandboxes, env in (("sandboxed", children, "on"), ("in-process", own, "off")):
                os.environ[SANDBOX_ENV] = env
                clear_reference_cache()
                start = time.perf_counter()
                shared = SharedReference(scenario)
                shared.trace
                seconds["reference"][mode] += time.perf_counter() - start
                share = (time.perf_counter() - start) / len(techniques)
                for technique, sandbox in zip(techniques, sandboxes):
                    start = time.perf_counter()
                    judge(technique, scenario, sandbox=sandbox, reference=shared)
                    seconds[mode][technique.name] += time.perf_counter() - start + share
    finally:
        for sandbox in children + own:
            sandbox.close()
        if previous is None:
            os.environ.pop(SANDBOX_ENV, None)
        else:
            os.environ[SANDBOX_ENV] = previous
    return seconds


def _by_capability():
    out: dict = {}
    for name, technique in catalog().items():
        (capability,) = technique.capabilities
        out.setdefault(capability, []).append(name)
    return out


if __name__ == "__main__":
    main()
