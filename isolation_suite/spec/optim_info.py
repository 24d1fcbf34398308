"""Optimizers and schedulers, declared once (the way PyTorch's ``common_optimizers.py`` declares
``OptimizerInfo``): what the strategies draw for each, torch's defaults the oracle must know, and
which of them rewrite a learning rate of 0. Pure data: nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

WEIGHT_DECAYS = (0.0, 0.01, 0.1)
NO_FUSED_RULE = "its fused kernel has no DTensor sharding rule"


@dataclass(frozen=True)
class OptimizerInfo:
    name: str  # the class in ``torch.optim``
    lrs: tuple[float, ...] = (0.1, 0.01, 0.3)  # drawn; the first is the simplest
    #: hyper-parameters drawn besides lr, each from its values in order (``None``: left at torch's default)
    choices: tuple[tuple[str, tuple], ...] = (("weight_decay", WEIGHT_DECAYS),)
    default_weight_decay: float = 0.0  # torch's, when weight_decay is not given
    fused_on: tuple[str, ...] = ()  # devices with a fused implementation
    lr_zero_moves: str = ""  # why a parameter group at lr=0 still moves ("" when it does not)
    #: why its step cannot run on FSDP2's sharded (``DTensor``) parameters ("" when it can), and why
    #: its fused implementation cannot (torch 2.13's DTensor rules): a mode that shards draws neither
    unsharded: str = ""
    fused_unsharded: str = ""


OPTIMIZER_INFOS: tuple[OptimizerInfo, ...] = (
    OptimizerInfo("SGD", choices=(("momentum", (0.0, 0.9)), ("weight_decay", WEIGHT_DECAYS),
                                  ("maximize", (False, True)), ("nesterov", (False, True)),
                                  ("dampening", (0.0, 0.5))), fused_on=("cpu", "cuda"),
                  fused_unsharded=NO_FUSED_RULE),
    OptimizerInfo("Adam", choices=(("weight_decay", WEIGHT_DECAYS), ("amsgrad", (False, True))),
                  fused_on=("cpu", "cuda")),
    OptimizerInfo("AdamW", choices=(("weight_decay", (None,) + WEIGHT_DECAYS), ("amsgrad", (False, True))),
                  default_weight_decay=0.01, fused_on=("cpu", "cuda")),
    OptimizerInfo("RMSprop", choices=(("momentum", (0.0, 0.9)), ("centered", (False, True)),
                                      ("weight_decay", WEIGHT_DECAYS))),
    OptimizerInfo("Adagrad", choices=(("lr_decay", (0.0, 0.01)), ("weight_decay", WEIGHT_DECAYS)),
                  fused_on=("cpu",), fused_unsharded=NO_FUSED_RULE),  # torch's fused Adagrad is CPU-only
    OptimizerInfo("Adamax"),
    OptimizerInfo("NAdam"),
    OptimizerInfo("RAdam"),
    OptimizerInfo("Adadelta", lrs=(1.0, 0.5)),
    OptimizerInfo("Rprop", lrs=(0.01, 0.001), choices=(),
                  lr_zero_moves="Rprop clamps its step size to at least 1e-6, whatever the lr",
                  unsharded="Rprop's step writes its state with an indexed in-place copy, which a sharded DTensor "
                            "refuses ('in-place operations that require placement changes are not supported')"),
)
OPTIMIZER_BY_NAME = {info.name: info for info in OPTIMIZER_INFOS}


@dataclass(frozen=True)
class SchedulerInfo:
    name: str
    lr_zero_moves: str = ""  # why it makes a group at lr=0 move ("" when it does not)


SCHEDULER_INFOS: tuple[SchedulerInfo, ...] = (
    SchedulerInfo("none"),
    SchedulerInfo("StepLR"),
    # max_lr is one float, as people write it: it rewrites the lr of every group
    SchedulerInfo("OneCycleLR", lr_zero_moves="OneCycleLR sets every group's lr from max_lr"),
    SchedulerInfo("LambdaLR"),
)
SCHEDULER_BY_NAME = {info.name: info for info in SCHEDULER_INFOS}


def sharded_obstacle(name: str, fused: bool) -> str:
    """Why optimizer ``name`` (``fused``: its fused implementation) cannot step FSDP2's sharded
    parameters ("" when it can): a mode that shards them does not draw it."""
    info = OPTIMIZER_BY_NAME[name]
    return info.unsharded or (info.fused_unsharded if fused else "")
