"""Rows from the wild: freeze schedules (progressive unfreezing, Lightning's ``BackboneFinetuning``).

The frozen set changes at a step boundary and the technique's ``on_intent_change`` realises it.
The oracle's meaning of the change (``reference.Reference.on_intent_change``): a module that thaws
trains from then on with fresh optimizer state, one that freezes is a constant function from then on.
"""
from __future__ import annotations

import torch

from isolation_suite.technique import Capability, Technique
from isolation_suite.techniques._util import frozen_parameters
from isolation_suite.techniques.freeze_module import STARVES_REENTRANT_CHECKPOINT, TRAIN_MODE_BREAKS, FreezeAndEval

SCHEDULE = frozenset({Capability.FREEZE_SCHEDULE})


def _changed(model, old, new) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(parameters that thaw, parameters that freeze) at this boundary."""
    was = {id(p) for p in frozen_parameters(model, old)}
    now = {id(p) for p in frozen_parameters(model, new)}
    params = list(model.parameters())
    return [p for p in params if id(p) in was - now], [p for p in params if id(p) in now - was]


class UnfreezeFlagOnly(Technique):
    name = "unfreeze_flag_only"
    seed = "pytorch#83769"
    capabilities = SCHEDULE
    # the optimizer was built over the parameters that required grad at the start: a module thawed
    # later gets gradients that nothing applies; one frozen later stays in the optimizer, where
    # zero_grad(set_to_none=False) leaves it a zero gradient that momentum and weight decay still
    # act on; and a frozen BatchNorm or Dropout keeps training as with requires_grad_false
    expected_violations = frozenset({"trainable-trains"}) | TRAIN_MODE_BREAKS
    # under ddp, a module frozen after the wrap leaves DDP's reducer waiting for its gradient
    mode_violations = {**STARVES_REENTRANT_CHECKPOINT, "ddp": frozenset({"no-crash"})}
    summary = ("requires_grad = False, optim.SGD(filter(lambda p: p.requires_grad, ...)); at a boundary "
               "only the requires_grad flags change")

    def setup(self, model, intent):
        frozen = {id(p) for p in frozen_parameters(model, intent)}
        for p in model.parameters():
            p.requires_grad = id(p) not in frozen

    def make_optimizer(self, model, intent, build):
        return build(filter(lambda p: p.requires_grad, model.parameters()))

    def on_intent_change(self, model, optimizer, old, new):
        self.setup(model, new)
        return None


class UnfreezeAddParamGroup(FreezeAndEval):
    name = "unfreeze_add_param_group"
    seed = "lightning:BaseFinetuning"
    capabilities = SCHEDULE
    expected_violations = frozenset()
    # under DDP a thawed module's gradient is never averaged: DDP's reducer was built without it; a
    # module frozen after the wrap leaves the reducer waiting for its gradient (the next forward raises)
    mode_violations = {**STARVES_REENTRANT_CHECKPOINT, "ddp": frozenset({"matches-reference", "no-crash"})}
    summary = ("freeze_and_eval; at a boundary a thawed module is put back in training mode and added to the "
               "optimizer as a new group (BaseFinetuning.unfreeze_and_add_param_group), a newly frozen one is "
               "frozen the same way and leaves the optimizer with its state and its gradient")

    def on_intent_change(self, model, optimizer, old, new):
        thawed, frozen = _changed(model, old, new)
        for module in model.modules():  # undo freeze_and_eval's pinned eval mode everywhere ...
            module.__dict__.pop("train", None)
        model.train(model.training)
        for p in thawed:
            p.requires_grad = True
        self.setup(model, new)  # ... and pin it again where the new intent freezes
        gone = {id(p) for p in frozen}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in gone]
        for p in [p for p in optimizer.state if id(p) in gone]:
            del optimizer.state[p]
        for p in frozen:  # no optimizer clears it now, and clip_grad_norm_(model.parameters()) would count it
            p.grad = None
        if thawed:
            optimizer.add_param_group({"params": thawed})
        return None
