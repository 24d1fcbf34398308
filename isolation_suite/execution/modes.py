"""Execution modes: how the user's training loop runs the model.

Declared as one table (``MODE_INFOS``), like ``kinds`` and ``optim_info``. A mode is part of the
scenario (:class:`~isolation_suite.spec.scenario.Mode`); the runner applies it around the technique's
hooks, and the reference ignores it (plain eager, one process), except for autocast, whose number
format both share (see ``ModeInfo.reference``).

What "the same trace" means per mode, and the tolerance each is judged with:

* ``checkpoint``: recomputation runs the same kernels on the same values, so the trace is compared
  at eager's tolerance. The recomputation sees what the forward saw: the same calls of the
  isolated modules (the technique's ``call`` runs again, with the same ``use``) and the same dropout
  seeds, as in user code, where a technique's hooks and wrappers are live during recomputation.
  What the checkpoint itself does is not held against the technique:

  - the region's output may be any structure (a dict, a list, a ``ModelOutput``): it is checkpointed
    as its flattened tensors and rebuilt after, as libraries that checkpoint arbitrary outputs do,
    so a reentrant checkpoint gives it the real gradient;
  - the recomputation's updates of the region's buffers are undone when it ends: a training
    BatchNorm updates its running statistics once per forward, as in eager, not a second time
    during backward (they would differ from eager's as soon as a schedule freezes it and it
    normalises with them). What the technique's forward does to buffers stays: a frozen BatchNorm
    left in training mode still moves its statistics in the forward, and ``frozen-unchanged`` sees it;
  - a reentrant checkpoint runs one backward per call of the region, each adding to ``.grad`` on its
    own, so a sum of several calls' gradients is grouped otherwise than in eager: a gradient that is
    zero in exact arithmetic (an attention key bias's) carries other rounding noise, and an entry
    whose gradient stays within rounding of zero in both runs is set aside (``ModeInfo.same_rounding``).
* ``compile``: ``aot_eager`` runs the same ATen operations, after decompositions that may reorder a
  reduction; ``inductor`` fuses kernels. Both round differently from eager, so a float32 mismatch
  counts only where the float64 twin shows it too, as for every float32 mismatch, and an entry
  whose gradient stays within rounding of zero in both runs is set aside.
* ``autocast``: a lower-precision forward is not a technique's doing; technique and reference both
  run under the same autocast, and a mismatch must show on the float64 twin, where autocast casts
  nothing. (A finding that exists only in the low precision is therefore not judged by
  ``matches-reference``; ``frozen-unchanged`` and ``gradient-flows`` are exact and still are.) Both
  round alike: a gradient that is zero in exact arithmetic is held to exactly zero, as in eager.
* ``ddp``: two processes train on the two halves of every batch and DDP averages their gradients;
  with a mean-reduced loss over equal halves that is the whole batch's gradient, so the reference
  stays one eager process over the whole batch. Rank 0 records the trace: the loss as the average of
  the ranks' losses, the input gradient as the ranks' input gradients stacked and halved (a rank's
  is that of its own half's loss, twice the whole loss's). Averaging reorders a sum: float32
  mismatches are confirmed on the float64 twin, and an entry whose gradient stays within rounding of
  zero in both runs is set aside. Dropout is exact (each rank keeps its rows of the
  whole batch's mask); a training BatchNorm is not drawn (see :mod:`isolation_suite.execution.ddp`).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from isolation_suite.spec.scenario import MODE_KINDS, Mode, ScenarioError


@dataclass(frozen=True)
class ModeInfo:
    """One execution mode: what it does, where it runs, whether the reference shares it."""

    kind: str
    summary: str
    #: device types it runs on
    devices: tuple[str, ...] = ("cpu", "cuda")
    #: True: the reference runs under the same mode (a number format, not a way of running the model)
    reference: bool = False
    #: the mode puts a module of the model under it (``Mode.target``)
    targeted: bool = False
    #: the technique's run rounds as the reference's does (the same operations in the same order): a
    #: gradient that is zero in exact arithmetic comes out the same in both. False: its rounding
    #: noise is its own, and an entry whose gradient is zero up to rounding in both runs has no
    #: direction to compare (see ``invariants.Context.rounding``)
    same_rounding: bool = True
    #: the share of a search's examples judged in this mode (compiling costs a second or more per run)
    example_share: float = 1.0
    #: its share of a run's time budget, against an eager item's 1 (a compiled run costs about 40 eager
    #: ones, a ddp run about 16: a known-bad row's trigger examples must still run within it)
    budget_weight: float = 1.0


MODE_INFOS: tuple[ModeInfo, ...] = (
    ModeInfo("eager", "plain eager, one process"),
    ModeInfo("checkpoint", "a container (or the whole model) under torch.utils.checkpoint, use_reentrant drawn",
             targeted=True, same_rounding=False),
    ModeInfo("compile", "torch.compile of the model or a container (backend aot_eager), dynamic=False",
             targeted=True, example_share=0.1, budget_weight=4.0, same_rounding=False),
    ModeInfo("autocast", "forward and loss under torch.autocast: CPU bfloat16, CUDA float16 with a GradScaler",
             reference=True),
    ModeInfo("ddp", "DistributedDataParallel over 2 CPU processes (gloo), each on half of every batch; "
             "find_unused_parameters and static_graph drawn", devices=("cpu",), example_share=0.25,
             budget_weight=2.0, same_rounding=False),
)
MODE_BY_KIND = {info.kind: info for info in MODE_INFOS}
assert tuple(MODE_BY_KIND) == MODE_KINDS, "scenario.MODE_KINDS and MODE_INFOS must list the same modes"


def parse_modes(text: str | None, device_types: tuple[str, ...] = ("cpu",)) -> tuple[str, ...]:
    """``"eager,checkpoint"`` -> ``("eager", "checkpoint")``; None or ``"all"``: every mode that runs
    on all of ``device_types``. Raises ValueError naming an unknown mode."""
    if text is None or text.strip().lower() in ("", "all"):
        return tuple(m.kind for m in MODE_INFOS if all(d in m.devices for d in device_types))
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in MODE_BY_KIND]
    if unknown or not names:
        raise ValueError(f"unknown mode(s) {unknown or [text]}: choose from {', '.join(MODE_KINDS)}")
    return names


def for_reference(mode: Mode) -> Mode:
    """The mode the reference runs under: eager, or the same number format."""
    return mode if MODE_BY_KIND[mode.kind].reference else Mode()


class ForwardState:
    """What a recomputation must see again: the router's call counts and the dropout seeds' uses.

    ``snapshot`` is taken when a checkpointed region starts in the forward; ``resume`` puts it back
    while the region is recomputed during backward (and does nothing in the forward itself)."""

    def __init__(self, router: Callable[[], Any], seeding: Any):
        self.router, self.seeding = router, seeding

    def snapshot(self) -> tuple:
        return self.router().snapshot(), dict(self.seeding.uses)

    @property
    def recomputing(self) -> bool:
        """A checkpointed region runs again during backward: the router is not routing a forward."""
        return not self.router().active

    @contextlib.contextmanager
    def resume(self, snapshot: tuple) -> Iterator[None]:
        router = self.router()
        if router.active:
            yield  # the forward itself
            return
        uses = self.seeding.uses
        self.seeding.uses = dict(snapshot[1])
        with router.replaying(snapshot[0]):
            try:
                yield
            finally:
                self.seeding.uses = uses


def target_module(model: nn.Module, mode: Mode) -> nn.Module:
    try:
        return model.get_submodule(mode.target) if mode.target else model
    except AttributeError:
        raise ScenarioError(f"the {mode.kind} mode names {mode.target!r}, which is not a module of the model") \
            from None


def checkpoint_module(module: nn.Module, reentrant: bool, state: ForwardState) -> None:
    """Run ``module``'s forward under ``torch.utils.checkpoint`` (an instance ``forward``, as
    libraries do it: the module's hooks still run once, outside the checkpoint).

    The checkpointed region returns the forward's output flattened (``torch.utils._pytree``) and the
    wrapper rebuilds it: a reentrant checkpoint only tracks the tensors a region returns directly,
    so a dict, a list or a ``ModelOutput`` would come back without gradient. Keyword arguments reach
    the forward by closure (a reentrant checkpoint takes none)."""
    forward = module.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        snapshot = state.snapshot()
        spec: list[pytree.TreeSpec] = []

        def region(*inner: Any) -> tuple:
            # read before ``resume``, which routes the recomputation as a forward again
            with _buffers_kept(module, state.recomputing), state.resume(snapshot):
                leaves, tree = pytree.tree_flatten(forward(*inner, **kwargs))
            spec.append(tree)  # spec[0] is the forward's: the recomputation comes after it is read
            return tuple(leaves)
        with warnings.catch_warnings():
            # the very symptom a starved reentrant checkpoint shows; the verdict names it
            warnings.filterwarnings("ignore", "None of the inputs have requires_grad", UserWarning)
            leaves = torch.utils.checkpoint.checkpoint(region, *args, use_reentrant=reentrant)
        return pytree.tree_unflatten(list(leaves), spec[0])

    module.forward = checkpointed


@contextlib.contextmanager
def _buffers_kept(module: nn.Module, recomputing: bool) -> Iterator[None]:
    """During a recomputation, put ``module``'s buffers back as they were before it: the forward
    already updated them once (a training BatchNorm's running statistics), as eager does."""
    if not recomputing:
        yield
        return
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        for buffer, value in saved:
            # through ``.data``: the copy must not bump the version autograd saved the buffer at (a
            # training BatchNorm saves its running statistics for backward)
            buffer.data.copy_(value)


def before_setup(model: nn.Module, mode: Mode, state: ForwardState) -> None:
    """What the user does when building the model, before any isolation: enable checkpointing."""
    if mode.kind == "checkpoint":
        checkpoint_module(target_module(model, mode), mode.reentrant, state)


def before_training(model: nn.Module, mode: Mode) -> None:
    """What the user does once the model is prepared: compile it."""
    if mode.kind == "compile":
        target = target_module(model, mode)
        torch._dynamo.reset()  # a fresh cache per run: a run never reuses another model's frames
        target.compile(backend=mode.backend, dynamic=False)


class Precision:
    """The forward's number format and the loss scaling that goes with it (autocast only).

    On CUDA, float16 autocast comes with a ``GradScaler``: the loss is scaled before backward, the
    optimizer's gradients are unscaled before clipping and before they are recorded, and the input
    gradient (which no optimizer unscales) is recorded divided by the scale. A step whose loss had no
    gradient (nothing was scaled) steps the optimizer plainly, as a user's loop would skip the
    scaler there."""

    def __init__(self, mode: Mode, device: str):
        self.device_type = torch.device(device).type
        self.enabled = mode.kind == "autocast"
        dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler(self.device_type) if self.enabled and dtype is torch.float16 else None
        self.scale: float | None = None  # the scale of this step's backward passes (None: none scaled)

    def start_step(self) -> None:
        self.scale = None

    def forward(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scale = float(self.scaler.get_scale())

    def input_grad(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        """An input's gradient as the unscaled loss gives it."""
        return grad if grad is None or self.scale is None else grad / self.scale

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scale is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scale is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
