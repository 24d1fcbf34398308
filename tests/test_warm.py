"""Warm sandboxes: ``iso.check`` in a loop reuses a technique's child while its fork is still current."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import isolation_suite as iso
from isolation_suite.execution import warm
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.techniques.triggers import PASS_UPSTREAM

sys.path.insert(0, str(Path(__file__).parent))
import hostile  # noqa: E402


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    hostile.require_fork_sandbox()
    monkeypatch.setenv("ISOLATION_SANDBOX", "on")
    warm.retire_all()
    yield
    warm.retire_all()


def _child(technique) -> int | None:
    return warm._held[id(technique)].sandbox.pid


def test_calls_of_one_technique_share_a_child_and_judge_as_a_fresh_one_does():
    technique = iso.catalog()["functional_detach"]
    first = iso.check(technique, PASS_UPSTREAM)
    pid = _child(technique)
    assert pid is not None and first.ok
    again = iso.check(technique, PASS_UPSTREAM)
    assert _child(technique) == pid and again.ok
    with Sandbox(technique) as fresh:
        assert iso.check(technique, PASS_UPSTREAM, sandbox=fresh).violations == again.violations


def test_a_changed_attribute_or_global_flag_forks_afresh():
    technique = type(iso.catalog()["functional_detach"])()  # its own object: the test changes it
    iso.check(technique, PASS_UPSTREAM)
    pid = _child(technique)
    technique.note = "changed after the fork"
    iso.check(technique, PASS_UPSTREAM)
    assert _child(technique) != pid
    pid = _child(technique)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(not previous)
    try:
        iso.check(technique, PASS_UPSTREAM)
        assert _child(technique) != pid
    finally:
        torch.use_deterministic_algorithms(previous)
    pid = _child(technique)
    original = torch.nn.functional.gelu
    torch.nn.functional.gelu = lambda *a, **k: original(*a, **k)  # a patch the old child would not see
    try:
        iso.check(technique, PASS_UPSTREAM)
        assert _child(technique) != pid
    finally:
        torch.nn.functional.gelu = original


def test_a_leaking_technique_is_caught_on_every_call_and_its_child_retired():
    technique = hostile.PatchesLinear()
    for _ in range(2):
        verdict = iso.check(technique, PASS_UPSTREAM)
        assert "state-restored" in {v.invariant for v in verdict.violations}


def test_at_most_max_warm_children_are_kept():
    techniques = [type(f"T{i}", (hostile._Detaches,), {"name": f"t{i}"})() for i in range(warm.MAX_WARM + 2)]
    for technique in techniques:
        assert iso.check(technique, PASS_UPSTREAM).ok
    assert len(warm._held) == warm.MAX_WARM and id(techniques[0]) not in warm._held
