"""Optimizer recipes: class, hyper-parameters, foreach/fused, scheduler, clipping, zero_grad."""
from __future__ import annotations

from hypothesis import strategies as st

from ..scenario import CLIPPING, OPTIMIZERS, SCHEDULERS, OptimizerRecipe

from ._validate import check_choice
from .architectures import Knobs

LRS = (0.1, 0.01, 0.3)
WEIGHT_DECAYS = (0.0, 0.01, 0.1)
#: optimizers with a fused implementation in torch, per device (torch's fused Adagrad is CPU-only)
FUSED = {"cpu": ("SGD", "Adam", "AdamW", "Adagrad"), "cuda": ("SGD", "Adam", "AdamW")}


def _hyper_parameters(k: Knobs, name: str, fused: tuple[str, ...] = FUSED["cpu"]) -> dict:
    """Hyper-parameters from a fixed number of knobs, so every optimizer costs the shrinker the same."""
    kw: dict = {"lr": k.pick(LRS)}
    if name == "SGD":
        momentum = k.pick((0.0, 0.9))
        kw.update(momentum=momentum, weight_decay=k.pick(WEIGHT_DECAYS), maximize=k.pick((False, True)))
        if momentum:
            nesterov = k.pick((False, True))
            kw.update(nesterov=nesterov, dampening=0.0 if nesterov else k.pick((0.0, 0.5)))
    elif name in ("Adam", "AdamW"):
        if name == "AdamW":
            # omitted weight_decay keeps torch's default of 0.01
            choice = k.pick((None,) + WEIGHT_DECAYS)
            if choice is not None:
                kw["weight_decay"] = choice
        else:
            kw["weight_decay"] = k.pick(WEIGHT_DECAYS)
        kw["amsgrad"] = k.pick((False, True))
    elif name == "RMSprop":
        kw.update(momentum=k.pick((0.0, 0.9)), centered=k.pick((False, True)), weight_decay=k.pick(WEIGHT_DECAYS))
    elif name == "Adagrad":
        kw.update(lr_decay=k.pick((0.0, 0.01)), weight_decay=k.pick(WEIGHT_DECAYS))
    elif name in ("Adamax", "NAdam", "RAdam"):
        kw["weight_decay"] = k.pick(WEIGHT_DECAYS)
    elif name == "Adadelta":
        kw.update(lr=k.pick((1.0, 0.5)), weight_decay=k.pick(WEIGHT_DECAYS))
    elif name == "Rprop":
        kw["lr"] = k.pick((0.01, 0.001))
    implementation = k.pick(("default", "foreach", "for-loop", "fused"))
    if implementation == "foreach":
        kw["foreach"] = True
    elif implementation == "for-loop":
        kw["foreach"] = False
    elif implementation == "fused" and name in fused:
        kw["fused"] = True
    return kw


@st.composite
def optimizer_recipes(draw, names: tuple[str, ...] = OPTIMIZERS, schedulers: tuple[str, ...] = SCHEDULERS,
                      clipping: tuple[str, ...] = CLIPPING, devices: tuple[str, ...] = ("cpu",)) -> OptimizerRecipe:
    """Draw an :class:`OptimizerRecipe`; shrinks toward plain SGD, no scheduler, no clipping.

    ``devices``: a fused implementation is drawn only where every one of them has it.

    >>> optimizer_recipes(names=("AdamW",))  # doctest: +ELLIPSIS
    optimizer_recipes(...)
    """
    names = check_choice("names", names, OPTIMIZERS)
    schedulers = check_choice("schedulers", schedulers, SCHEDULERS)
    clipping = check_choice("clipping", clipping, CLIPPING)
    devices = check_choice("devices", devices, tuple(FUSED))
    fused = tuple(n for n in OPTIMIZERS if all(n in FUSED[d] for d in devices))
    name = draw(st.sampled_from(names))
    kwargs = _hyper_parameters(Knobs(draw), name, fused)
    clip = draw(st.sampled_from(clipping))
    return OptimizerRecipe(
        name=name,
        args=tuple(sorted(kwargs.items())),
        scheduler=draw(st.sampled_from(schedulers)),
        clip=clip,
        clip_value=draw(st.sampled_from((0.1, 0.01, 1.0))) if clip != "none" else 1.0,
        set_to_none=draw(st.sampled_from((True, False))),
    )
