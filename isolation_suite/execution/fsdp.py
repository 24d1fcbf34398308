"""The ``fsdp`` execution mode: FSDP2 (``torch.distributed.fsdp.fully_shard``) over the ``ddp`` mode's two
CPU processes.

The ranks, the pool that keeps them, the batch split, and how a rank's crash or hang becomes the
verdict are the ``ddp`` mode's (:mod:`isolation_suite.execution.ddp`, whose ``run`` is this mode's
launch); what differs is the wrapping, and how the runner reads a parameter afterwards.

**The wrap** (:func:`wrap`), where the technique's ``ddp_wrap`` order puts it (after its ``setup`` by
default: build, freeze, shard): with ``nested``, every container of the model's tree whose parameters
are its own (``tree.shard_units``: none of them also held by a module outside it, FSDP2 refuses a
parameter shared by two groups, or read outside its call) gets a ``fully_shard`` of its own,
innermost first, then the root gets one, over a one-dimensional CPU
device mesh on the pool's process group (``DeviceMesh.from_group``: no new group, so the pool's
group stays its only one); ``reshard_after_forward`` is ``not keep_gathered``. Frozen and
trainable parameters share a group wherever the technique left them so.

**Reading a parameter.** ``fully_shard`` replaces every parameter of a module with a new
``nn.Parameter`` holding a ``DTensor`` shard (same name, same ``requires_grad``), so the original
tensors the runner keeps are no longer the model's: after the wrap a parameter is found again by
its path (``runner.replacements``), and its value and gradient are read whole (``full_tensor()``, an
all-gather both ranks make, since both record every step). A technique that kept a reference to an
original parameter (a hook on it, its identity in a set) keeps a tensor the model no longer trains:
that is what FSDP does to such code, and the verdict says so.

**Why the trace is the same.** FSDP2 reduce-scatters each gradient as the average over the ranks
(on gloo too, on torch 2.13: ``tests/test_fsdp.py`` checks the average against the whole batch's
gradient), so with a mean-reduced loss over equal halves each rank's shard of the gradient is the
whole batch's, as in ``ddp``; the loss and the input gradient are recorded as there. Averaging
reorders sums: float32 mismatches are confirmed on the float64 twin, and the mode draws float32.
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from isolation_suite.execution import ddp
from isolation_suite.model.tree import ModelTree, shard_units
from isolation_suite.spec.scenario import Mode


#: FSDP2's advice about a module whose output is a view (an in-place op on it would skip the
#: all-gather): about the model's shape (a generated reshape), not what a technique does
MODEL_WARNINGS = (r"FSDP2-wrapped module .* returned a view tensor",)


@contextlib.contextmanager
def without_model_warnings(mode: Mode) -> Iterator[None]:
    """A run with :data:`MODEL_WARNINGS` silenced (the mode's ``ModeInfo.settings``)."""
    with warnings.catch_warnings():
        for pattern in MODEL_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def is_sharded(tensor: torch.Tensor) -> bool:
    """``tensor`` is a ``DTensor`` (a parameter ``fully_shard`` replaced, its gradient)."""
    # no DTensor exists before ``torch.distributed.tensor`` is imported: other modes never import it
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as one rank of a single process would hold it: a sharded ``DTensor`` gathered (a
    collective: every rank reads the same tensors in the same order)."""
    if is_sharded(tensor):
        with torch.no_grad():
            return tensor.full_tensor()
    return tensor


def whole_all(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``whole`` of every tensor, with one all-gather for all the sharded ones where they are FSDP2's
    usual layout (dimension 0 split over a one-dimensional mesh of the whole group, as ``torch.chunk``
    splits it, one dtype): each rank sends its shards flattened into one buffer, padded to the
    longest rank's, and every tensor is joined from the ranks' pieces. Any other layout: ``whole``
    one by one. (A gather per tensor was about 40 % of an fsdp check.)"""
    at = [i for i, t in enumerate(tensors) if t is not None and is_sharded(t)]
    if not at:
        return list(tensors)
    sharded = [tensors[i] for i in at]
    world = dist.get_world_size()
    layouts = [_row_chunks(t, world) for t in sharded]
    if any(layout is None for layout in layouts) or len({t.dtype for t in sharded}) > 1:
        return [None if t is None else whole(t) for t in tensors]
    rank = dist.get_rank()
    per_rank = [[rows[r] * math.prod(t.shape[1:]) for t, rows in zip(sharded, layouts)] for r in range(world)]
    longest = max(sum(sizes) for sizes in per_rank)
    with torch.no_grad():
        mine = torch.cat([t.to_local().reshape(-1) for t in sharded])
        padded = torch.zeros(longest, dtype=mine.dtype, device=mine.device)
        padded[:mine.numel()] = mine
        gathered = torch.empty(world * longest, dtype=mine.dtype, device=mine.device)
        # torch 2.13 renamed ``all_gather_into_tensor`` (deprecated, warning) to ``all_gather_single``
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(gathered, padded)
    assert mine.numel() == sum(per_rank[rank]), "a shard's size is not torch.chunk's"
    out = list(tensors)
    for i, (where, t) in enumerate(zip(at, sharded)):
        pieces = []
        for r in range(world):
            start = r * longest + sum(per_rank[r][:i])
            pieces.append(gathered[start:start + per_rank[r][i]].view(layouts[i][r], *t.shape[1:]))
        out[where] = torch.cat(pieces).view(t.shape)
    return out


def _row_chunks(tensor: torch.Tensor, world: int) -> list[int] | None:
    """The rows of dimension 0 each rank holds, where ``tensor`` is sharded along it over the whole
    group as ``torch.chunk`` splits (None otherwise)."""
    from torch.distributed.tensor import Shard
    mesh = tensor.device_mesh
    if mesh.ndim != 1 or mesh.size() != world or tuple(tensor.placements) != (Shard(0),) or tensor.dim() == 0:
        return None
    n = tensor.shape[0]
    size = -(-n // world)
    rows = [max(0, min(size, n - r * size)) for r in range(world)]
    return rows if rows[dist.get_rank()] == tensor.to_local().shape[0] else None


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded ``DTensor``; any other tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def wrap(model: nn.Module, mode: Mode, tree: ModelTree) -> nn.Module:
    """``fully_shard`` the model on the pool's group: where ``mode.nested``, first the modules now at
    the paths of ``shard_units(tree)`` (the model's tree: the user's own containers, not what a
    technique added); the model itself, sharded in place, is what the loop calls."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
    reshard = not mode.keep_gathered
    if mode.nested:
        for path in shard_units(tree):
            fully_shard(model.get_submodule(path), mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    ddp.hold(model)  # freed with the run's wrappers (see ``ddp``)
    return model


