"""Runs sent ahead to a sandbox child (``Sandbox.prefetch``) and the sweep's batches (``judge_batch``):
each run is answered as a run asked for alone would be, in any order, and whatever ends, hangs or
poisons the child in the middle of a batch costs that run's verdict only."""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import isolation_suite as iso
from isolation_suite.engine.sweep import MAX_BATCH, judge_batch, sweep
from isolation_suite.execution.runner import TechniqueDriver, run
from isolation_suite.execution import sandbox as sandbox_mod
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.judging.judge import SharedReference, judge
from isolation_suite.model.factory import build
from isolation_suite.techniques import in_mode
from isolation_suite.techniques.triggers import PASS_UPSTREAM

sys.path.insert(0, str(Path(__file__).parent))
import hostile  # noqa: E402
from test_sweep import _equal_traces  # noqa: E402

#: four scenarios told apart by their models' first weight
BATCH = [dataclasses.replace(PASS_UPSTREAM, init_seed=seed) for seed in range(4)]


def _first_weight(model) -> float:
    return float(next(iter(model.parameters())).detach().flatten()[0])


#: what a hostile run does, by name
ACTS = {
    "exit": lambda: os._exit(5),
    "segfault": lambda: os.kill(os.getpid(), signal.SIGSEGV),
    "hang": lambda: time.sleep(600),
    "leak": lambda: setattr(torch.backends.cudnn, "benchmark", not torch.backends.cudnn.benchmark),
}


class OnOneScenario(hostile._Detaches):
    """Sound, but for one scenario (told by its model's first weight), on which it does ``ACTS[act]``."""

    def __init__(self, scenario, act: str):
        self.name, self.act = f"hostile.{act}_on_one", ACTS[act]
        self.marker = _first_weight(build(scenario).model)

    def setup(self, model, intent):
        if _first_weight(model) == self.marker:
            self.act()


@pytest.fixture(autouse=True)
def _forked():
    hostile.require_fork_sandbox()


def _sound():
    return iso.catalog()["functional_detach"]


def test_runs_sent_ahead_are_answered_in_any_order_by_one_child_as_runs_asked_for_alone():
    technique = _sound()
    with Sandbox(technique) as box:
        box.prefetch(BATCH, "cpu")
        pid = box.pid
        order = [2, 0, 3, 1]
        traces = {i: box.run(BATCH[i], "cpu") for i in order}
        assert box.pid == pid and box.runs == len(BATCH) and not box.ahead
    for i, scenario in enumerate(BATCH):
        assert _equal_traces(traces[i], run(scenario, TechniqueDriver(technique)))
    assert not _equal_traces(traces[0], traces[1])  # the four are told apart


def test_a_run_not_sent_ahead_waits_for_the_batch_and_keeps_its_answers():
    technique = _sound()
    other = dataclasses.replace(PASS_UPSTREAM, init_seed=9)
    with Sandbox(technique) as box:
        box.prefetch(BATCH[:3], "cpu")
        alone = box.run(other, "cpu")  # as a float64 twin is asked for in the middle of a batch
        traces = [box.run(s, "cpu") for s in BATCH[:3]]
        assert box.runs == 4  # nothing run twice
    assert _equal_traces(alone, run(other, TechniqueDriver(technique)))
    assert all(_equal_traces(t, run(s, TechniqueDriver(technique))) for t, s in zip(traces, BATCH))


def test_a_child_forked_before_the_compile_preparation_is_replaced_for_a_compiled_run(monkeypatch):
    """A child forked for eager runs lacks what the judging process prepares for compiled runs (the
    imports and the warm-up compile, ``ModeInfo.prepares_parent``): a compiled run goes to a fresh,
    prepared child, once the first has answered what it owes, and those answers are kept."""
    monkeypatch.setattr(sandbox_mod, "_PREPARED", set())  # this process prepared for no mode yet
    technique = _sound()
    compiled = in_mode(BATCH[3], "compile")
    with Sandbox(technique) as box:
        box.prefetch(BATCH[:2], "cpu")
        first = box.pid
        assert "compile" not in box.prepared
        alone = box.run(compiled, "cpu")
        assert box.pid != first and "compile" in box.prepared and box.runs == 3
        second = box.pid
        traces = [box.run(s, "cpu") for s in BATCH[:2]]
        assert box.runs == 3  # answered by the first child, not run again
        box.run(in_mode(BATCH[2], "compile"), "cpu")
        assert box.pid == second and box.runs == 4  # the prepared child serves the next compiled run
    assert _equal_traces(alone, run(compiled, TechniqueDriver(technique)))
    assert all(_equal_traces(t, run(s, TechniqueDriver(technique))) for t, s in zip(traces, BATCH))


def test_the_next_batch_drops_what_was_not_asked_for_and_a_dropped_run_runs_afresh():
    technique = _sound()
    with Sandbox(technique) as box:
        box.prefetch(BATCH[:3], "cpu")
        box.run(BATCH[0], "cpu")
        first = box.pid
        box.prefetch(BATCH[3:], "cpu")  # BATCH[1:3] dropped: their child is ended, not waited for
        assert [e.scenario for e in box.ahead] == [BATCH[3]] and box.pid != first
        again = box.run(BATCH[1], "cpu")  # not the dropped answer: a run of its own
        assert box.runs == 3
    assert _equal_traces(again, run(BATCH[1], TechniqueDriver(technique)))


class NoGradHangsOnOne(OnOneScenario):
    """Known-bad everywhere (the pass-through call under ``no_grad``), and it hangs on one scenario."""

    def call(self, module, args, role):
        if role is iso.Role.PASS_THROUGH:
            with torch.no_grad():
                return module(*args)
        return module(*args)


def test_runs_after_a_techniques_failure_are_not_waited_for():
    hostile_row = NoGradHangsOnOne(BATCH[2], "hang")
    started = time.monotonic()
    with Sandbox(hostile_row, timeout=60.0) as box:
        (verdicts,) = judge_batch([(hostile_row, box, BATCH)], on_verdict=lambda i, s, v: v.ok)
        assert not box.ahead and box.pid is None  # the child, hanging on BATCH[2], was ended
    assert len(verdicts) == 1 and verdicts[0].first.invariant == "gradient-flows"
    assert time.monotonic() - started < 30  # not the hang's 60 s timeout


@pytest.mark.parametrize("act, invariant, message", [
    ("exit", "no-crash", "the process exited with code 5"),
    ("segfault", "no-crash", "the process was killed by signal SIGSEGV"),
    ("hang", "timeout", "the run took longer than 2s"),
    ("leak", "state-restored", "torch.backends.cudnn.benchmark changed"),
])
def test_what_ends_hangs_or_poisons_the_child_mid_batch_costs_that_runs_verdict_only(act, invariant, message):
    hostile_row = OnOneScenario(BATCH[1], act)
    flag = torch.backends.cudnn.benchmark
    with Sandbox(hostile_row, timeout=2.0) as box:
        (verdicts,) = judge_batch([(hostile_row, box, BATCH)])
    assert [v.ok for v in verdicts] == [True, False, True, True]
    assert verdicts[1].invariants == (invariant,), str(verdicts[1])
    assert message in verdicts[1].first.message, verdicts[1].first.message
    if invariant != "state-restored":  # the phase of the run that was lost, not of the one before it
        assert "during setup" in verdicts[1].first.message, verdicts[1].first.message
    assert torch.backends.cudnn.benchmark == flag  # the parent's own state untouched
    # the runs after it ran on a fresh child: the verdicts each one gets alone
    for scenario, verdict in zip(BATCH, verdicts):
        if verdict.ok:
            assert not judge(hostile_row, scenario, timeout=2.0).violations


def test_a_batch_judges_as_scenario_by_scenario_and_stops_a_technique_at_its_first_failure():
    rows = [iso.catalog()[name] for name in ("functional_detach", "no_grad_call", "toggle_requires_grad")]
    boxes = [Sandbox(t) for t in rows]
    seen = []
    try:
        batched = judge_batch([(t, box, BATCH) for t, box in zip(rows, boxes)],
                              on_verdict=lambda i, s, v: seen.append((i, s)) or v.ok)
    finally:
        for box in boxes:
            box.close()
    assert [len(v) for v in batched] == [4, 1, 4]  # no_grad_call fails on the first and is judged no more
    # each technique's scenarios in order; one run of each technique in flight in turn
    assert [s for i, s in seen if i != 1] == [s for s in BATCH for _ in (0, 2)] and (1, BATCH[0]) in seen
    assert seen[:3] == [(0, BATCH[0]), (1, BATCH[0]), (2, BATCH[0])]
    for technique, verdicts in zip(rows, batched):
        for scenario, verdict in zip(BATCH, verdicts):
            alone = judge(technique, scenario, reference=SharedReference(scenario))
            assert (alone.violations, alone.divergence) == (verdict.violations, verdict.divergence)


@pytest.mark.parametrize("at_once", [1, 2, None])
def test_the_children_in_flight_run_their_batches_while_one_run_of_each_is_judged_in_turn(monkeypatch, at_once):
    from isolation_suite.engine import sweep as sweep_mod
    monkeypatch.setattr(sweep_mod, "CHILDREN_AT_ONCE", at_once)
    rows = [iso.catalog()[name] for name in ("functional_detach", "toggle_requires_grad", "no_grad_call")]
    boxes = [Sandbox(t) for t in rows]
    seen, sent = [], []  # the order of the verdicts; at the first: how many runs each child was sent

    def note(i, scenario, verdict):
        if not sent:
            sent.append([len(box.ahead) for box in boxes])
        seen.append((i, BATCH.index(scenario)))
        return True
    try:
        batched = judge_batch([(t, box, BATCH[:2]) for t, box in zip(rows, boxes)], on_verdict=note)
    finally:
        for box in boxes:
            box.close()
    flying = {1: 1, 2: 2, None: 3}[at_once]
    assert sent == [[1] + [2] * (flying - 1) + [0] * (3 - flying)]  # the first's first run is answered
    assert seen == {1: [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)],
                    2: [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (2, 1)],
                    None: [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]}[at_once]
    assert [[v.ok for v in verdicts] for verdicts in batched] == [[True, True], [True, True], [False, False]]


def test_a_technique_judged_twice_in_a_batch_keeps_its_runs_for_their_turn(monkeypatch):
    """Its child is sent its second share only once the first is judged: the runs sent ahead for the
    first are not dropped (one child serves both, forked once)."""
    technique = iso.catalog()["no_grad_call"]
    forks, start = [], Sandbox._start
    monkeypatch.setattr(Sandbox, "_start", lambda self, scenarios: forks.append(1) or start(self, scenarios))
    with Sandbox(technique) as box:
        batched = judge_batch([(technique, box, BATCH[:2]), (technique, box, BATCH[2:])])
    assert len(forks) == 1
    assert all(v.first.invariant == "gradient-flows" for verdicts in batched for v in verdicts)


def test_in_process_nothing_is_sent_ahead_and_the_verdicts_are_the_same(monkeypatch):
    monkeypatch.setenv("ISOLATION_SANDBOX", "off")
    technique = iso.catalog()["no_grad_call"]
    with Sandbox(technique) as box:
        box.prefetch(BATCH, "cpu")
        assert box.pid is None and not box.ahead
        (verdicts,) = judge_batch([(technique, box, BATCH)])
    assert all(v.first.invariant == "gradient-flows" for v in verdicts)


def test_a_sweep_judges_generated_scenarios_in_batches_with_the_counts_of_one_by_one():
    rows = [iso.catalog()[name] for name in ("functional_detach", "toggle_requires_grad")]
    swept = sweep(rows, {iso.Capability.PASS_THROUGH}, max_examples=3 * MAX_BATCH, explicit=False, seed=5)
    assert swept.scenarios == 3 * MAX_BATCH
    assert all(r.ok and r.examples == swept.scenarios for r in swept.results)
    assert swept.references == swept.scenarios and swept.checks == 2 * swept.scenarios


def test_a_failure_deep_in_a_generated_batch_replays_from_its_own_choices(monkeypatch):
    """An example draws a batch of scenarios one by one; the failing one's own slice of the choices is
    what its technique's search replays and shrinks: decoded, the slice draws that very scenario."""
    from hypothesis.control import BuildContext
    from hypothesis.database import choices_from_bytes
    from hypothesis.internal.conjecture.data import ConjectureData

    from isolation_suite.engine import sweep as sweep_mod
    from isolation_suite.engine.check import Start, search_strategy
    from test_sweep import FREEZE, BrokenOnConvolutions

    starts, positions, judge_real = [], [], sweep_mod._judge_batch

    def judged(members, batch, *args, **kwargs):
        out = judge_real(members, batch, *args, **kwargs)
        positions.extend(i for i, verdicts in enumerate(out) for _, v in verdicts if not v.ok)
        return out
    monkeypatch.setattr(sweep_mod, "_judge_batch", judged)
    monkeypatch.setattr(sweep_mod, "Start", lambda verdict, choices: starts.append((verdict, choices)) or
                        Start(verdict, choices))
    swept = sweep([BrokenOnConvolutions()], {FREEZE}, max_examples=60, explicit=False, seed=9)
    assert positions and positions[0] > 0  # the failure was not the first scenario its example drew
    (verdict, choices), = starts
    data = ConjectureData.for_choices(choices_from_bytes(choices))
    with BuildContext(data, wrapped_test=None):  # the strategy notes and draws as inside a test
        replayed = data.draw(search_strategy(frozenset({FREEZE}), "cpu", None, "eager"))
    assert replayed == verdict.scenario
    result = swept.results[0]
    assert result.shrink_examples > 0 and result.failure.first.invariant == "frozen-unchanged"
    shrunk, found = result.failure.scenario, verdict.scenario
    assert len(shrunk.architecture.layers) <= len(found.architecture.layers) and shrunk.steps <= found.steps
