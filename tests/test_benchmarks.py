"""The benchmarks' own measuring code keeps running against the harness it measures (a benchmark is
not a test, but one that no longer runs measures nothing): each building block, on two scenarios."""
from __future__ import annotations

import os

import pytest

import isolation_suite as iso
from benchmarks import check_loop, compile_cost, sweep_profile, targets, throughput
from benchmarks._common import corpus

PASS = iso.Capability.PASS_THROUGH


@pytest.fixture(autouse=True)
def _leaves_the_sandbox_setting_as_it_was():
    before = os.environ.get("ISOLATION_SANDBOX")
    yield
    assert os.environ.get("ISOLATION_SANDBOX") == before


def _rows():
    return [iso.catalog()[name] for name in ("functional_detach", "no_grad_call")]


def test_the_throughput_blocks_time_checks_sweeps_and_their_floors():
    scenarios = corpus(PASS, 2)
    one = throughput.per_technique(_rows()[0], scenarios)
    assert one["checks"] == 2
    assert all(one[k] > 0 for k in ("floor_cpu_s", "sandboxed_wall_s", "sandboxed_cpu_s", "in_process_cpu_s"))
    group = throughput.sweep_group(_rows(), scenarios)
    assert group["checks"] == 4 and group["techniques"] == 2
    # the physical floor shares the reference loop: less than the two-loop floor, more than nothing
    assert 0 < group["physical_floor_cpu_s"] < group["two_loop_floor_cpu_s"]
    assert group["sandboxed_cpu_s"] > 0 and group["in_process_cpu_s"] > 0


def test_the_sweep_profile_splits_a_check_into_its_parts():
    scenarios = corpus(PASS, 2)
    for sandboxed in (True, False):
        ms = sweep_profile.profile(_rows(), scenarios, sandboxed)
        assert set(sweep_profile.PARTS) <= set(ms) and ms["floor"] > 0 and ms["technique loop"] > 0
        assert abs(sum(ms[p] for p in sweep_profile.PARTS) - ms["cpu"]) < 1e-6
        assert (ms["child's rest"] == 0) != sandboxed


def test_the_check_loop_times_warm_in_process_and_fresh_children():
    scenarios = corpus(PASS, 2)
    for how in ("on", "off", "fresh"):
        rate, cpu, slowest = check_loop._loop(_rows()[0], scenarios, how)
        assert rate > 0 and cpu > 0 and slowest > 0


def test_the_compile_cost_variants_each_check_and_leave_the_flags_as_they_were():
    """``compile_cost``'s "before" goes without one cut (``--before cache|untraced``: that flag off for
    the child it forks); each variant checks a scenario in its own mode, and the flags are this
    process's own again after each check."""
    from isolation_suite.execution import modes
    from isolation_suite.execution.sandbox import Sandbox
    from isolation_suite.techniques.triggers import FROZEN_DROPOUT
    assert [v.cached for v in compile_cost.before_after("aot_eager")] == [True, False, True]
    assert [v.untraced for v in compile_cost.before_after("aot_eager", "untraced")] == [True, False, True]
    technique = iso.catalog()["freeze_and_eval"]  # sound: every variant's verdict holds
    flags = modes.UNTRACED_HARNESS_FRAMES, modes.CACHE_ACROSS_RUNS
    for variant in compile_cost.before_after("aot_eager"):
        with Sandbox(technique) as sandbox:
            scenario = compile_cost._in_variant(variant, FROZEN_DROPOUT)
            assert scenario.mode.kind == ("eager" if variant.backend is None else "compile")
            assert compile_cost._check(variant, technique, scenario, sandbox).ok
        assert (modes.UNTRACED_HARNESS_FRAMES, modes.CACHE_ACROSS_RUNS) == flags


def test_a_target_is_met_only_where_every_repeat_met_it():
    def measured(loop_ratio, sweep_share, graph_floor=None):
        loop = {"median_ratio": loop_ratio, "median_cpu_ratio": 0.8, "worst_ratio": loop_ratio - 0.1}
        flows = {"search_sandboxed_wall": 0.9, "search_sandboxed_cpu": 0.5, "worst_row": "r", "worst_row_share": 0.6,
                 "sweep_worst_wall": sweep_share, "sweep_worst_cpu": 0.4, "sweep_worst_group": "G"}
        costs = {m: {"relative_to_eager": 3.0, "cpu_relative_to_eager": 2.0, "median_check_ratio": 2.5,
                     "worst_check_ratio": 9.0} for m in ("compile", "ddp")}
        return targets._targets(loop, flows, costs, graph_floor)
    rows = {r[0]: r for r in targets.combine([measured(1.3, 0.72), measured(0.7, 0.75)])}
    loop = rows["iso.check in a loop: sandboxed / in-process rate"]
    assert loop[2] == "1.30, 0.70" and loop[5] is False  # missed once: not met
    sweep = rows["sweep: share of the physical floor, every capability"]
    assert sweep[2] == "72%, 75%" and sweep[5] is True
    assert rows["compile: a check over an eager one (total)"][5] is True  # 3x <= 10x in both
    # the compile row's tail says what one new graph costs, where it was measured; ddp's does not
    tails = {r[0]: r[4] for r in measured(1.3, 0.72, graph_floor=10.4)}
    assert tails["compile: a check over an eager one (total)"].endswith("one new graph: 10.4 eager checks")
    assert "graph" not in tails["ddp: a check over an eager one (total)"]


def test_the_compile_breakdown_counts_graphs_and_phases(tmp_path):
    """``compile_breakdown`` keeps Dynamo's cache in the process it runs in, so it runs in its own."""
    import json
    import subprocess
    import sys
    env = {**os.environ, "ISOLATION_BENCH_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "benchmarks.compile_breakdown", "--per-capability", "1",
                    "--floor-shapes", "2"], check=True, env=env, capture_output=True, timeout=300)
    data = json.loads((tmp_path / "compile_breakdown.json").read_text())
    assert data["checks"] >= len(iso.Capability)  # one scenario per capability and sound row at least
    assert data["floor_ms"]["eager"] > 0 and data["floor_ms"]["aot_eager"] > 0
    # every scenario is new to the process: its compiled checks compile graphs, in Dynamo's phases
    assert data["graphs_per_check"] > 0 and data["frames_per_check"] >= data["graphs_per_check"]
    assert 0 < data["phase_share"]["_compile.compile_inner"] <= 1
