"""Optimizer recipes: class, hyper-parameters, foreach/fused, scheduler, clipping, zero_grad."""
from __future__ import annotations

from hypothesis import strategies as st

from isolation_suite.spec.optim_info import OPTIMIZER_BY_NAME, OPTIMIZER_INFOS, sharded_obstacle
from isolation_suite.spec.scenario import CLIPPING, OPTIMIZERS, SCHEDULERS, OptimizerRecipe

from isolation_suite.strategies._validate import check_choice
from isolation_suite.strategies._draft import Knobs

#: optimizers with a fused implementation in torch, per device
FUSED = {device: tuple(info.name for info in OPTIMIZER_INFOS if device in info.fused_on) for device in ("cpu", "cuda")}


def _hyper_parameters(k: Knobs, name: str, fused: tuple[str, ...] = FUSED["cpu"]) -> dict:
    """Hyper-parameters from the optimizer's ``OptimizerInfo`` row, drawn from a fixed number of knobs
    so every optimizer costs the shrinker the same."""
    info = OPTIMIZER_BY_NAME[name]
    kw: dict = {"lr": k.pick(info.lrs)}
    for param, values in info.choices:
        value = k.pick(values)
        if value is not None:
            kw[param] = value
    if name == "SGD":  # torch's constraints: nesterov needs momentum and no dampening
        if not kw["momentum"]:
            kw.pop("nesterov"), kw.pop("dampening")
        elif kw["nesterov"]:
            kw["dampening"] = 0.0
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
                      clipping: tuple[str, ...] = CLIPPING, devices: tuple[str, ...] = ("cpu",),
                      sharded: bool = False) -> OptimizerRecipe:
    """Draw an :class:`OptimizerRecipe`; shrinks toward plain SGD, no scheduler, no clipping.

    ``devices``: a fused implementation is drawn only where every one of them has it. ``sharded``:
    only what steps FSDP2's sharded parameters (``optim_info.sharded_obstacle``).

    >>> optimizer_recipes(names=("AdamW",))  # doctest: +ELLIPSIS
    optimizer_recipes(...)
    """
    names = check_choice("names", names, OPTIMIZERS)
    schedulers = check_choice("schedulers", schedulers, SCHEDULERS)
    clipping = check_choice("clipping", clipping, CLIPPING)
    devices = check_choice("devices", devices, tuple(FUSED))
    fused = tuple(n for n in OPTIMIZERS if all(n in FUSED[d] for d in devices)
                  and not (sharded and sharded_obstacle(n, True)))
    if sharded:
        names = tuple(n for n in names if not sharded_obstacle(n, False)) or names
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
