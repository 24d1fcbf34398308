"""A mode's own effects are not the technique's fault: what a checkpoint does by itself (an output
structure a reentrant checkpoint cannot see through, buffers updated again by the recomputation,
rounding noise summed in another order) is absorbed by the harness, while what a technique does
differently under the mode is still caught."""
from __future__ import annotations

import copy
import dataclasses
import types

import pytest
import torch
from torch import nn

import isolation_suite as iso
from isolation_suite.execution import modes
from isolation_suite.judging.invariants import Context, evaluate, matches_reference
from isolation_suite.judging.judge import reference_trace
from isolation_suite.model.factory import factory_name
from isolation_suite.spec.scenario import Change, Data, Intent, Mode, OptimizerRecipe, Scenario
from isolation_suite.techniques import triggers
from isolation_suite.model.tree import Router


def _state(model: nn.Module) -> tuple[modes.ForwardState, Router]:
    """A ForwardState as the runner makes it, over a router that intercepts nothing."""
    router = Router(model, {}, lambda *args: None)
    return modes.ForwardState(lambda: router, types.SimpleNamespace(uses={})), router


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# --- an output that is not a tensor ---------------------------------------------------------

class DictNet(nn.Module):
    """Heads in a dict, with non-tensor entries, as a ``ModelOutput`` carries them."""

    def __init__(self):
        super().__init__()
        self.pre, self.enc, self.head = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x, scale=1.0):
        h = self.enc(torch.tanh(self.pre(x)))
        return {"logits": self.head(h) * scale, "hidden": [h], "past": None, "layers": 2}


def dict_net():
    return DictNet(), (torch.randn(3, 2),)


def _dict_loss(out) -> torch.Tensor:
    return out["logits"].pow(2).sum() + out["hidden"][0].sum()


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_checkpointed_dict_output_gets_eager_gradients_and_keeps_its_other_entries(reentrant):
    torch.manual_seed(0)
    eager = DictNet().double()
    model = copy.deepcopy(eager)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    state, router = _state(model)
    modes.checkpoint_module(model, reentrant, state)
    with router.forward():
        out = model(x, scale=2.0)  # a keyword argument still reaches the forward
    _dict_loss(out).backward()
    expected = eager(x.detach(), scale=2.0)
    _dict_loss(expected).backward()
    assert out["past"] is None and out["layers"] == 2 and isinstance(out["hidden"], list)
    torch.testing.assert_close(out["logits"], expected["logits"], rtol=0, atol=0)
    for name, grad in _grads(eager).items():
        torch.testing.assert_close(_grads(model)[name], grad, rtol=0, atol=0)
    router.close()


def test_a_whole_model_reentrant_checkpoint_over_a_dict_output_trains():
    """A sound freeze over a model whose forward returns a dict: the loss has the real gradient."""
    scenario = Scenario(None, Intent(frozen_modules=("enc",)), OptimizerRecipe("SGD", (("lr", 0.1),)),
                        Data(batch=3, seed=1, input_requires_grad=True, loss="mse"), steps=2, dtype="float64",
                        model=factory_name(dict_net), mode=Mode("checkpoint", "", reentrant=True))
    verdict = iso.check(iso.catalog()["freeze_and_eval"], scenario)
    assert verdict.ok, str(verdict)


# --- buffers the recomputation updates again --------------------------------------------------

def _batchnorm_net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Tanh()),
                         nn.Linear(2, 2)).double()


@pytest.mark.parametrize("reentrant", [True, False])
def test_the_recomputation_leaves_the_buffers_as_eager_leaves_them(reentrant):
    torch.manual_seed(0)
    eager = _batchnorm_net()
    model = copy.deepcopy(eager)
    state, router = _state(model)
    modes.checkpoint_module(model[1], reentrant, state)
    for _ in range(2):  # two micro-batches: the second forward starts from the first one's statistics
        x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
        with router.forward():
            out = model(x)
        out.pow(2).sum().backward()
        eager(x.detach()).pow(2).sum().backward()
    for (name, buffer), (_, expected) in zip(model.named_buffers(), eager.named_buffers()):
        assert torch.equal(buffer, expected), name
    for name, grad in _grads(eager).items():
        torch.testing.assert_close(_grads(model)[name], grad, rtol=0, atol=0)
    router.close()


#: a BatchNorm inside the checkpointed container trains at step 1, a schedule freezes it at step 2,
#: from where it normalises with the running statistics step 1 left
BATCHNORM_FROZEN_LATER = dataclasses.replace(
    triggers.scenario([triggers.linear("pre"), triggers.linear("enc.lin"), triggers.batchnorm("enc.bn"),
                       triggers.linear("fc")], ["pre", "enc.lin", "enc.bn", "fc"], Intent(), steps=3),
    schedule=(Change(2, ("enc.bn",)),))


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_batchnorm_frozen_by_a_schedule_under_a_checkpoint_holds(reentrant):
    scenario = dataclasses.replace(BATCHNORM_FROZEN_LATER, mode=Mode("checkpoint", "enc", reentrant))
    verdict = iso.check(iso.catalog()["unfreeze_add_param_group"], scenario)
    assert verdict.ok, str(verdict)


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_frozen_batchnorm_left_training_under_a_checkpoint_is_still_caught(reentrant):
    """The forward's own update of the statistics is the technique's doing, and stays."""
    scenario = dataclasses.replace(triggers.FROZEN_BATCHNORM, mode=Mode("checkpoint", "enc", reentrant))
    verdict = iso.check(iso.catalog()["requires_grad_false"], scenario)
    assert "frozen-unchanged" in verdict.invariants, str(verdict)
    assert "buffer enc.bn.running_mean" in str(verdict)


# --- rounding noise on a gradient that is zero in exact arithmetic -----------------------------

def test_modes_declare_whether_they_round_as_eager():
    assert [m.kind for m in modes.MODE_INFOS if m.same_rounding] == ["eager", "autocast"]


def _noisy_pair(scenario: Scenario):
    """The reference's trace twice, ``pre.bias[0]``'s gradient rounding noise of its own in each, and
    the technique's copy moved the other way by an optimizer that follows the noise's sign."""
    reference = copy.deepcopy(reference_trace(dataclasses.replace(scenario, mode=Mode())))
    technique = copy.deepcopy(reference)
    for trace, noise in ((technique, 3e-17), (reference, -2e-17)):
        for record in trace.steps:
            record.grads["pre.bias"] = record.grads["pre.bias"].clone()
            record.grads["pre.bias"][0] = noise
    technique.steps[1].params["pre.bias"][0] += 0.02
    return technique, reference


def test_an_aimless_entry_is_set_aside_under_a_checkpoint_and_a_real_difference_is_not():
    checkpointed = dataclasses.replace(triggers.FROZEN_LINEAR, mode=Mode("checkpoint", "", reentrant=False))
    technique, reference = _noisy_pair(checkpointed)
    assert evaluate(Context(checkpointed, technique, reference)) == []
    # eager rounds as the reference does: the same move there is a difference
    eager = dataclasses.replace(checkpointed, mode=Mode())
    assert "pre.bias[0]" in matches_reference(Context(eager, technique, reference)).message
    technique.steps[1].grads["pre.bias"][0] = 0.5  # with a gradient, the move is a difference in any mode
    violation = matches_reference(Context(checkpointed, technique, reference))
    assert "pre.bias[0]" in violation.message and "after step 2" in violation.message
