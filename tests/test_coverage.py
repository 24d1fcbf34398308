"""The search reaches the whole tree of a user's model, and says so.

Before the random search every target of each capability is judged once (``isolation_suite.judging.coverage``);
a technique whose flaw lives at one place of the tree (a never-called ``nn.ModuleList``, a container
whose children keep training) is caught there whatever the seed, and ``check`` names the coverage.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import isolation_suite as iso
from isolation_suite.engine.check import search, search_line
from isolation_suite.judging.coverage import Coverage, coverage_examples, targets
from isolation_suite.model.factory import factory_name, factory_tree
from isolation_suite.spec.scenario import Data, Intent, OptimizerRecipe, Scenario
from isolation_suite.techniques import entry
from isolation_suite.model.tree import module_tree, reparam_targets

FREEZE = iso.Capability.FREEZE_MODULE


class EvalHookOnFrozenModule(iso.Technique):
    """requires_grad=False, and a forward pre-hook that puts the frozen module itself, not its subtree,
    in eval mode: a frozen container's children keep dropping, and a frozen ``nn.ModuleList`` is never
    called, so its hook never fires."""

    name = "eval_hook_on_frozen_module"
    capabilities = frozenset({FREEZE})

    def setup(self, model, intent):
        for path in intent.frozen_modules:
            module = model.get_submodule(path)
            module.requires_grad_(False)
            module.register_forward_pre_hook(lambda m, args: setattr(m, "training", False))

    def make_optimizer(self, model, intent, build):
        return build([p for p in model.parameters() if p.requires_grad])


def test_every_module_with_parameters_is_a_freeze_target_never_called_containers_included():
    tree = factory_tree("isolation_suite.zoo:multi_head_dict")
    frozen = targets(tree, FREEZE)
    never_called = [n.path for n in tree.nodes if n.path and n.params == () and n.calls == 0
                    and any(m.params for m in tree.inside(n.path))]
    assert never_called and set(never_called) <= set(frozen)  # the ModuleList and the ModuleDict
    root_children = {n.path for n in tree.nodes if n.path and "." not in n.path}
    assert root_children <= set(frozen)
    examples = coverage_examples("isolation_suite.zoo:multi_head_dict", tree, {FREEZE})
    assert [s.intent.frozen_modules[0] for s in examples] == list(frozen)
    assert all(s.dtype == "float64" for s in examples)


@pytest.mark.parametrize("model", ["bert_with_mask", "transformer_encoder_kw"])
def test_a_hook_on_the_frozen_container_alone_is_caught_on_a_real_transformer(model):
    pytest.importorskip("transformers")
    spec = f"isolation_suite.zoo:{model}"
    for seed in (0, 1, 2):
        result = search(EvalHookOnFrozenModule(), max_examples=5, model=spec, seed=seed, shrink=False)
        assert result.failure is not None, search_line(result)
        assert result.failure.first.invariant in ("matches-reference", "gradient-flows"), result.failure
        frozen = result.failure.scenario.intent.frozen_modules[0]
        tree = factory_tree(spec)
        # where it is caught, the frozen module has a dropping module below it (not only itself)
        assert any(n.train_mode and n.path != frozen for n in tree.inside(frozen)), frozen


def test_a_sound_row_reports_every_target_judged():
    result = search(entry("freeze_and_eval").technique(), max_examples=3, model="isolation_suite.zoo:siamese")
    assert result.failure is None
    done, total = result.coverage["freeze targets"]
    assert done == total == len(targets(factory_tree("isolation_suite.zoo:siamese"), FREEZE))
    assert f"freeze targets judged: {total} of {total}" in search_line(result)
    assert result.coverage_examples == total and result.judged >= total


def test_coverage_counts_only_what_was_judged():
    tree = factory_tree("isolation_suite.zoo:siamese")
    coverage = Coverage(tree, {FREEZE, iso.Capability.PASS_THROUGH})
    assert coverage.counts()["freeze targets"][0] == 0
    first = targets(tree, FREEZE)[0]
    coverage.note(Scenario(None, Intent(frozen_modules=(first,)), model="isolation_suite.zoo:siamese"))
    assert coverage.counts()["freeze targets"][0] == 1 and coverage.counts()["pass-through calls"][0] == 0
    assert first not in coverage.missed()["freeze targets"]


# --- shapes that decide where an intent can point -------------------------------------------------

def test_a_layer_whose_weight_is_read_outside_its_call_is_no_reparameterization_target():
    tree = factory_tree("isolation_suite.zoo:tied_head_lm")
    outside = {n.path for n in tree.nodes if n.read_outside}
    assert outside and not outside & set(reparam_targets(tree))

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.b(self.a(x))
    plain = module_tree(Plain(), (torch.randn(1, 2),))
    assert not any(n.read_outside for n in plain.nodes) and reparam_targets(plain) == ["a", "b"]


def _weight_normed():
    from torch.nn.utils import parametrizations
    return nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)), \
        (torch.randn(4, 3),)


def test_a_layer_whose_weight_is_a_parametrization_already_is_no_reparameterization_target():
    """A wrapper (WeightDropout) cannot replace a parametrized weight (``del module.weight`` fails), as
    it cannot keep a read outside the call working: every catalog wrapper would crash there."""
    name = factory_name(_weight_normed)
    tree = factory_tree(name)
    assert tree.node("0").weight_parametrized and reparam_targets(tree) == ["2"]
    for row in ("weight_dropout", "parametrize_dropconnect"):
        (result,) = iso.check_technique(row, devices="cpu", max_examples=3, model=name, seed=0)
        assert result.failure is None and result.coverage["reparameterized layers"] == (1, 1)


def test_gradient_flows_judges_each_input_of_a_two_input_model():
    spec = "isolation_suite.zoo:siamese"
    s = Scenario(None, Intent(pass_through=(("encoder", 1),)), OptimizerRecipe("SGD", (("lr", 0.1),)),
                 Data(1, 0, True, "mse"), 1, 1, "float64", 0, spec)
    verdict = iso.check(entry("no_grad_call").technique(), s)
    assert verdict.first.invariant == "gradient-flows" and verdict.first.message.startswith("input 1 got"), verdict
    assert iso.check(entry("functional_detach").technique(), s).ok
