"""Real module trees: containers run their children, the harness reaches in only where an intent
points, and techniques that hook, wrap, replace or checkpoint a *container* get the verdict they
would get in hand-written PyTorch code."""
import torch
import torch.utils.checkpoint
from torch import nn

import isolation_suite as iso
from isolation_suite.model.build import build_model
from isolation_suite.model.factory import factory_name
from isolation_suite.execution.reference import Reference
from isolation_suite.execution.runner import run
from isolation_suite.spec.scenario import (Architecture, Container, Data, Intent, Layer, Op, OptimizerRecipe, Scenario,
                                      ScenarioError, chain)
from isolation_suite.technique import Capability, Role, Technique
from isolation_suite.model.tree import Router, architecture_tree, module_tree, roles

FREEZE = frozenset({Capability.FREEZE_MODULE})
PASS = frozenset({Capability.PASS_THROUGH})


def linear(path, n=2):
    return Layer(path, "linear", (("bias", True), ("in_features", n), ("out_features", n)))


def batchnorm(path):
    return Layer(path, "batchnorm1d", (("num_features", 2),))


def scenario(arch, intent, *, steps=2, input_requires_grad=True, optimizer=None):
    return Scenario(arch, intent, optimizer or OptimizerRecipe("Adam", (("lr", 0.05),)),
                    Data(batch=4, seed=3, input_requires_grad=input_requires_grad, loss="mse"), steps, 1, "float64")


#: pre > enc[lin > bn] > fc, with the container ``enc`` frozen
ENC_BN = scenario(chain((2,), [linear("pre"), linear("enc.lin"), batchnorm("enc.bn"), linear("fc")],
                        ["pre", "enc.lin", "enc.bn", "fc"]), Intent(frozen_modules=("enc",)))
#: enc > gen > enc: one container called before and after another, its second call passed through
SANDWICH = scenario(chain((2,), [linear("enc.0"), linear("gen.0")], ["enc.0", "gen.0", "enc.0"]),
                    Intent(pass_through=(("enc", 1),)))


# --- the tree is real --------------------------------------------------------------------------

def test_containers_are_modules_whose_forward_calls_their_children():
    model = build_model(ENC_BN)
    assert [name for name, _ in model.named_children()] == ["pre", "enc", "fc"]
    assert set(dict(model.named_modules())) == {"", "pre", "enc", "enc.lin", "enc.bn", "fc"}
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, a, p=p: calls.append(p)) for p, m in model.named_modules() if p]
    model(torch.randn(4, 2, dtype=torch.float64))
    assert calls == ["pre", "enc", "enc.lin", "enc.bn", "fc"]
    for h in hooks:
        h.remove()


def test_every_container_kind_builds_and_runs():
    arch = Architecture(
        (2,), (linear("seq.0"), linear("seq.1"), linear("res.0"), linear("stack.0"), linear("stack.1"),
               linear("blk.fc")),
        (Op("call", "seq"), Op("call", "res"), Op("loop", "stack"), Op("call", "blk")),
        containers=(Container("seq", "sequential", (Op("call", "seq.0"), Op("call", "seq.1"))),
                    Container("res", "residual", (Op("call", "res.0"),)),
                    Container("stack", "modulelist", (Op("call", "stack.0"), Op("call", "stack.1"))),
                    Container("blk", "block", (Op("call", "blk.fc"), Op("act", "relu"), Op("call", "blk.fc")))))
    model = build_model(scenario(arch, Intent()))
    assert isinstance(model.seq, nn.Sequential) and isinstance(model.stack, nn.ModuleList)
    tree = architecture_tree(arch)
    assert tree.node("stack").calls == 0 and tree.node("stack.1").calls == 1 and tree.node("blk.fc").calls == 2
    assert tree.routed("stack") == ["stack.0", "stack.1"]
    x = torch.randn(3, 2, dtype=torch.float64)
    with torch.no_grad():
        seq = model.seq[1](model.seq[0](x))
        res = seq + model.res[0](seq)
        stack = model.stack[1](model.stack[0](res))
        expected = model.blk.fc(torch.relu(model.blk.fc(stack)))
        torch.testing.assert_close(model(x), expected)
    # the tree a probe forward records agrees with the one computed from the spec
    probed = module_tree(build_model(scenario(arch, Intent())), (x,))
    assert probed.counts() == {**tree.counts(), "": 0}


def test_a_container_program_must_call_direct_children():
    try:
        Architecture((2,), (linear("enc.lin"),), (Op("call", "enc.lin"),))
    except ScenarioError as exc:
        assert "direct children" in str(exc)
    else:
        raise AssertionError("a call that skips its container was accepted")


def test_interception_leaves_paths_state_dict_repr_and_user_hooks_alone():
    model = build_model(ENC_BN)
    fired = []
    model.enc.register_forward_pre_hook(lambda m, a: fired.append("pre"))
    before = (list(model.state_dict()), repr(model), type(model.enc).__name__, dict(model.enc._forward_pre_hooks))
    seen = []
    router = Router(model, roles(architecture_tree(ENC_BN.architecture), ENC_BN.intent),
                    lambda site, module, args: seen.append(site) or module(*args))
    assert (list(model.state_dict()), repr(model), type(model.enc).__name__,
            dict(model.enc._forward_pre_hooks)) == before
    assert isinstance(model.enc, type(build_model(ENC_BN).enc))
    x = torch.randn(4, 2, dtype=torch.float64)
    model(x)  # outside a forward phase: a plain call
    assert seen == [] and fired == ["pre"]
    with router.forward():
        model(x)
    assert [(s.path, s.use, s.role) for s in seen] == [("enc", 0, Role.FROZEN)] and fired == ["pre", "pre"]
    router.close()
    with router.forward():
        model(x)
    assert len(seen) == 1


# --- techniques acting on containers, as in user code ---------------------------------------------

class FreezeWithEvalHook(Technique):
    """requires_grad_(False) on the frozen container and a forward pre-hook on it that puts it in
    eval mode (sound in any real model: the hook runs at every call of the container)."""
    name = "eval_pre_hook"
    capabilities = FREEZE

    def setup(self, model, intent):
        for path in intent.frozen_modules:
            module = model.get_submodule(path)
            module.requires_grad_(False)
            module.register_forward_pre_hook(_to_eval)


def _to_eval(module, args):
    module.eval()  # and return None: a pre-hook's return value would replace the arguments


class FreezeWithoutEval(Technique):
    name = "requires_grad_only"
    capabilities = FREEZE

    def setup(self, model, intent):
        for path in intent.frozen_modules:
            model.get_submodule(path).requires_grad_(False)


class NoGradWrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        self.inner.eval()
        with torch.no_grad():
            return self.inner(x)


class EvalWrapper(NoGradWrapper):
    def forward(self, x):
        self.inner.eval()
        return self.inner(x)


class ReplaceWith(Technique):
    capabilities = FREEZE
    wrapper = EvalWrapper

    def setup(self, model, intent):
        for path in intent.frozen_modules:
            parent, _, name = path.rpartition(".")
            module = model.get_submodule(path)
            module.requires_grad_(False)
            setattr(model.get_submodule(parent) if parent else model, name, self.wrapper(module))


class ReplaceWithEvalWrapper(ReplaceWith):
    name = "replace_with_eval_wrapper"


class ReplaceWithNoGradWrapper(ReplaceWith):
    name = "replace_with_no_grad_wrapper"
    wrapper = NoGradWrapper


class CheckpointFrozen(Technique):
    """The frozen container's call under activation checkpointing, in eval mode, parameters off."""
    name = "checkpoint_frozen"
    capabilities = FREEZE
    reentrant = False

    def setup(self, model, intent):
        for path in intent.frozen_modules:
            model.get_submodule(path).requires_grad_(False)

    def call(self, module, args, role):
        if role is Role.FROZEN:
            module.eval()
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=self.reentrant)
        return module(*args)


class ReentrantCheckpointFrozen(CheckpointFrozen):
    name = "reentrant_checkpoint_frozen"
    reentrant = True


def hand_written_running_mean(technique):
    """The frozen BatchNorm's running mean after the technique's setup and two training steps, in a
    plain PyTorch loop (no harness): what the verdict must agree with."""
    model = build_model(ENC_BN)
    technique.setup(model, ENC_BN.intent)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        model.train()
        opt.zero_grad()
        model(torch.randn(4, 2, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()
    return model.get_submodule("enc").get_submodule("inner.bn" if hasattr(model.enc, "inner") else "bn").running_mean


def test_a_pre_hook_on_the_frozen_container_is_seen_and_sound():
    assert torch.equal(hand_written_running_mean(FreezeWithEvalHook()), torch.zeros(2, dtype=torch.float64))
    verdict = iso.check(FreezeWithEvalHook, ENC_BN)
    assert verdict.ok, str(verdict)


def test_without_the_hook_the_container_trains_its_batchnorm_and_is_caught():
    assert not torch.equal(hand_written_running_mean(FreezeWithoutEval()), torch.zeros(2, dtype=torch.float64))
    verdict = iso.check(FreezeWithoutEval, ENC_BN)
    assert verdict.first.invariant == "frozen-unchanged" and "enc.bn.running_mean" in verdict.first.message


def test_a_wrapper_that_replaces_the_frozen_container():
    assert torch.equal(hand_written_running_mean(ReplaceWithEvalWrapper()), torch.zeros(2, dtype=torch.float64))
    assert iso.check(ReplaceWithEvalWrapper, ENC_BN).ok
    verdict = iso.check(ReplaceWithNoGradWrapper, ENC_BN)
    assert verdict.first.invariant == "gradient-flows", str(verdict)  # no_grad cuts `pre` off


def test_checkpointing_the_frozen_container():
    assert iso.check(CheckpointFrozen, ENC_BN).ok
    # a reentrant checkpoint passes gradient only to inputs that need it; the input of `enc` comes
    # from the trainable `pre`, so the frozen container still lets gradient through
    assert iso.check(ReentrantCheckpointFrozen, ENC_BN).ok


def test_pass_through_of_a_container_call():
    assert iso.check(iso.catalog()["functional_detach"], SANDWICH).ok
    assert iso.check(iso.catalog()["toggle_requires_grad"], SANDWICH).ok
    verdict = iso.check(iso.catalog()["no_grad_call"], SANDWICH)
    assert verdict.first.invariant == "gradient-flows", str(verdict)


def test_freezing_a_module_list_reaches_each_of_its_children():
    arch = Architecture((2,), (linear("pre"), linear("layers.0"), batchnorm("layers.1"), linear("head")),
                        (Op("call", "pre"), Op("loop", "layers"), Op("call", "head")),
                        containers=(Container("layers", "modulelist",
                                              (Op("call", "layers.0"), Op("call", "layers.1"))),))
    s = scenario(arch, Intent(frozen_modules=("layers",)))
    assert iso.check(iso.catalog()["freeze_and_eval"], s).ok
    assert iso.check(iso.catalog()["no_grad_region"], s).first.invariant == "gradient-flows"
    assert iso.check(iso.catalog()["requires_grad_false"], s).first.invariant == "frozen-unchanged"


# --- the user's own modules ------------------------------------------------------------------------

class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x, *, scale):
        return self.lin(x) * scale


class KeywordModel(nn.Module):
    """A parent that calls a child with a keyword argument, and a forward hook the user registered."""

    def __init__(self):
        super().__init__()
        self.pre, self.block, self.head = nn.Linear(3, 3), Scaled(), nn.Linear(3, 2)
        self.hook_calls = 0
        self.block.register_forward_hook(self._count)

    def _count(self, module, args, out):
        self.hook_calls += 1

    def forward(self, x):
        return self.head(self.block(self.pre(x), scale=2.0))


def keyword_factory():
    return KeywordModel(), (torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),)


def test_keyword_arguments_reach_the_module_through_the_technique():
    spec = factory_name(keyword_factory)
    s = Scenario(None, Intent(frozen_modules=("block",)), OptimizerRecipe("SGD", (("lr", 0.1),)),
                 Data(1, 0, True, "mse"), 2, 1, "float64", 0, spec)
    assert iso.check(iso.catalog()["freeze_and_eval"], s).ok
    assert iso.check(iso.catalog()["no_grad_region"], s).first.invariant == "gradient-flows"
    trace = run(s, Reference())
    assert trace.crash is None and len(trace.steps) == 2


def _sum_loss(out, target):
    return out.sum()  # its input gradient is the weight, whatever the target


def tiny_linear_factory():
    return nn.Linear(3, 1, bias=False), (torch.ones(2, 3),), _sum_loss


def test_each_step_gets_a_fresh_input_gradient_from_the_one_example_batch():
    """A factory gives one batch for every step: its gradient must not pile up across steps."""
    s = Scenario(None, Intent(frozen_elements=(("weight", ((0, 0),)),)), OptimizerRecipe("SGD", (("lr", 1e-9),)),
                 Data(1, 0, True, "mse"), 3, 2, "float64", 0, factory_name(tiny_linear_factory))
    trace = run(s, Reference())
    grads = [g for step in trace.steps for g in step.input_grads]
    assert len(grads) == 6 and grads[0].abs().max() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-6, atol=0)
