"""Every throughput target of the sandbox and the modes, measured in one run, with its tail.

    python -m benchmarks.targets [--size 60] [--rounds 3] [--per-capability 4] [--repeat 1] [--detection]

Runs ``check_loop`` (``iso.check`` in a loop, sandboxed against in-process), ``throughput``
(per-technique checks against the two-loop floor, the sweep against its physical floor, per
capability), ``modes`` (compile and ddp against eager) and, with ``--detection``, ``detection``
(every known-bad row caught by the default search on 50 of 50 seeds), then prints one table: each
target, what was measured by the clock and in CPU time (this process's and its sandbox children's),
the tail (the worst round, row, capability or check; for compile, also what one new graph of one
operation costs to compile, in eager checks: ``compile_breakdown``'s floor) and whether the target
was met. A ratio by the clock counts a sandbox child's run that overlaps this process's reference as
free; the CPU time does not: both are shown, and a target is met when the clock says so (in every
repeat, with ``--repeat N``: the machine's speed drifts by up to 2x over minutes, so one figure
proves little).
"""
from __future__ import annotations

import argparse

from . import check_loop, compile_breakdown, detection, modes, throughput
from ._common import table, write


#: each target of one repeat: (name, goal, clock, cpu, tail, met, how a figure is written);
#: ``graph_floor``: what compiling one new graph costs, in eager checks (``compile_breakdown``)
def _targets(loop: dict, flows: dict, costs: dict, graph_floor: float | None = None) -> list[tuple]:
    rows = [
        ("iso.check in a loop: sandboxed / in-process rate", ">= 0.80", loop["median_ratio"],
         loop["median_cpu_ratio"], f"worst round {loop['worst_ratio']:.2f}", loop["median_ratio"] >= 0.8, "{:.2f}"),
        ("per-technique checks: share of the two-loop floor", ">= 80%", flows["search_sandboxed_wall"],
         flows["search_sandboxed_cpu"], f"worst row {flows['worst_row']} {flows['worst_row_share']:.0%}",
         flows["search_sandboxed_wall"] >= 0.8, "{:.0%}"),
        ("sweep: share of the physical floor, every capability", ">= 70%", flows["sweep_worst_wall"],
         flows["sweep_worst_cpu"], f"worst capability {flows['sweep_worst_group']}", flows["sweep_worst_wall"] >= 0.7,
         "{:.0%}"),
    ]
    for mode, limit in (("compile", 10.0), ("ddp", 4.0)):
        m = costs[mode]
        floor = f"; one new graph: {graph_floor:.1f} eager checks" if mode == "compile" and graph_floor else ""
        rows.append((f"{mode}: a check over an eager one (total)", f"<= {limit:g}x", m["relative_to_eager"],
                     m["cpu_relative_to_eager"],
                     f"median check {m['median_check_ratio']:.1f}x, worst {m['worst_check_ratio']:.1f}x{floor}",
                     m["relative_to_eager"] <= limit, "{:.1f}x"))
    return rows


def combine(repeats: list[list[tuple]]) -> list[list]:
    """One row per target over the repeats: every repeat's figures, and met only where all met."""
    rows = []
    for measured in zip(*repeats):
        name, goal, *_, fmt = measured[0]
        span = lambda i: ", ".join(fmt.format(m[i]) for m in measured)  # noqa: E731
        rows.append([name, goal, span(2), span(3), "; ".join(m[4] for m in measured), all(m[5] for m in measured)])
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=60, help="scenarios per capability (throughput, check_loop)")
    parser.add_argument("--rounds", type=int, default=3, help="check_loop's rounds")
    parser.add_argument("--per-capability", type=int, default=4, help="scenarios per capability (modes)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure everything this many times: each figure's range is shown, and a target "
                             "is met only where every repeat met it (the machine's speed drifts)")
    parser.add_argument("--detection", action="store_true", help="also the 50-seed detection benchmark (slow)")
    args = parser.parse_args(argv)
    repeats = []
    for _ in range(args.repeat):
        loop = check_loop.main(["--rounds", str(args.rounds), "--size", str(args.size)])
        flows = throughput.main(["--size", str(args.size)])["_summary"]
        costs = modes.main(args.per_capability, ["eager", "compile", "ddp"])
        floor = compile_breakdown.graph_floor("aot_eager", 30) / costs["eager"]["median_s"]
        repeats.append(_targets(loop, flows, costs, floor))
    rows = combine(repeats)
    if args.detection:
        caught = detection.main(["--seeds", "50", "--default-only"])["_summary"]
        rows.append(["known-bad rows caught by the default search", "50/50 seeds each",
                     f"{caught['worst_share_caught_default']:.0%} (worst row)", "-", "-",
                     caught["worst_share_caught_default"] == 1.0])
    print()
    print(table([[*r[:5], "met" if r[5] else "NOT MET"] for r in rows],
                ["target", "goal", "measured (clock)", "measured (cpu)", "tail", ""]))
    data = {"repeats": args.repeat,
            "rows": [dict(zip(("target", "goal", "clock", "cpu", "tail", "met"), r)) for r in rows]}
    print(f"-> {write('targets', data)}")
    return data


if __name__ == "__main__":
    main()
