"""Freeze schedules: the frozen modules change at step boundaries; techniques follow them with
``on_intent_change``; the reference and the invariants read the intent in force at each step."""
import dataclasses

import pytest
import torch

import isolation_suite as iso
from isolation_suite.judging.invariants import Context, frozen_unchanged, trainable_trains
from isolation_suite.judging.judge import reference_trace
from isolation_suite.execution.runner import TechniqueDriver, run
from isolation_suite.spec.scenario import Change, Intent, OptimizerRecipe, Scenario, ScenarioError
from isolation_suite.techniques import triggers

THAW, REFREEZE = triggers.THAW, triggers.REFREEZE_MOMENTUM


# --- the spec ------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, message", [
    ((Change(4, ()),), r"within the 3 step\(s\)"),
    ((Change(3, ()), Change(2, ())), "must increase"),
    ((Change(2, ("nope",)),), "'nope', which the architecture does not have"),
])
def test_a_bad_schedule_names_the_bad_value(schedule, message):
    with pytest.raises(ScenarioError, match=message):
        dataclasses.replace(THAW, schedule=schedule)


def test_a_schedule_excludes_an_lr_scheduler_and_starts_after_step_one():
    with pytest.raises(ScenarioError, match="needs scheduler none, not StepLR"):
        dataclasses.replace(THAW, optimizer=OptimizerRecipe("SGD", (("lr", 0.1),), scheduler="StepLR"))
    with pytest.raises(ScenarioError, match=r"schedule step=1 must be an integer in \[2, 64\]"):
        Change(1, ())


def test_the_intent_in_force_at_each_step_and_json():
    assert [THAW.intent_at(s).frozen_modules for s in (1, 2, 3)] == [("enc",), (), ()]
    assert THAW.intents == (Intent(frozen_modules=("enc",)), Intent())
    assert Scenario.from_json(THAW.to_json()) == THAW
    assert "schedule=[step 2: frozen=[]]" in repr(THAW)


# --- the reference's meaning ----------------------------------------------------------------

def test_the_reference_gives_a_thawed_module_fresh_optimizer_state():
    """Hand-written: SGD with momentum over the trainable layers, the thawed one added as a new group
    at the boundary (its momentum starts at zero), exactly what add_param_group does."""
    scenario = dataclasses.replace(THAW, optimizer=OptimizerRecipe("SGD", (("lr", 0.1), ("momentum", 0.9))))
    trace = reference_trace(scenario)
    from isolation_suite.model.factory import build
    built = build(scenario, "cpu")
    model = built.model
    enc = list(model.enc.parameters())
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("enc.")], lr=0.1,
                                momentum=0.9)
    from isolation_suite.execution.runner import LOSS_SITE, site_seed
    for step in range(1, scenario.steps + 1):
        if step == 2:
            optimizer.add_param_group({"params": enc})
        optimizer.zero_grad()
        x = built.inputs[step - 1][0][0].clone().requires_grad_(True)
        h = model.pre(x)
        if step == 1:  # frozen: a constant function of its input
            h = torch.nn.functional.linear(h, model.enc.weight.detach(), model.enc.bias.detach())
        else:
            h = model.enc(h)
        out = model.fc(h)
        built.loss(out, site_seed(scenario.data.seed, step, 0, LOSS_SITE)).backward()
        optimizer.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(trace.steps[step - 1].params[name], p.detach(), rtol=1e-12, atol=1e-12)


# --- the runner and the invariants ----------------------------------------------------------

class Following(iso.Technique):
    """Freezes by routing (a constant call) and rebuilds its own record of each boundary."""

    name = "following"
    capabilities = frozenset({iso.Capability.FREEZE_SCHEDULE})
    summary = "records the roles and the boundaries it sees"

    def __init__(self, raise_at_change: bool = False):
        self.roles, self.changes, self.raise_at_change = [], [], raise_at_change

    def call(self, module, args, role):
        self.roles.append(role)
        return module(*args)

    def on_intent_change(self, model, optimizer, old, new):
        self.changes.append((old.frozen_modules, new.frozen_modules))
        if self.raise_at_change:
            raise RuntimeError("cannot thaw")
        return None


def test_a_module_frozen_at_a_boundary_keeps_no_gradient_in_the_reference():
    """A constant has no gradient: at the boundary the reference drops the newly frozen module's last
    gradient with its optimizer state, so the loop's gradient-norm clipping (over every parameter)
    no longer counts it. A recipe that takes the module out of the optimizer and leaves the gradient
    there scales every other gradient by a norm that still holds it."""
    from isolation_suite.techniques.freeze_schedule import UnfreezeAddParamGroup

    class KeepsTheGradient(UnfreezeAddParamGroup):
        name = "keeps_the_gradient"

        def on_intent_change(self, model, optimizer, old, new):
            stale = {name: p.grad for name, p in model.named_parameters()}
            super().on_intent_change(model, optimizer, old, new)
            for name, p in model.named_parameters():
                if p.grad is None and stale[name] is not None:
                    p.grad = stale[name]
    scenario = triggers.REFREEZE_CLIP_NORM
    reference = reference_trace(scenario)
    assert reference.steps[1].grads["enc.weight"] is None and reference.steps[0].grads["enc.weight"] is not None
    assert iso.check(UnfreezeAddParamGroup(), scenario).ok
    verdict = iso.check(KeepsTheGradient(), scenario)
    assert verdict.invariants == ("matches-reference",), str(verdict)


def test_the_boundary_calls_on_intent_change_once_and_routes_the_new_intent():
    technique = Following()
    run(THAW, TechniqueDriver(technique))
    assert technique.changes == [(("enc",), ())]
    # step 1 intercepts the frozen enc; from step 2 on nothing is frozen, nothing is intercepted
    assert technique.roles == [iso.Role.FROZEN]


def test_a_technique_that_raises_at_the_boundary_is_a_crash_there():
    verdict = iso.check(Following(raise_at_change=True), THAW)
    assert verdict.first.invariant == "no-crash" and "on_intent_change" in verdict.first.message \
        and "cannot thaw" in verdict.first.message


def test_frozen_unchanged_judges_each_step_by_the_intent_in_force():
    """A layer that trains at step 1 and is frozen from step 2 may move at step 1, not at step 2."""
    sound = iso.catalog()["unfreeze_add_param_group"]
    ctx = Context(REFREEZE, run(REFREEZE, TechniqueDriver(sound)), reference_trace(REFREEZE))
    assert frozen_unchanged(ctx) is None and ctx.technique.steps[0].params["enc.weight"].ne(
        ctx.technique.initial_params["enc.weight"]).any()  # it did move at step 1
    bad = iso.catalog()["unfreeze_flag_only"]
    ctx = Context(REFREEZE, run(REFREEZE, TechniqueDriver(bad)), reference_trace(REFREEZE))
    violation = frozen_unchanged(ctx)
    assert violation is not None and violation.step == 2 and "enc.weight" in violation.message


def test_trainable_trains_judges_a_thawed_module_from_its_boundary_on():
    bad = iso.catalog()["unfreeze_flag_only"]
    ctx = Context(THAW, run(THAW, TechniqueDriver(bad)), reference_trace(THAW))
    violation = trainable_trains(ctx)
    assert violation is not None and violation.step == 2 and "enc." in violation.message
    sound = iso.catalog()["unfreeze_add_param_group"]
    assert trainable_trains(Context(THAW, run(THAW, TechniqueDriver(sound)), reference_trace(THAW))) is None


def test_a_thaw_under_compile_reaches_the_compiled_graph():
    """pytorch#139476 (a compiled frame reused after requires_grad flips): torch 2.13 recompiles."""
    scenario = dataclasses.replace(THAW, mode=iso.Mode("compile"))
    assert iso.check(iso.catalog()["unfreeze_add_param_group"], scenario).ok
    assert iso.check(iso.catalog()["unfreeze_flag_only"], scenario).first.invariant == "trainable-trains"
