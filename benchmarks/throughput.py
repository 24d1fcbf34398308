"""Checks per second per worker on a fixed corpus; generation timed separately.

    python -m benchmarks.throughput
"""
from __future__ import annotations

import torch

from isolation_suite import catalog, check
from isolation_suite.check import _REFERENCE_CACHE

from ._common import corpus, table, timed, write


def main() -> dict:
    torch.set_num_threads(1)  # one worker = one thread, as under xdist
    rows, data = [], {}
    for capability_name, names in _by_capability().items():
        scenarios, gen_seconds = timed(corpus, capability_name, 60)
        for name in names:
            technique = catalog()[name]
            _REFERENCE_CACHE.clear()
            _, cold = timed(lambda: [check(technique, s) for s in scenarios])
            _, warm = timed(lambda: [check(technique, s) for s in scenarios])  # reference traces cached
            data[name] = {"scenarios": len(scenarios), "checks_per_s_cold": len(scenarios) / cold,
                          "checks_per_s_cached_reference": len(scenarios) / warm,
                          "generation_ms_per_scenario": 1000 * gen_seconds / len(scenarios)}
            rows.append([name, len(scenarios), f"{len(scenarios) / cold:.1f}", f"{len(scenarios) / warm:.1f}",
                         f"{1000 * gen_seconds / len(scenarios):.1f}"])
    cold = [v["checks_per_s_cold"] for v in data.values()]
    data["_summary"] = {"min_checks_per_s_cold": min(cold), "mean_checks_per_s_cold": sum(cold) / len(cold)}
    print(table(rows, ["technique", "scenarios", "checks/s", "checks/s (ref cached)", "gen ms/scenario"]))
    print(f"\nmin {min(cold):.1f} checks/s, mean {sum(cold) / len(cold):.1f} checks/s per worker "
          f"-> {write('throughput', data)}")
    return data


def _by_capability():
    out: dict = {}
    for name, technique in catalog().items():
        (capability,) = technique.capabilities
        out.setdefault(capability, []).append(name)
    return out


if __name__ == "__main__":
    main()
