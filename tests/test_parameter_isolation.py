"""Isolation belongs to the parameter: a frozen module's parameters (and frozen entries) are
constants wherever they are read, and the contract hands a technique the call's keyword arguments.

The reference is checked against closed-form gradients on a model that reads a frozen parameter
outside its owner's call; the catalog's sound rows hold there, where a call-level oracle flagged
them; a technique that checkpoints inside ``call`` recomputes with the call's keyword arguments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import isolation_suite as iso
from isolation_suite.model.factory import factory_name
from isolation_suite.execution.reference import Reference
from isolation_suite.execution.runner import TechniqueDriver, run, takes_keywords
from isolation_suite.spec.scenario import Data, Intent, OptimizerRecipe, Scenario
from isolation_suite.techniques import entry
from isolation_suite.model.tree import freeze_targets, module_tree


class ReadsOutside(nn.Module):
    """``enc.weight`` is read in ``enc``'s own call and again by ``F.linear`` outside it."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.enc(x))) + F.linear(x, self.enc.weight)[:, :2]


def reads_outside():
    return ReadsOutside(), (torch.randn(4, 3, generator=torch.Generator().manual_seed(7)),)


class TiedHead(nn.Module):
    """A GPT-style head: the logits are ``F.linear(h, wte.weight)``, no head module of its own."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(6, 4)
        self.trunk = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))

    def forward(self, tokens):
        return F.linear(self.trunk(self.wte(tokens)), self.wte.weight)


def tied_head():
    return TiedHead(), (torch.randint(0, 6, (2, 3), generator=torch.Generator().manual_seed(8)),)


def scenario(factory, intent, optimizer=OptimizerRecipe("SGD", (("lr", 0.1),)), steps=2, dtype="float64"):
    return Scenario(None, intent, optimizer, Data(1, 3, True, "mse"), steps, 1, dtype, 0, factory_name(factory))


CLIP = OptimizerRecipe("SGD", (("lr", 0.1),), clip="norm", clip_value=0.1)


def test_a_frozen_parameter_read_outside_its_module_is_a_constant_there_too():
    s = scenario(reads_outside, Intent(frozen_modules=("enc",)), CLIP, steps=1)
    trace = run(s, Reference())
    W, b = trace.initial_params["enc.weight"], trace.initial_params["enc.bias"]
    H, c = trace.initial_params["head.weight"], trace.initial_params["head.bias"]
    x = reads_outside()[1][0].double()
    h = torch.tanh(x @ W.T + b)
    y = h @ H.T + c + (x @ W.T)[:, :2]
    record = trace.steps[0]
    assert record.grads["enc.weight"] is None and record.grads["enc.bias"] is None
    g = 2 * (y - _target(y)) / y.numel()  # d mse / dy
    dH, dc = g.T @ h, g.sum(0)
    # the clipping norm counts the head's gradients only: nothing of the frozen weight enters it
    norm = torch.cat([dH.flatten(), dc]).norm()
    scale = min(1.0, 0.1 / (float(norm) + 1e-6))
    torch.testing.assert_close(record.grads["head.weight"], dH * scale, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(record.params["head.weight"], H - 0.1 * dH * scale, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(record.params["enc.weight"], W, rtol=0, atol=0)
    # the input's gradient crosses both reads of the frozen weight
    dx = (g @ H * (1 - h ** 2)) @ W + g @ W[:2]
    torch.testing.assert_close(record.input_grads[0], dx, rtol=1e-10, atol=1e-12)


def test_sound_rows_hold_where_a_frozen_parameter_is_read_outside_its_call():
    for name in ("freeze_and_eval", "requires_grad_false", "optimizer_filter"):
        technique = entry(name).technique()
        for recipe in (CLIP, OptimizerRecipe("AdamW", (("lr", 0.01),), clip="norm", clip_value=0.1)):
            verdict = iso.check(technique, scenario(reads_outside, Intent(frozen_modules=("enc",)), recipe))
            assert verdict.ok, verdict
    # and a technique that does not freeze the parameter is caught (the oracle has teeth)
    verdict = iso.check(iso.Technique(), scenario(reads_outside, Intent(frozen_modules=("enc",)), CLIP))
    assert "frozen-unchanged" in verdict.invariants


def test_frozen_entries_read_outside_their_module_never_move():
    s = scenario(reads_outside, Intent(frozen_elements=(("enc.weight", ((0, 0), (1, 2))),)))
    trace = run(s, Reference())
    for record in trace.steps:
        assert float(record.grads["enc.weight"][0, 0]) == 0.0 and float(record.grads["enc.weight"][1, 2]) == 0.0
        assert float(record.grads["enc.weight"][2, 2]) != 0.0
        assert torch.equal(record.params["enc.weight"][0, 0], trace.initial_params["enc.weight"][0, 0])
    assert iso.check(entry("parametrize_where").technique(), s).ok
    assert not iso.check(entry("tensor_hook_mask").technique(), scenario(
        reads_outside, s.intent, OptimizerRecipe("AdamW", (("lr", 0.01),)))).ok


def test_freezing_one_name_of_a_tie_freezes_the_parameter_everywhere():
    tree = module_tree(*tied_head())
    assert "wte" in freeze_targets(tree)
    s = scenario(tied_head, Intent(frozen_modules=("wte",)), CLIP)
    trace = run(s, Reference())
    assert all(record.grads["wte.weight"] is None for record in trace.steps)
    assert iso.check(entry("freeze_and_eval").technique(), s).ok
    assert "frozen-unchanged" in iso.check(iso.Technique(), s).invariants


# --- keyword arguments in the contract --------------------------------------------------------

class KeywordCalls(nn.Module):
    """Submodules called with keyword arguments, as transformer code calls its layers."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.block = Scaled()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(self.block(a, scale=3.0)).mean(1)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, scale=1.0):
        return torch.tanh(self.proj(x) * scale)  # tanh saves its output: a recomputation must see scale


def keyword_calls():
    return KeywordCalls(), (torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9)),)


class CheckpointInCall(entry("freeze_and_eval").technique):
    """freeze_and_eval, each intercepted call run under a non-reentrant checkpoint (as a library
    that checkpoints its layers does): the recomputation must see the call's keyword arguments."""

    name = "checkpoint_in_call"

    def call(self, module, args, role, kwargs):
        return checkpoint(module, *args, use_reentrant=False, **kwargs)


class CheckpointInLegacyCall(CheckpointInCall):
    name = "checkpoint_in_legacy_call"

    def call(self, module, args, role):
        return checkpoint(module, *args, use_reentrant=False)


def test_call_receives_the_keyword_arguments_and_a_checkpoint_inside_it_recomputes_with_them():
    assert takes_keywords(CheckpointInCall()) and not takes_keywords(CheckpointInLegacyCall())
    for frozen in ("attn", "block"):
        s = scenario(keyword_calls, Intent(frozen_modules=(frozen,)))
        assert iso.check(CheckpointInCall(), s).ok
    # the older three-argument call still runs (the keyword arguments reach the module's own call) ...
    seen = []

    class Legacy(iso.Technique):
        capabilities = frozenset({iso.Capability.FREEZE_MODULE})

        def call(self, module, args, role):
            seen.append(role)
            return module(*args)
    out = run(scenario(keyword_calls, Intent(frozen_modules=("block",))), TechniqueDriver(Legacy()))
    assert out.crash is None and seen
    # ... but a recomputation outside the call cannot have them: scale=3.0 became the default 1.0
    verdict = iso.check(CheckpointInLegacyCall(), scenario(keyword_calls, Intent(frozen_modules=("block",))))
    assert not verdict.ok


def test_the_reference_passes_keyword_arguments_through_a_pass_through_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Scaled()

        def forward(self, x):
            return self.block(self.block(x, scale=2.0), scale=0.5)

    def twice():
        return Twice(), (torch.randn(3, 4, generator=torch.Generator().manual_seed(1)),)
    s = scenario(twice, Intent(pass_through=(("block", 1),)))
    trace = run(s, Reference())
    W, b = trace.initial_params["block.proj.weight"], trace.initial_params["block.proj.bias"]
    x = twice()[1][0].double()
    h = torch.tanh((x @ W.T + b) * 2.0)
    y = torch.tanh((h @ W.T + b) * 0.5)
    torch.testing.assert_close(trace.steps[0].losses[0], F.mse_loss(y, _target(y)), rtol=1e-12, atol=1e-14)
    for name in ("functional_detach", "toggle_requires_grad"):
        assert iso.check(entry(name).technique(), s).ok


def _target(y):
    from isolation_suite.model.factory import target_like
    from isolation_suite.execution.runner import LOSS_SITE, site_seed
    return target_like(y, site_seed(3, 1, 0, LOSS_SITE))
