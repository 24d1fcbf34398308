"""The benchmarks' own measuring code keeps running against the harness it measures (a benchmark is
not a test, but one that no longer runs measures nothing): each building block, on two scenarios."""
from __future__ import annotations

import os

import pytest

import isolation_suite as iso
from benchmarks import check_loop, sweep_profile, throughput
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
