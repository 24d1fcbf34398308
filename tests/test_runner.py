"""End to end: ``isolation_suite.check`` on tiny hand-written techniques and on the catalog."""
from __future__ import annotations

import pytest
import torch

import isolation_suite as iso
from isolation_suite import Capability, Technique
from isolation_suite.scenario import Architecture, Data, Intent, Layer, Op, OptimizerRecipe, Scenario
from isolation_suite.techniques import entry


def linear(path: str, n_in: int = 2, n_out: int = 2) -> Layer:
    return Layer(path, "linear", (("bias", True), ("in_features", n_in), ("out_features", n_out)))


def batchnorm(path: str) -> Layer:
    return Layer(path, "batchnorm1d", (("num_features", 2),))


def rnn(path: str) -> Layer:
    return Layer(path, "rnn", (("hidden_size", 2), ("input_size", 2)))


SGD = OptimizerRecipe(name="SGD", args=(("lr", 0.1),))


def scenario(layers, program, intent=Intent(), optimizer=SGD, steps=2, input_shape=(2,), dtype="float64",
             input_requires_grad=True, micro_batches=1) -> Scenario:
    arch = Architecture(input_shape=input_shape, layers=tuple(layers), program=tuple(Op("call", p) for p in program))
    data = Data(batch=3, seed=1, input_requires_grad=input_requires_grad, loss="mse")
    return Scenario(arch, intent, optimizer, data, steps, micro_batches, dtype)


# hand-written scenarios, by capability
FROZEN_LINEAR = scenario([linear("pre"), linear("enc"), linear("fc")], ["pre", "enc", "fc"],
                         Intent(frozen_modules=("enc",)))
FROZEN_BN = scenario([linear("pre"), linear("enc.lin"), batchnorm("enc.bn"), linear("fc")],
                     ["pre", "enc.lin", "enc.bn", "fc"], Intent(frozen_modules=("enc",)),
                     OptimizerRecipe(name="Adam", args=(("lr", 0.05),)))
FROZEN_AROUND = scenario([linear("enc"), linear("gen")], ["enc", "gen", "enc"], Intent(frozen_modules=("enc",)),
                         OptimizerRecipe(name="SGD", args=(("lr", 0.1), ("momentum", 0.9))), dtype="float32")
PASS = scenario([linear("pre"), linear("fc")], ["pre", "fc", "fc"], Intent(pass_through=(("fc", 1),)))
ELEMENTS_ADAMW = scenario([linear("fc")], ["fc"], Intent(frozen_elements=(("fc.weight", ((0, 1), (1, 0))),)),
                          OptimizerRecipe(name="AdamW", args=(("lr", 0.1),)), steps=3)
ELEMENTS_CLIP = scenario([linear("pre"), linear("fc")], ["pre", "fc"],
                         Intent(frozen_elements=(("fc.weight", ((0, 0),)),)),
                         OptimizerRecipe(name="SGD", args=(("lr", 0.5),), clip="norm", clip_value=0.01))
ELEMENTS_PLAIN = scenario([linear("fc")], ["fc"], Intent(frozen_elements=(("fc.weight", ((1, 1),)),)))
REPARAM_RNN = scenario([rnn("rnn")], ["rnn"], Intent(reparameterized=("rnn",)), input_shape=(3, 2))
REPARAM_LINEAR = scenario([linear("fc"), linear("head")], ["fc", "head"], Intent(reparameterized=("fc",)),
                          OptimizerRecipe(name="RMSprop", args=(("lr", 0.01),)))


# --- tiny hand-written techniques --------------------------------------------------------------

class LeavesGradOff(Technique):
    name = "leaves_grad_off"
    capabilities = frozenset({Capability.FREEZE_MODULE})

    def call(self, module, args, role):
        torch.set_grad_enabled(False)
        return module(*args)


class FlipsRequiresGrad(Technique):
    name = "flips_requires_grad"
    capabilities = frozenset({Capability.FREEZE_MODULE})

    def after_step(self, model, optimizer):
        model.get_submodule("fc").weight.requires_grad_(False)


class RaisesInSetup(Technique):
    name = "raises_in_setup"
    capabilities = frozenset({Capability.FREEZE_MODULE})

    def setup(self, model, intent):
        raise ValueError("cannot freeze this")


class NoGradEverywhere(Technique):
    name = "no_grad_everywhere"
    capabilities = frozenset({Capability.FREEZE_MODULE})

    def call(self, module, args, role):
        with torch.no_grad():
            return module(*args)


def test_grad_mode_left_off_is_a_state_leak_and_is_restored_afterwards():
    assert torch.is_grad_enabled()
    verdict = iso.check(LeavesGradOff, FROZEN_LINEAR)
    assert "state-restored" in verdict.invariants
    leak = next(v for v in verdict.violations if v.invariant == "state-restored")
    assert "grad mode was left off (it was on)" in leak.message and "during step 1" in leak.message
    assert torch.is_grad_enabled()
    # nothing leaked into the next check either
    sound = iso.check(iso.catalog()["freeze_and_eval"], FROZEN_BN)
    assert sound.ok, str(sound)
    assert torch.is_grad_enabled()


def test_requires_grad_flipped_after_step_is_a_state_leak():
    verdict = iso.check(FlipsRequiresGrad(), FROZEN_LINEAR)
    assert "state-restored" in verdict.invariants
    leak = next(v for v in verdict.violations if v.invariant == "state-restored")
    assert leak.message == "fc.weight.requires_grad changed True -> False during step 1"
    assert verdict.first.invariant == "state-restored"  # no crash, so state-restored is the headline


def test_an_exception_in_setup_is_only_a_crash():
    verdict = iso.check(RaisesInSetup, FROZEN_LINEAR)
    assert verdict.invariants == ("no-crash",)
    message = verdict.first.message
    assert "ValueError: cannot freeze this" in message and "setup" in message
    assert verdict.first.step == 0


def test_no_grad_at_every_site_cuts_the_loss_off():
    verdict = iso.check(NoGradEverywhere, FROZEN_LINEAR)
    assert "gradient-flows" in verdict.invariants
    flows = next(v for v in verdict.violations if v.invariant == "gradient-flows")
    assert "the loss has no gradient at step 1" in flows.message
    assert "no-crash" not in verdict.invariants and "state-restored" not in verdict.invariants


def test_the_base_technique_is_not_an_isolation():
    """Doing nothing at all must be caught: the frozen module trains."""
    verdict = iso.check(Technique, FROZEN_LINEAR)
    assert "frozen-unchanged" in verdict.invariants
    assert "enc." in next(v for v in verdict.violations if v.invariant == "frozen-unchanged").message


# --- the catalog -----------------------------------------------------------------------------

SOUND_CASES = [
    ("freeze_and_eval", FROZEN_LINEAR),
    ("freeze_and_eval", FROZEN_BN),
    ("freeze_and_eval", FROZEN_AROUND),
    ("functional_detach", PASS),
    ("toggle_requires_grad", PASS),
    ("parametrize_where", ELEMENTS_ADAMW),
    ("parametrize_where", ELEMENTS_CLIP),
    ("weight_dropout", REPARAM_RNN),
    ("weight_dropout", REPARAM_LINEAR),
    ("parametrize_dropconnect", REPARAM_RNN),
    ("parametrize_dropconnect", REPARAM_LINEAR),
]


@pytest.mark.parametrize("name,s", SOUND_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SOUND_CASES)])
def test_sound_catalog_techniques_pass(name, s):
    technique = iso.catalog()[name]
    assert technique.sound
    verdict = iso.check(technique, s)
    assert verdict.ok, str(verdict)


def test_every_sound_catalog_technique_is_exercised():
    sound = {n for n, t in iso.catalog().items() if t.sound}
    assert sound == {n for n, _ in SOUND_CASES}


BAD_CASES = [
    ("tensor_hook_mask", ELEMENTS_ADAMW, "frozen-unchanged"),
    ("requires_grad_false", FROZEN_BN, None),  # any of its expected violations
    ("optimizer_filter", FROZEN_BN, None),
    ("name_substring", scenario([linear("fc1"), linear("fc10")], ["fc1", "fc10"], Intent(frozen_modules=("fc1",))),
     "trainable-trains"),
    ("weight_dropout_data", REPARAM_RNN, "trainable-trains"),
    ("no_grad_call", PASS, "gradient-flows"),
    ("no_grad_region", FROZEN_LINEAR, "gradient-flows"),
    ("lr_zero_group_seed", FROZEN_LINEAR, "no-crash"),
    ("lr_zero_group", scenario([linear("enc"), linear("fc")], ["enc", "fc"], Intent(frozen_modules=("enc",)),
                               OptimizerRecipe(name="Rprop", args=(("lr", 0.01),))), "frozen-unchanged"),
    ("backward_hook_zero_grad", scenario([linear("fc")], ["fc"], Intent(frozen_elements=(("fc.weight", ((0, 0),)),)),
                                         input_requires_grad=False), "no-crash"),
    ("backward_hook_zero_grad", ELEMENTS_ADAMW, "frozen-unchanged"),
    ("forward_pre_hook_overwrite", ELEMENTS_PLAIN, "frozen-unchanged"),
    ("forward_pre_hook_overwrite", scenario([linear("fc")], ["fc", "fc"],
                                            Intent(frozen_elements=(("fc.weight", ((0, 1),)),))), "no-crash"),
    ("restore_after_step", ELEMENTS_CLIP, "matches-reference"),
]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name,s,invariant", BAD_CASES,
                         ids=[f"{n}-{inv or 'any'}" for n, _, inv in BAD_CASES])
def test_known_bad_catalog_techniques_fail_on_their_trigger(name, s, invariant):
    technique = iso.catalog()[name]
    assert not technique.sound
    verdict = iso.check(technique, s)
    assert not verdict.ok, f"{name} passed a scenario with its trigger"
    # the headline (what a report judges a known-bad technique on) is a declared violation whose
    # documented trigger is present in the scenario; later ones may be its knock-on effects
    headline = verdict.first.invariant
    assert headline in technique.expected_violations, str(verdict)
    condition = entry(name).condition_for(headline)
    assert condition is not None and condition.holds(s), (headline, condition)
    if invariant is not None:
        assert headline == invariant, str(verdict)


def test_every_known_bad_catalog_technique_is_exercised():
    bad = {n for n, t in iso.catalog().items() if not t.sound}
    assert bad == {n for n, _, _ in BAD_CASES}


def test_specific_messages_of_known_bad_techniques():
    v = iso.check(iso.catalog()["tensor_hook_mask"], ELEMENTS_ADAMW).first
    assert v.invariant == "frozen-unchanged"
    assert "fc.weight[" in v.message and "at step 1" in v.message and "AdamW, weight_decay=0.01" in v.message

    s = scenario([linear("fc1"), linear("fc10")], ["fc1", "fc10"], Intent(frozen_modules=("fc1",)))
    v = next(x for x in iso.check(iso.catalog()["name_substring"], s).violations if x.invariant == "trainable-trains")
    assert "fc10." in v.message and "requires_grad=False" in v.message

    v = iso.check(iso.catalog()["weight_dropout_data"], REPARAM_RNN).first
    assert v.invariant == "trainable-trains" and "rnn.weight_hh_l0" in v.message

    v = iso.check(iso.catalog()["lr_zero_group_seed"], FROZEN_LINEAR).first
    assert v.invariant == "no-crash" and v.step == 0
    assert "RuntimeError: Boolean value of Tensor with more than one value is ambiguous" in v.message


# the same known-bad techniques pass when their trigger is absent: the failures above are about the trigger
TRIGGER_ABSENT = [
    ("tensor_hook_mask", ELEMENTS_PLAIN),  # SGD without weight decay
    ("requires_grad_false", FROZEN_LINEAR),  # no BatchNorm or Dropout in the frozen module
    ("name_substring", scenario([linear("fc1"), linear("gc10")], ["fc1", "gc10"], Intent(frozen_modules=("fc1",)))),
    ("weight_dropout_data", scenario([linear("fc")], ["fc"])),  # nothing reparameterized
    # the pass-through call comes first and the input needs no gradient: nothing upstream to cut off
    ("no_grad_call", scenario([linear("fc"), linear("head")], ["fc", "head", "fc"],
                              Intent(pass_through=(("fc", 0),)), input_requires_grad=False)),
    ("lr_zero_group", FROZEN_LINEAR),  # plain SGD, no clipping
    ("restore_after_step", ELEMENTS_PLAIN),  # no clipping
]


@pytest.mark.parametrize("name,s", TRIGGER_ABSENT, ids=[n for n, _ in TRIGGER_ABSENT])
def test_known_bad_catalog_techniques_pass_without_their_trigger(name, s):
    verdict = iso.check(iso.catalog()[name], s)
    assert verdict.ok, str(verdict)


# --- state and crashes outside the steps ---------------------------------------------------

class RaisesInMakeOptimizer(Technique):
    name = "raises_in_make_optimizer"
    capabilities = frozenset({Capability.FREEZE_MODULE})

    def make_optimizer(self, model, intent, build):
        raise TypeError("bad param groups")


class DefaultDtypeInSetup(Technique):
    name = "default_dtype_in_setup"
    capabilities = frozenset({Capability.FREEZE_MODULE})

    def setup(self, model, intent):
        for p in model.get_submodule("enc").parameters():
            p.requires_grad_(False)
        torch.set_default_dtype(torch.float64)  # never restored

    def make_optimizer(self, model, intent, build):
        return build([p for p in model.parameters() if p.requires_grad])


def test_a_crash_in_make_optimizer_is_a_crash():
    verdict = iso.check(RaisesInMakeOptimizer, FROZEN_LINEAR)
    assert verdict.invariants == ("no-crash",)
    assert "TypeError: bad param groups" in verdict.first.message


def test_a_crash_in_make_optimizer_is_not_reported_as_setup():
    message = iso.check(RaisesInMakeOptimizer, FROZEN_LINEAR).first.message
    assert "make_optimizer" in message and "during setup" not in message


def test_default_dtype_left_changed_in_setup_is_restored_by_the_runner():
    assert torch.get_default_dtype() == torch.float32
    iso.check(DefaultDtypeInSetup, FROZEN_AROUND)
    assert torch.get_default_dtype() == torch.float32


def test_default_dtype_left_changed_in_setup_is_a_state_leak():
    verdict = iso.check(DefaultDtypeInSetup, FROZEN_AROUND)
    assert "state-restored" in verdict.invariants
    leak = next(v for v in verdict.violations if v.invariant == "state-restored")
    assert "default dtype changed torch.float32 -> torch.float64 during setup" in leak.message
