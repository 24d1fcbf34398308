"""Execution modes as data, declared once (like ``kinds`` for layers), torch-free.

The scenario validates a :class:`~isolation_suite.spec.scenario.Mode` against its row, the strategies
and the catalog's conditions read what the mode does to a scenario; ``execution.modes.ModeInfo``
extends each row with how the mode runs (torch). A new mode is a row here, its row there, and its
own functions (its ``show`` here, its hooks there, its draw in ``strategies.scenarios`` and its
placements in ``techniques``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from isolation_suite.spec._tables import where


@dataclass(frozen=True)
class ModeKind:
    """One execution mode as a scenario sees it."""

    kind: str
    summary: str
    #: the scenario's short form of a mode of this kind (``Mode.__repr__``)
    show: Callable[[Any], str]
    #: the mode puts a module of the model under it (``Mode.target``; ``""``: the whole model)
    targeted: bool = False
    #: the boolean options of ``Mode`` it takes; every other mode leaves them False
    flags: tuple[str, ...] = ()
    #: backward runs the target's forward again (a checkpoint): the calls inside it are made twice
    recomputes: bool = False
    #: processes that train, each on an equal share of every batch (so the batch divides by it)
    ranks: int = 1
    #: the model is wrapped in a module that registers the parameters needing gradient when it wraps
    #: and averages their gradients over the ranks (DistributedDataParallel): a parameter thawed later
    #: is never averaged, one that gets no gradient leaves its bucket unreduced
    wraps_trainable: bool = False
    #: the model's parameters are sharded (FSDP2's ``DTensor``): the optimizer steps the shards, so only
    #: a recipe whose step runs on them is drawn (``optim_info.sharded_obstacle``)
    shards_parameters: bool = False
    #: the dtypes a search draws in it, where asked for
    dtypes: tuple[str, ...] = ("float32", "float64")

    @property
    def distributed(self) -> bool:
        """More than one process trains: the whole scenario is drawn for the split (``ranks``)."""
        return self.ranks > 1


def _bare(mode: Any) -> str:
    return mode.kind


def _checkpoint(mode: Any) -> str:
    return f"checkpoint({mode.target or '<model>'}, use_reentrant={mode.reentrant})"


def _compile(mode: Any) -> str:
    return f"compile({mode.target or '<model>'}, backend={mode.backend})"


def _ddp(mode: Any) -> str:
    return f"ddp(find_unused_parameters={mode.find_unused}, static_graph={mode.static_graph})"


def _fsdp(mode: Any) -> str:
    return f"fsdp(nested={mode.nested}, reshard_after_forward={not mode.keep_gathered})"


MODES: tuple[ModeKind, ...] = (
    # the first row is the plain loop, every Mode's default
    ModeKind("eager", "plain eager, one process", _bare),
    ModeKind("checkpoint", "a container (or the whole model) under torch.utils.checkpoint, use_reentrant drawn",
             _checkpoint, targeted=True, flags=("reentrant",), recomputes=True),
    ModeKind("compile", "torch.compile of the model or a container (backend aot_eager; inductor too in the nightly "
             "profile), dynamic=False",
             _compile, targeted=True),
    ModeKind("autocast", "forward and loss under torch.autocast: CPU bfloat16, CUDA float16 with a GradScaler",
             _bare),
    ModeKind("ddp", "DistributedDataParallel over 2 CPU processes (gloo), each on half of every batch; "
             "find_unused_parameters and static_graph drawn", _ddp, flags=("find_unused", "static_graph"),
             ranks=2, wraps_trainable=True,
             # averaging reorders sums, and a float64 mismatch has no higher precision to be confirmed on;
             # adaptive optimizers make lr-sized steps of a gradient that cancels to ~1e-9 (a
             # GroupNorm-fed embedding: 3e-5 relative apart in two summation orders)
             dtypes=("float32",)),
    ModeKind("fsdp", "FSDP2 fully_shard over 2 CPU processes (gloo), each on half of every batch; the "
             "containers sharded on their own (nested) or the root only, reshard_after_forward drawn", _fsdp,
             flags=("nested", "keep_gathered"), ranks=2, shards_parameters=True,
             # as ddp: the reduce-scatter's average reorders sums
             dtypes=("float32",)),
)
BY_KIND: dict[str, ModeKind] = {row.kind: row for row in MODES}
MODE_KINDS = tuple(BY_KIND)
DEFAULT = MODE_KINDS[0]


def modes_where(**properties: Any) -> tuple[str, ...]:
    """The modes whose rows have these properties: ``modes_where(targeted=True)``."""
    return where(MODES, **properties)
