"""Harness time over bare-torch time for the same training loops, side by side in one run.

The bare version is the loop a user would write, run twice on the same scenario: once
with the technique's own code (setup, call, optimizer, after_step) and once with the
reference's detach code. What it leaves out is exactly the harness: recording the
trace, resolving parameters, reseeding per call site, guarding phases, checking global
state, and judging the invariants. The physical floor is 1.0.

Each scenario runs harness and bare loops alternately, ``REPEATS`` times, and keeps the
fastest of each, so neither side pays alone for a first run (allocator, lazy kernels).
The headline is total harness time over total bare time on the corpus.

    python -m benchmarks.overhead
"""
from __future__ import annotations

import torch

from isolation_suite import catalog, check
from isolation_suite.judging.judge import clear_reference_cache
from isolation_suite.execution.sandbox import Sandbox

from ._common import bare_pair, corpus, median, table, timed, write

# the sound rows: a known-bad row's bare loop may crash, and its check also pays for confirmations
TECHNIQUES = ("functional_detach", "toggle_requires_grad", "freeze_and_eval", "parametrize_where", "weight_dropout",
              "parametrize_dropconnect")
REPEATS = 3


def side_by_side(technique, scenario, sandbox) -> tuple[float, float]:
    """(harness seconds, bare seconds) for one scenario, alternating the two."""
    def harness():
        clear_reference_cache()  # every check pays for its reference run
        check(technique, scenario, sandbox=sandbox)

    pairs = [(timed(harness)[1], timed(bare_pair, technique, scenario)[1]) for _ in range(REPEATS)]
    return min(h for h, _ in pairs), min(b for _, b in pairs)


def main() -> dict:
    torch.set_num_threads(1)
    rows, data = [], {}
    for name in TECHNIQUES:
        technique = catalog()[name]
        (capability,) = technique.capabilities
        scenarios = corpus(capability, 40)
        with Sandbox(technique) as sandbox:  # one child for the corpus, as a search keeps one
            times = [side_by_side(technique, s, sandbox) for s in scenarios]
        harness, bare = sum(h for h, _ in times), sum(b for _, b in times)
        data[name] = {"overhead": harness / bare, "median_overhead": median([h / b for h, b in times]),
                      "harness_ms_per_check": 1000 * harness / len(times),
                      "bare_ms_per_pair_of_loops": 1000 * bare / len(times), "scenarios": len(scenarios)}
        rows.append([name, len(scenarios), f"{1000 * harness / len(times):.1f}", f"{1000 * bare / len(times):.1f}",
                     f"{harness / bare:.2f}", f"{data[name]['median_overhead']:.2f}"])
    worst = max(v["overhead"] for k, v in data.items())
    data["_summary"] = {"worst_overhead": worst, "target": 1.3}
    print(table(rows, ["technique", "scenarios", "harness ms/check", "bare ms (2 loops)", "overhead",
                       "median per scenario"]))
    print(f"\nworst overhead {worst:.2f} (target <= 1.3) -> {write('overhead', data)}")
    return data


if __name__ == "__main__":
    main()
