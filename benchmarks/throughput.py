"""Checks per second per worker on a fixed corpus; generation timed separately.

    python -m benchmarks.throughput

Each check runs the technique (in the sandbox's child process, one per technique as in a
search; ``ISOLATION_SANDBOX=off`` measures the in-process path) and the reference (one
training loop each), judges the invariants and, for a float32 ``matches-reference``
mismatch, re-runs both in float64.
The "floor" column is what a worker would do if the harness cost nothing: the two
bare training loops alone (``benchmarks._common.bare_pair``).
"""
from __future__ import annotations

import torch

from isolation_suite import catalog, check
from isolation_suite.judge import clear_reference_cache
from isolation_suite.sandbox import Sandbox

from ._common import bare_pair, corpus, table, timed, write


def main() -> dict:
    torch.set_num_threads(1)  # one worker = one thread, as under xdist
    rows, data = [], {}
    for capability_name, names in _by_capability().items():
        scenarios, gen_seconds = timed(corpus, capability_name, 60)
        for name in names:
            technique = catalog()[name]
            clear_reference_cache()
            # one sandbox (one child process) for the corpus, as a search keeps one for all its examples
            with Sandbox(technique) as sandbox:
                _, cold = timed(lambda: [check(technique, s, sandbox=sandbox) for s in scenarios])
                _, warm = timed(lambda: [check(technique, s, sandbox=sandbox) for s in scenarios])  # cached reference
            _, bare = timed(lambda: [bare_pair(technique, s) for s in scenarios])
            n = len(scenarios)
            data[name] = {"scenarios": n, "checks_per_s_cold": n / cold, "checks_per_s_cached_reference": n / warm,
                          "floor_checks_per_s": n / bare, "share_of_floor": bare / cold,
                          "generation_ms_per_scenario": 1000 * gen_seconds / n}
            rows.append([name, n, f"{n / cold:.1f}", f"{n / warm:.1f}", f"{n / bare:.1f}", f"{bare / cold:.0%}",
                         f"{1000 * gen_seconds / n:.1f}"])
    cold = [v["checks_per_s_cold"] for v in data.values()]
    total_checks = sum(v["scenarios"] for v in data.values())
    total_seconds = sum(v["scenarios"] / v["checks_per_s_cold"] for v in data.values())
    floor_seconds = sum(v["scenarios"] / v["floor_checks_per_s"] for v in data.values())
    data["_summary"] = {"min_checks_per_s_cold": min(cold), "mean_checks_per_s_cold": sum(cold) / len(cold),
                        "catalog_checks_per_s": total_checks / total_seconds,
                        "catalog_floor_checks_per_s": total_checks / floor_seconds, "target": 50}
    print(table(rows, ["technique", "scenarios", "checks/s", "checks/s (ref cached)", "floor checks/s",
                       "floor share", "gen ms/scenario"]))
    s = data["_summary"]
    print(f"\nwhole catalog {s['catalog_checks_per_s']:.1f} checks/s per worker (floor "
          f"{s['catalog_floor_checks_per_s']:.1f}); per row min {min(cold):.1f}, mean {sum(cold) / len(cold):.1f} "
          f"(target >= 50) -> {write('throughput', data)}")
    return data


def _by_capability():
    out: dict = {}
    for name, technique in catalog().items():
        (capability,) = technique.capabilities
        out.setdefault(capability, []).append(name)
    return out


if __name__ == "__main__":
    main()
