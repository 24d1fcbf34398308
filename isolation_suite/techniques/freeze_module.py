"""Seeds 002 and 003: freeze whole sub-modules."""
from __future__ import annotations

import types

import torch

from isolation_suite.technique import Capability, Role, Technique
from isolation_suite.techniques._util import frozen_parameters

FREEZE = frozenset({Capability.FREEZE_MODULE})
#: what a frozen module left in training mode breaks: BatchNorm updates its running stats
#: (frozen-unchanged), normalises with batch statistics, which zeroes the gradient of a
#: per-channel shift upstream (gradient-flows), and Dropout drops (matches-reference)
TRAIN_MODE_BREAKS = frozenset({"frozen-unchanged", "gradient-flows", "matches-reference"})
#: what ``requires_grad = False`` breaks under a reentrant checkpoint fed only by frozen modules: the
#: region gets no gradient (trainable-trains), or backward raises when nothing else reaches the loss
#: (pytorch#7617, transformers#21381, open_clip#573)
STARVES_REENTRANT_CHECKPOINT = {"checkpoint": frozenset({"trainable-trains", "no-crash"})}
#: what a parameter that DistributedDataParallel reduces and that gets no gradient breaks under DDP's
#: defaults (find_unused_parameters=False, static_graph=False): its bucket is never reduced, so the
#: other gradients in it stay one rank's own (matches-reference), and the next forward raises
#: 'Expected to have finished reduction in the prior iteration' (no-crash)
LEAVES_DDP_BUCKET_UNREDUCED = {"ddp": frozenset({"no-crash", "matches-reference"})}


class RequiresGradFalse(Technique):
    name = "requires_grad_false"
    seed = "002, 003"
    capabilities = FREEZE
    # model.train() still switches the frozen module to training mode:
    # BatchNorm updates its running stats, Dropout drops
    expected_violations = TRAIN_MODE_BREAKS
    mode_violations = STARVES_REENTRANT_CHECKPOINT
    summary = "param.requires_grad = False for the frozen module"

    def setup(self, model, intent):
        for param in frozen_parameters(model, intent):
            param.requires_grad = False


class OptimizerFilter(RequiresGradFalse):
    name = "optimizer_filter"
    seed = "002"
    summary = "requires_grad = False plus optim.SGD(filter(lambda p: p.requires_grad, ...))"

    def make_optimizer(self, model, intent, build):
        return build(filter(lambda p: p.requires_grad, model.parameters()))


def _stay_in_eval(self, mode=True):
    return self


class FreezeAndEval(OptimizerFilter):
    name = "freeze_and_eval"
    seed = ""
    expected_violations = frozenset()
    summary = "requires_grad = False, eval(), and a train() that keeps the frozen module in eval"

    def setup(self, model, intent):
        super().setup(model, intent)
        for path in intent.frozen_modules:
            frozen = model.get_submodule(path)
            frozen.eval()
            frozen.train = types.MethodType(_stay_in_eval, frozen)


class FreezeAfterWrap(FreezeAndEval):
    name = "freeze_after_wrap"
    seed = "pytorch#22049, ClassyVision#398"
    # DDP builds its reducer over the parameters that require grad when it wraps the model: one
    # frozen afterwards is still expected to get a gradient in every backward
    ddp_wrap = "before_setup"
    mode_violations = {**STARVES_REENTRANT_CHECKPOINT, **LEAVES_DDP_BUCKET_UNREDUCED}
    summary = "freeze_and_eval's freezing, done after the model was wrapped in DistributedDataParallel"


def _output_requires_grad(module, args, output):
    """A frozen module's output that needs no gradient (a leaf: nothing upstream trains) is made to
    need it, so a reentrant checkpoint downstream still records its region."""
    outputs = output if isinstance(output, tuple) else (output,)
    for out in outputs:
        if isinstance(out, torch.Tensor) and out.is_floating_point() and not out.requires_grad \
                and out.grad_fn is None and torch.is_grad_enabled():
            out.requires_grad_(True)
    return output


class FreezeEnableInputGrads(FreezeAndEval):
    name = "freeze_enable_input_grads"
    seed = "transformers#21381"
    mode_violations = {}
    summary = ("freeze_and_eval plus a forward hook that makes each frozen module's output need gradient "
               "(transformers' enable_input_require_grads), so a reentrant checkpoint downstream still trains")

    def setup(self, model, intent):
        super().setup(model, intent)
        for path in intent.frozen_modules:
            model.get_submodule(path).register_forward_hook(_output_requires_grad)


class LrZeroGroupSeed(Technique):
    name = "lr_zero_group_seed"
    seed = "002"
    capabilities = FREEZE
    # `p not in <generator of tensors>` compares tensors with ==: a shape mismatch or an
    # ambiguous bool crashes; with single-element parameters it partitions by value and
    # then behaves like lr_zero_group
    expected_violations = frozenset({"no-crash"}) | TRAIN_MODE_BREAKS
    summary = "the seed's groups: {'params': trained, 'lr': lr}, {filter(p not in trained), 'lr': 0}"

    def make_optimizer(self, model, intent, build):
        def trained():  # plays the part of the seed's net.fc1.parameters()
            return (p for n, p in model.named_parameters() if not intent.is_frozen_param(n))
        return build([
            {"params": trained()},
            {"params": filter(lambda p: p.requires_grad and p not in trained(), model.parameters()), "lr": 0.0},
        ])


class LrZeroGroup(Technique):
    name = "lr_zero_group"
    seed = "002"
    capabilities = FREEZE
    # lr=0 is not "frozen": OneCycleLR rewrites every group's lr, Rprop's step size is clamped
    # to at least 1e-6, BatchNorm still updates, and the frozen gradients still count in clipping
    expected_violations = TRAIN_MODE_BREAKS
    summary = "identity-based param groups, frozen group at lr=0"

    def make_optimizer(self, model, intent, build):
        frozen = {id(p) for p in frozen_parameters(model, intent)}
        params = list(model.parameters())
        return build([
            {"params": [p for p in params if id(p) not in frozen]},
            {"params": [p for p in params if id(p) in frozen], "lr": 0.0},
        ])


class NoGradRegion(Technique):
    name = "no_grad_region"
    seed = "002"
    capabilities = FREEZE
    # no_grad cuts the graph (nothing upstream trains), and BatchNorm still updates under it
    expected_violations = TRAIN_MODE_BREAKS
    # the frozen module's parameters still require grad when DDP wraps the model, and get none
    mode_violations = {**STARVES_REENTRANT_CHECKPOINT, **LEAVES_DDP_BUCKET_UNREDUCED}
    summary = "the frozen module's forward under torch.no_grad()"

    def call(self, module, args, role, kwargs):
        if role is Role.FROZEN:
            with torch.no_grad():
                return module(*args, **kwargs)
        return module(*args, **kwargs)

    def make_optimizer(self, model, intent, build):
        return build(filter(lambda p: p.requires_grad, model.parameters()))


class NameSubstring(Technique):
    name = "name_substring"
    seed = "003"
    capabilities = FREEZE
    # 'fc1' in 'fc10.weight' is True: the substring test freezes neighbours by accident
    expected_violations = frozenset({"trainable-trains"}) | TRAIN_MODE_BREAKS
    # under ddp, a collision that freezes every parameter leaves DDP nothing to wrap: it raises
    mode_violations = {**STARVES_REENTRANT_CHECKPOINT, "ddp": frozenset({"no-crash"})}
    summary = "requires_grad = False where the frozen name is a substring of the parameter name"

    def setup(self, model, intent):
        for name, param in model.named_parameters():
            if any(frozen in name for frozen in intent.frozen_modules):
                param.requires_grad = False
