"""Optimizer recipes: class, hyper-parameters, foreach/fused, scheduler, clipping, zero_grad."""
from __future__ import annotations

from hypothesis import strategies as st

from isolation_suite.scenario import CLIPPING, OPTIMIZERS, SCHEDULERS, OptimizerRecipe

from ._validate import check_choice

LRS = (0.1, 0.01, 0.3)
WEIGHT_DECAYS = (0.0, 0.01, 0.1)
#: optimizers with a fused implementation in torch (CPU and CUDA)
FUSED = ("SGD", "Adam", "AdamW", "Adagrad")


@st.composite
def _hyper_parameters(draw, name: str) -> dict:
    kw: dict = {"lr": draw(st.sampled_from(LRS))}
    wd = st.sampled_from(WEIGHT_DECAYS)
    if name == "SGD":
        momentum = draw(st.sampled_from((0.0, 0.9)))
        kw.update(momentum=momentum, weight_decay=draw(wd), maximize=draw(st.sampled_from((False, True))))
        if momentum:
            nesterov = draw(st.sampled_from((False, True)))
            kw.update(nesterov=nesterov, dampening=0.0 if nesterov else draw(st.sampled_from((0.0, 0.5))))
    elif name in ("Adam", "AdamW"):
        if name == "AdamW":
            # omitted weight_decay keeps torch's default of 0.01
            choice = draw(st.sampled_from((None,) + WEIGHT_DECAYS))
            if choice is not None:
                kw["weight_decay"] = choice
        else:
            kw["weight_decay"] = draw(wd)
        kw["amsgrad"] = draw(st.sampled_from((False, True)))
    elif name == "RMSprop":
        kw.update(momentum=draw(st.sampled_from((0.0, 0.9))), centered=draw(st.sampled_from((False, True))),
                  weight_decay=draw(wd))
    elif name == "Adagrad":
        kw.update(lr_decay=draw(st.sampled_from((0.0, 0.01))), weight_decay=draw(wd))
    elif name in ("Adamax", "NAdam", "RAdam"):
        kw["weight_decay"] = draw(wd)
    elif name == "Adadelta":
        kw.update(lr=draw(st.sampled_from((1.0, 0.5))), weight_decay=draw(wd))
    elif name == "Rprop":
        kw["lr"] = draw(st.sampled_from((0.01, 0.001)))
    implementation = draw(st.sampled_from(("default", "foreach", "for-loop", "fused")))
    if implementation == "foreach":
        kw["foreach"] = True
    elif implementation == "for-loop":
        kw["foreach"] = False
    elif implementation == "fused" and name in FUSED:
        kw["fused"] = True
    return kw


@st.composite
def optimizer_recipes(draw, names: tuple[str, ...] = OPTIMIZERS, schedulers: tuple[str, ...] = SCHEDULERS,
                      clipping: tuple[str, ...] = CLIPPING) -> OptimizerRecipe:
    """Draw an :class:`OptimizerRecipe`; shrinks toward plain SGD, no scheduler, no clipping.

    >>> optimizer_recipes(names=("AdamW",))  # doctest: +ELLIPSIS
    optimizer_recipes(...)
    """
    names = check_choice("names", names, OPTIMIZERS)
    schedulers = check_choice("schedulers", schedulers, SCHEDULERS)
    clipping = check_choice("clipping", clipping, CLIPPING)
    name = draw(st.sampled_from(names))
    kwargs = draw(_hyper_parameters(name))
    clip = draw(st.sampled_from(clipping))
    return OptimizerRecipe(
        name=name,
        args=tuple(sorted(kwargs.items())),
        scheduler=draw(st.sampled_from(schedulers)),
        clip=clip,
        clip_value=draw(st.sampled_from((0.1, 0.01, 1.0))) if clip != "none" else 1.0,
        set_to_none=draw(st.sampled_from((True, False))),
    )
