"""Seed 004 and its relatives: keep single entries of a weight fixed."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from isolation_suite.technique import Capability, Technique, element_mask
from isolation_suite.techniques._util import element_targets

ELEMENTS = frozenset({Capability.FREEZE_ELEMENTS})


def freeze_single(name, index):
    """The seed's callback, with the parameter name and several indices generalised."""
    def callback(module, grad_input, grad_output):
        for i in index:
            getattr(module, name).grad.data[i] = 0
    return callback


class BackwardHookZeroGrad(Technique):
    name = "backward_hook_zero_grad"
    seed = "004"
    capabilities = ELEMENTS
    # the hook fires before the weight's gradient exists when no input needs a gradient, or when
    # the module is called more than once (the weight's gradient is summed after the last call's
    # hook): weight.grad is None -> AttributeError; and a zero gradient does not stop weight decay
    expected_violations = frozenset({"no-crash", "frozen-unchanged"})
    summary = "register_full_backward_hook writing module.weight.grad.data[index] = 0"

    def setup(self, model, intent):
        for module, name, indices in element_targets(model, intent):
            module.register_full_backward_hook(freeze_single(name, indices))


class TensorHookMask(Technique):
    name = "tensor_hook_mask"
    seed = ""
    capabilities = ELEMENTS
    # zero gradient is not zero update: weight decay (AdamW by default) still moves the entry
    expected_violations = frozenset({"frozen-unchanged"})
    summary = "param.register_hook(lambda g: g * ~mask)"

    def setup(self, model, intent):
        for module, name, indices in element_targets(model, intent):
            param = getattr(module, name)
            keep = ~element_mask(param, indices)
            param.register_hook(lambda g, keep=keep: g * keep)


class ForwardPreHookOverwrite(Technique):
    name = "forward_pre_hook_overwrite"
    seed = "004"
    capabilities = ELEMENTS
    # the entry is reset before each forward, so after a step it has drifted; when the
    # module is called twice the reset edits a tensor saved for backward
    expected_violations = frozenset({"frozen-unchanged", "no-crash"})
    summary = "register_forward_pre_hook that writes the fixed value back before every forward"

    def setup(self, model, intent):
        for module, name, indices in element_targets(model, intent):
            param = getattr(module, name)
            values = [param[tuple(i)].item() for i in indices]

            def overwrite(mod, args, name=name, indices=indices, values=values):
                weight = getattr(mod, name)
                with torch.no_grad():
                    for i, v in zip(indices, values):
                        weight[tuple(i)] = v
            module.register_forward_pre_hook(overwrite)


class RestoreAfterStep(Technique):
    name = "restore_after_step"
    seed = ""
    capabilities = ELEMENTS
    # values are right after every step, but the frozen entries' gradients still count in
    # clip_grad_norm_, which rescales every other gradient; under fsdp the saved tensors are the
    # originals fully_shard replaced, and the restore writes into tensors that no longer train
    expected_violations = frozenset({"matches-reference"})
    mode_violations = {"fsdp": frozenset({"frozen-unchanged"})}
    summary = "optimizer step post-hook copies the initial entries back"

    def setup(self, model, intent):
        self.saved = []
        for module, name, indices in element_targets(model, intent):
            param = getattr(module, name)
            mask = element_mask(param, indices)
            self.saved.append((param, mask, param.detach().clone()))

    def make_optimizer(self, model, intent, build):
        optimizer = build(model.parameters())
        saved = self.saved

        def restore(opt, args, kwargs):
            with torch.no_grad():
                for param, mask, initial in saved:
                    param.copy_(torch.where(mask, initial, param))
        optimizer.register_step_post_hook(restore)
        return optimizer


class WhereMask(nn.Module):
    """``W -> where(mask, W0, W)``: the frozen entries are constants."""

    def __init__(self, mask: torch.Tensor, initial: torch.Tensor):
        super().__init__()
        self.mask, self.initial = mask, initial

    def forward(self, weight):
        return torch.where(self.mask, self.initial, weight)


class ParametrizeWhere(Technique):
    name = "parametrize_where"
    seed = ""
    capabilities = ELEMENTS
    summary = "torch.nn.utils.parametrize with where(mask, W0, W)"

    def setup(self, model, intent):
        for module, name, indices in element_targets(model, intent):
            param = getattr(module, name)
            mask = element_mask(param, indices)
            parametrize.register_parametrization(module, name, WhereMask(mask, param.detach().clone()))
