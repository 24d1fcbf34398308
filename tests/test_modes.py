"""Execution modes: the scenario's Mode, how the runner applies it, and the catalog per mode."""
import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import isolation_suite as iso
import strategies
from isolation_suite import modes
from isolation_suite.check import failure_message, modes_for, search
from isolation_suite.scenario import Intent, Mode, Scenario, ScenarioError
from isolation_suite.techniques import CATALOG, conditions, explicit_examples, in_mode, triggers
from isolation_suite.tree import Router

STARVED = triggers.CHECKPOINT_STARVED


# --- the spec ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="jit"), "mode='jit' is not one of"),
    (dict(kind="autocast", target="blk"), "has no target"),
    (dict(kind="compile", backend="tvm"), "compile backend='tvm'"),
    (dict(kind="checkpoint", reentrant="yes"), "reentrant must be true or false"),
])
def test_a_bad_mode_names_the_bad_value(kwargs, message):
    with pytest.raises(ScenarioError, match=message):
        Mode(**kwargs)


def test_a_mode_must_name_a_container_of_the_architecture():
    with pytest.raises(ScenarioError, match="'fc' which is not a container|'fc', which is not a container"):
        dataclasses.replace(STARVED, mode=Mode("checkpoint", "fc"))
    assert dataclasses.replace(STARVED, mode=Mode("checkpoint", "")).mode.target == ""


def test_the_mode_round_trips_through_json_and_an_old_scenario_is_eager():
    again = Scenario.from_json(STARVED.to_json())
    assert again == STARVED and again.mode == Mode("checkpoint", "blk", reentrant=True)
    old = json.loads(triggers.FROZEN_LINEAR.to_json())
    del old["mode"]  # written before modes existed
    assert Scenario.from_dict(old).mode == Mode()
    assert "mode=checkpoint(blk, use_reentrant=True)" in repr(STARVED)
    assert "mode=" not in repr(triggers.FROZEN_LINEAR)


def test_modes_parse_and_unknown_ones_are_named():
    assert modes_for(None, ["cpu"]) == ("eager", "checkpoint", "compile", "autocast", "ddp")
    assert modes_for("all", ["cpu", "cuda:0"]) == ("eager", "checkpoint", "compile", "autocast")  # ddp: CPU only
    assert modes_for("eager, checkpoint,eager", ["cpu"]) == ("eager", "checkpoint")
    with pytest.raises(ValueError, match=r"unknown mode\(s\) \['jit'\]"):
        modes_for("eager,jit", ["cpu"])


def test_the_reference_shares_only_autocast():
    assert modes.for_reference(Mode("checkpoint", "blk", True)) == Mode()
    assert modes.for_reference(Mode("compile")) == Mode()
    assert modes.for_reference(Mode("autocast")) == Mode("autocast")


# --- strategies ----------------------------------------------------------------------------

@settings(max_examples=60, database=None, deadline=None)
@given(st.data())
def test_drawn_modes_are_of_the_asked_kinds_and_reentrant_only_where_something_needs_gradient(data):
    kinds = data.draw(st.lists(st.sampled_from(tuple(iso.modes.MODE_BY_KIND)), min_size=1, unique=True))
    scenario = data.draw(strategies.scenarios(capabilities=["FREEZE_MODULE"], modes=kinds))
    assert scenario.mode.kind in kinds
    if scenario.mode.reentrant:
        from isolation_suite.tree import architecture_tree, region_needs_gradient
        tree = architecture_tree(scenario.architecture)
        assert region_needs_gradient(tree, scenario.mode.target, Intent(), scenario.data.input_requires_grad)


def test_modes_shrink_toward_the_first_kind_and_the_whole_model():
    from hypothesis import find
    found = find(strategies.scenarios(capabilities=["FREEZE_MODULE"], modes=("checkpoint", "compile")),
                 lambda s: True, settings=settings(database=None))
    assert found.mode == Mode("checkpoint", "", reentrant=False)


# --- the runner ----------------------------------------------------------------------------

class CountingCalls(iso.Technique):
    """A pass-through technique that records every call the router hands it."""

    name = "counting_calls"
    capabilities = frozenset({iso.Capability.PASS_THROUGH})
    summary = "functional detach, counting"

    def __init__(self):
        self.calls = []

    def call(self, module, args, role):
        self.calls.append((role, torch.is_grad_enabled()))
        if role is iso.Role.PASS_THROUGH:
            params = {n: p.detach() for n, p in module.named_parameters()}
            return torch.func.functional_call(module, params, args)
        return module(*args)


def _pass_through_under_checkpoint(reentrant: bool, dropout: bool = False) -> Scenario:
    layers = [triggers.linear("pre"), triggers.linear("blk.shared")] + ([triggers.dropout("blk.drop")] if dropout
                                                                        else [])
    calls = ["pre", "blk.shared"] + (["blk.drop"] if dropout else []) + ["blk.shared"]
    base = triggers.scenario(layers, calls, Intent(pass_through=(("blk.shared", 0),)))
    return dataclasses.replace(base, mode=Mode("checkpoint", "blk", reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_recomputed_region_routes_its_calls_again_with_the_same_roles(reentrant):
    technique = CountingCalls()  # run here, not in a sandbox's child, so its record stays readable
    from isolation_suite.judge import reference_trace
    from isolation_suite.invariants import Context, evaluate
    from isolation_suite.runner import TechniqueDriver, run
    scenario = _pass_through_under_checkpoint(reentrant)
    trace = run(scenario, TechniqueDriver(technique))
    roles = [role for role, _ in technique.calls]
    per_forward = [iso.Role.PASS_THROUGH, iso.Role.NORMAL]
    # each step: the forward, then the recomputation during backward, with the same roles again
    assert roles == per_forward * 2 * scenario.steps
    assert not evaluate(Context(scenario, trace, reference_trace(scenario)))


def test_a_recomputed_region_draws_the_dropout_masks_of_its_forward(monkeypatch):
    scenario = _pass_through_under_checkpoint(False, dropout=True)
    technique = iso.catalog()["functional_detach"]
    assert iso.check(technique, scenario).ok
    # without the replay the recomputation draws other masks: the gradients are wrong, and it shows
    monkeypatch.setattr(modes.ForwardState, "resume", lambda self, snapshot: _passthrough())
    verdict = iso.check(technique, scenario)  # the sandbox's child is forked with the patch in place
    assert not verdict.ok and verdict.first.invariant in ("matches-reference", "no-crash"), str(verdict)


def _passthrough():
    import contextlib
    return contextlib.nullcontext()


def test_router_replay_restores_the_forward_counts_afterwards():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    seen = []
    router = Router(model, {"0": lambda use: iso.Role.NORMAL}, lambda site, m, a: seen.append(site.use) or m(*a))
    with router.forward():
        model(torch.ones(1, 2))
        snapshot = router.snapshot()
        model(torch.ones(1, 2))
    with router.replaying(snapshot):
        model(torch.ones(1, 2))
    assert seen == [0, 1, 1] and not router.active and router.snapshot() == (2, (2,))
    router.close()


# --- the catalog per mode ------------------------------------------------------------------

def test_reentrant_starvation_condition():
    assert conditions.reentrant_checkpoint_starved(STARVED)
    for other in (Mode("checkpoint", "blk", False), Mode(), Mode("autocast")):
        assert not conditions.reentrant_checkpoint_starved(dataclasses.replace(STARVED, mode=other))
    needs = dataclasses.replace(STARVED, data=dataclasses.replace(STARVED.data, input_requires_grad=True))
    assert not conditions.reentrant_checkpoint_starved(needs)  # the input feeds the region gradient
    assert not conditions.reentrant_checkpoint_starved(dataclasses.replace(STARVED, intent=Intent(
        frozen_modules=("fc",))))  # nothing frozen feeds the region: a trainable module does


@pytest.mark.parametrize("name", ["requires_grad_false", "freeze_and_eval", "optimizer_filter", "no_grad_region",
                                  "name_substring"])
def test_freezing_with_requires_grad_starves_a_reentrant_checkpoint(name):
    verdict = iso.check(iso.catalog()[name], STARVED)
    assert verdict.first.invariant == "trainable-trains" and "blk.lin.weight got no gradient" in str(verdict)
    # the same freeze under a non-reentrant checkpoint is right
    assert iso.check(iso.catalog()[name], dataclasses.replace(STARVED, mode=Mode("checkpoint", "blk"))).invariants \
        == iso.check(iso.catalog()[name], dataclasses.replace(STARVED, mode=Mode())).invariants


def test_the_input_grads_hook_keeps_a_reentrant_checkpoint_training():
    assert iso.check(iso.catalog()["freeze_enable_input_grads"], STARVED).ok


def test_trigger_examples_move_into_the_mode_and_mode_triggers_stay_in_theirs():
    caps = {iso.Capability.FREEZE_MODULE}
    eager = explicit_examples(caps)
    assert STARVED not in eager and all(s.mode == Mode() for s in eager)
    assert STARVED in explicit_examples(caps, "checkpoint")
    compiled = explicit_examples(caps, "compile")
    assert len(compiled) == len(eager) and all(s.mode.kind == "compile" for s in compiled)
    # a whole-model reentrant checkpoint only where the input needs gradient
    moved = in_mode(triggers.FROZEN_LINEAR, "checkpoint")
    assert moved.mode == Mode("checkpoint", "", reentrant=True) and moved.data.input_requires_grad


MODE_GATE = [m for m in iso.modes.MODE_BY_KIND if m != "eager"]
#: examples per search in each mode: compiling costs about a second per run, a ddp run a fork and a
#: process group (about 0.1 s), the others as eager does
MODE_EXAMPLES = {"checkpoint": 20, "autocast": 20, "compile": 2, "ddp": 3}


@pytest.mark.parametrize("mode", MODE_GATE)
@pytest.mark.parametrize("row", CATALOG, ids=lambda e: e.name)
def test_every_row_gets_its_verdict_in_every_mode(row, mode):
    """The gate per mode: a row sound in this mode holds, a row known-bad in it is caught with a
    declared invariant whose condition holds on the minimal counterexample."""
    technique = row.technique()
    expected = technique.expected_in(mode)
    result = search(technique, device="cpu", mode=mode, max_examples=MODE_EXAMPLES[mode] if not expected else None,
                    shrink=not expected or mode not in ("compile", "ddp"))
    if not expected:
        assert result.failure is None, failure_message(result.failure)
        return
    assert result.failure is not None, f"{row.name} in {mode}: no violation in {result.judged} examples"
    first = result.failure.first.invariant
    assert first in expected, failure_message(result.failure)
    assert result.failure.scenario.mode.kind == mode
    assert row.condition_for(first).holds(result.failure.scenario) or any(
        c.invariant == first and c.holds(result.failure.scenario) for c in row.conditions), \
        failure_message(result.failure)
