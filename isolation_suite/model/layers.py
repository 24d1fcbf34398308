"""The torch side of the layer kinds (``kinds`` declares the rest): how a generated layer is
built, and which class a module of a user's model must be to count as that kind.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from isolation_suite.spec.kinds import BY_KIND as KIND


class SeededDropout(nn.Dropout):
    """Dropout whose mask is drawn on the CPU, so CPU and CUDA runs drop the same entries.

    The runner seeds the CPU generator before every module call (from the step, micro-batch,
    module path and use), which makes the mask a function of those only. A rank of a ``ddp`` run,
    which sees its share of the batch's rows only, draws the whole batch's mask and keeps its rows
    (``batch_share``), so the two ranks together drop exactly what one process drops.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # drawn in float32 whatever the dtype, so a float64 re-run drops the same units
        keep = (_rows(torch.rand(_whole(x.shape))) >= self.p).to(x.device)
        return x * keep / (1.0 - self.p)


#: (rank, world) while a ``ddp`` rank trains on its share of every batch
_SHARE: list[tuple[int, int]] = []


@contextlib.contextmanager
def batch_share(rank: int, world: int) -> Iterator[None]:
    """Within this block, generated layers see rows ``[rank * n, (rank + 1) * n)`` of each batch."""
    _SHARE.append((rank, world))
    try:
        yield
    finally:
        _SHARE.pop()


def _whole(shape: torch.Size) -> tuple[int, ...]:
    return tuple(shape) if not _SHARE else (shape[0] * _SHARE[-1][1],) + tuple(shape[1:])


def _rows(x: torch.Tensor) -> torch.Tensor:
    if not _SHARE:
        return x
    rank, world = _SHARE[-1]
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def _batch_first(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    return lambda **kw: cls(batch_first=True, **kw)


@dataclass(frozen=True)
class LayerInfo:
    """The torch side of a kind (``kinds.KindInfo`` holds the rest)."""

    kind: str
    cls: type[nn.Module]  # a user's module of this class (or a subclass) is this kind
    make: Callable[..., nn.Module]  # builds the generated layer from its scenario arguments


LAYERS: tuple[LayerInfo, ...] = (
    LayerInfo("linear", nn.Linear, nn.Linear),
    LayerInfo("conv1d", nn.Conv1d, nn.Conv1d),
    LayerInfo("conv2d", nn.Conv2d, nn.Conv2d),
    LayerInfo("embedding", nn.Embedding, nn.Embedding),
    LayerInfo("lstm", nn.LSTM, _batch_first(nn.LSTM)),
    LayerInfo("gru", nn.GRU, _batch_first(nn.GRU)),
    LayerInfo("rnn", nn.RNN, _batch_first(nn.RNN)),
    LayerInfo("layernorm", nn.LayerNorm, nn.LayerNorm),
    LayerInfo("batchnorm1d", nn.BatchNorm1d, nn.BatchNorm1d),
    LayerInfo("batchnorm2d", nn.BatchNorm2d, nn.BatchNorm2d),
    LayerInfo("groupnorm", nn.GroupNorm, nn.GroupNorm),
    LayerInfo("mha", nn.MultiheadAttention, _batch_first(nn.MultiheadAttention)),
    LayerInfo("dropout", nn.Dropout, SeededDropout),
)
BY_KIND: dict[str, LayerInfo] = {row.kind: row for row in LAYERS}
assert tuple(BY_KIND) == tuple(KIND), "every kind has its torch class, in the table's order"
#: classes that count as a kind in a user's model beyond the rows' own (a BatchNorm3d is a BatchNorm)
_FAMILIES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.batchnorm._BatchNorm, "batchnorm"),
    (nn.modules.dropout._DropoutNd, "dropout"),
    (nn.modules.instancenorm._InstanceNorm, "instancenorm"),
)


def kind_of(module: nn.Module) -> str:
    """The layer kind of any module: a row's kind, a family (``batchnorm``), or its class name."""
    for row in LAYERS:
        if isinstance(module, row.cls):
            return row.kind
    for cls, family in _FAMILIES:
        if isinstance(module, cls):
            return family
    return type(module).__name__


def train_mode_effect(module: nn.Module) -> str:
    """What training mode changes in ``module`` itself ("" when nothing that we know of)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return KIND["batchnorm1d"].train_mode if module.track_running_stats or module.training else ""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return KIND["dropout"].train_mode if module.p > 0 else ""
    return ""


def build_layer(kind: str, kwargs: dict) -> nn.Module:
    return BY_KIND[kind].make(**kwargs)
