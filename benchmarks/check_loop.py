"""``iso.check`` called in a loop, as a user's own ``@given`` test does: sandboxed against in-process.

Each round runs the same corpus twice, interleaved: once sandboxed (the technique's warm child serves
every call, ``execution.warm``) and once with ``ISOLATION_SANDBOX=off``. The headline is the
sandboxed rate over the in-process rate (target: at least 0.8), by the clock and in CPU time (this
process's and the child's: the child runs the technique while this process computes the reference,
which the clock sees and the CPU time does not); the tail is the slowest single check of each side
and the share of rounds within the target.

    python -m benchmarks.check_loop [--rounds 3] [--size 60]
"""
from __future__ import annotations

import argparse
import time

from isolation_suite import Capability, catalog, check
from isolation_suite.execution.sandbox import SANDBOX_ENV, Sandbox
from isolation_suite.execution.warm import children_cpu, retire_all
from isolation_suite.judging.judge import clear_reference_cache

from ._common import corpus, env_restored, median, table, write

TARGET = 0.8
TECHNIQUE = "functional_detach"


def _loop(technique, scenarios, sandbox: str) -> tuple[float, float, float]:
    """(checks per second, CPU seconds per check, slowest check in seconds) over ``scenarios``;
    ``sandbox``: ``on`` (the warm child), ``off`` (in-process), or ``fresh`` (a new child per call, as
    before warm children). The CPU time is this process's and the children's."""
    slowest, children = 0.0, 0.0
    started, cpu = time.perf_counter(), time.process_time() + children_cpu()
    with env_restored(SANDBOX_ENV, "off" if sandbox == "off" else "on"):
        for scenario in scenarios:
            clear_reference_cache()  # every check pays for its reference, as a user's loop does
            one = time.perf_counter()
            if sandbox == "fresh":
                with Sandbox(technique) as own:
                    check(technique, scenario, sandbox=own)
                    children += own.child_cpu
            else:
                check(technique, scenario)
            slowest = max(slowest, time.perf_counter() - one)
    cpu = time.process_time() + children_cpu() + children - cpu
    return len(scenarios) / (time.perf_counter() - started), cpu / len(scenarios), slowest


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=60)
    args = parser.parse_args(argv)
    technique = catalog()[TECHNIQUE]
    scenarios = corpus(Capability.PASS_THROUGH, args.size)
    _loop(technique, scenarios[:5], "on")  # warm both paths' lazy imports before timing
    _loop(technique, scenarios[:5], "off")
    rows, ratios, cpu_ratios = [], [], []
    for round_ in range(1, args.rounds + 1):
        on, on_cpu, on_worst = _loop(technique, scenarios, "on")
        off, off_cpu, off_worst = _loop(technique, scenarios, "off")
        fresh, _, _ = _loop(technique, scenarios, "fresh")
        ratios.append(on / off)
        cpu_ratios.append(off_cpu / on_cpu)
        rows.append([round_, f"{on:.1f}", f"{off:.1f}", f"{fresh:.1f}", f"{on / off:.2f}", f"{off_cpu / on_cpu:.2f}",
                     f"{fresh / off:.2f}", f"{on_worst * 1e3:.0f}", f"{off_worst * 1e3:.0f}"])
    retire_all()
    print(table(rows, ["round", "warm checks/s", "in-process checks/s", "fresh child checks/s", "warm ratio",
                       "warm ratio (cpu)", "fresh ratio", "worst warm ms", "worst in-process ms"]))
    within = sum(r >= TARGET for r in ratios) / len(ratios)
    print(f"\n{TECHNIQUE}, {len(scenarios)} scenarios: sandboxed/in-process median {median(ratios):.2f} by the clock, "
          f"{median(cpu_ratios):.2f} in CPU time; worst round {min(ratios):.2f}, {within:.0%} of rounds at or above "
          f"{TARGET}")
    data = {"technique": TECHNIQUE, "scenarios": len(scenarios), "ratios": ratios, "cpu_ratios": cpu_ratios,
            "median_ratio": median(ratios), "worst_ratio": min(ratios), "median_cpu_ratio": median(cpu_ratios),
            "worst_cpu_ratio": min(cpu_ratios), "share_within": within}
    write("check_loop", data)
    return data


if __name__ == "__main__":
    main()
