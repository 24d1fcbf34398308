"""The torch side of the layer kinds (``kinds`` declares the rest, keyed by the same names): how a
generated layer is built, which class a module of a user's model must be to count as that kind, and
when the kind's training-mode effect is live in a module.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from isolation_suite.spec.kinds import BY_KIND as KIND
from isolation_suite.spec.kinds import LAYER_KINDS


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


def _always(module: nn.Module) -> bool:
    return True


def _tracks_or_trains(module: nn.Module) -> bool:
    """Training mode changes a BatchNorm unless it tracks no running statistics and is left in eval
    mode (it normalises with the batch's statistics in both)."""
    return module.track_running_stats or module.training


def _drops(module: nn.Module) -> bool:
    return module.p > 0


@dataclass(frozen=True)
class LayerInfo:
    """The torch side of a kind (``kinds.KindInfo`` holds the rest, under the same name)."""

    kind: str
    cls: type[nn.Module]  # a user's module of this class (or a subclass) is this kind
    make: Callable[..., nn.Module]  # builds the generated layer from its scenario arguments
    #: the wider class a user's module may be instead, and the kind name it then gets (a BatchNorm3d
    #: is a ``batchnorm``): it behaves as this row's kind in training mode
    family: tuple[type[nn.Module], str] | None = None
    #: the kind's training-mode effect (``KindInfo.train_mode``) is live in this module
    live: Callable[[nn.Module], bool] = _always
    #: a tiny instance's arguments and the shape of its input (``warm_up_kernels``), as PyTorch's
    #: ``ModuleInfo`` declares sample inputs; a convolution's is grouped (oneDNN's path)
    example: tuple[dict, tuple[int, ...]] = ({}, ())


_BATCHNORM = (nn.modules.batchnorm._BatchNorm, "batchnorm")
_RECURRENT_EXAMPLE = ({"input_size": 2, "hidden_size": 2}, (2, 2, 2))
_CONV_EXAMPLE = {"in_channels": 4, "out_channels": 4, "kernel_size": 2, "groups": 2}  # grouped, not depthwise
LAYERS: tuple[LayerInfo, ...] = (
    LayerInfo("linear", nn.Linear, nn.Linear, example=({"in_features": 2, "out_features": 2}, (2, 2))),
    LayerInfo("conv1d", nn.Conv1d, nn.Conv1d, example=(_CONV_EXAMPLE, (2, 4, 3))),
    LayerInfo("conv2d", nn.Conv2d, nn.Conv2d, example=(_CONV_EXAMPLE, (2, 4, 3, 3))),
    LayerInfo("embedding", nn.Embedding, nn.Embedding, example=({"num_embeddings": 3, "embedding_dim": 2}, (2, 2))),
    LayerInfo("lstm", nn.LSTM, _batch_first(nn.LSTM), example=_RECURRENT_EXAMPLE),
    LayerInfo("gru", nn.GRU, _batch_first(nn.GRU), example=_RECURRENT_EXAMPLE),
    LayerInfo("rnn", nn.RNN, _batch_first(nn.RNN), example=_RECURRENT_EXAMPLE),
    LayerInfo("layernorm", nn.LayerNorm, nn.LayerNorm, example=({"normalized_shape": 2}, (2, 2))),
    LayerInfo("batchnorm1d", nn.BatchNorm1d, nn.BatchNorm1d, _BATCHNORM, _tracks_or_trains,
              example=({"num_features": 2}, (2, 2))),
    LayerInfo("batchnorm2d", nn.BatchNorm2d, nn.BatchNorm2d, _BATCHNORM, _tracks_or_trains,
              example=({"num_features": 2}, (2, 2, 2, 2))),
    LayerInfo("groupnorm", nn.GroupNorm, nn.GroupNorm, example=({"num_groups": 1, "num_channels": 2}, (2, 2, 2))),
    LayerInfo("mha", nn.MultiheadAttention, _batch_first(nn.MultiheadAttention),
              example=({"embed_dim": 2, "num_heads": 1}, (2, 2, 2))),
    LayerInfo("dropout", nn.Dropout, SeededDropout, (nn.modules.dropout._DropoutNd, "dropout"), _drops,
              example=({"p": 0.5}, (2, 2))),
)
BY_KIND: dict[str, LayerInfo] = {row.kind: row for row in LAYERS}
assert tuple(BY_KIND) == LAYER_KINDS, "every kind has its torch class, in the table's order"


def _families() -> tuple[tuple[type[nn.Module], str, LayerInfo | None], ...]:
    first: dict[tuple[type[nn.Module], str], LayerInfo] = {}
    for row in LAYERS:
        if row.family is not None:
            first.setdefault(row.family, row)
    return tuple((cls, name, row) for (cls, name), row in first.items()) + (
        (nn.modules.instancenorm._InstanceNorm, "instancenorm", None),)


#: classes that count as a kind in a user's model beyond the rows' own (a BatchNorm3d is a BatchNorm),
#: each with the row it behaves as in training mode (its first; None: no effect we know of)
_FAMILIES = _families()


def _row_of(module: nn.Module) -> tuple[str, LayerInfo | None]:
    """The module's kind name and the row it behaves as (a family's first row; None: none)."""
    for row in LAYERS:
        if isinstance(module, row.cls):
            return row.kind, row
    for cls, family, row in _FAMILIES:
        if isinstance(module, cls):
            return family, row
    return type(module).__name__, None


def kind_of(module: nn.Module) -> str:
    """The layer kind of any module: a row's kind, a family (``batchnorm``), or its class name."""
    return _row_of(module)[0]


def train_mode_effect(module: nn.Module) -> str:
    """What training mode changes in ``module`` itself ("" when nothing that we know of)."""
    row = _row_of(module)[1]
    return KIND[row.kind].train_mode if row is not None and row.live(module) else ""


def build_layer(kind: str, kwargs: dict) -> nn.Module:
    return BY_KIND[kind].make(**kwargs)


#: this process ran ``warm_up_kernels`` (a child forked after it inherits what it built)
_KERNELS_WARM: list[bool] = []


def warm_up_kernels() -> None:
    """One training-mode forward of every kind's ``example``, once per process, on the CPU.

    What torch's CPU kernels build on their first use in a process is then built here, and a sandbox
    child forked after this inherits it instead of building it again in every child: oneDNN's
    set-up at a process's first grouped convolution or recurrent layer alone takes about 65 ms, paid
    by each technique's child in a sweep (after a forward here, about 3 ms). No backward: on a
    machine with a GPU, autograd's first backward starts device threads that a forked child cannot
    use, and the first child is forked right after this. Speed only: the random number generator
    is left as it was, and a failure leaves the kernels to the runs."""
    if _KERNELS_WARM:
        return
    _KERNELS_WARM.append(True)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for row in LAYERS:
                _example_forward(row)
    except Exception:  # noqa: BLE001 - a kernel this torch lacks: each run meets that itself
        pass


def _example_forward(row: LayerInfo) -> torch.Tensor:
    """The kind's example layer, in training mode, called on its example input: its output."""
    arguments, shape = row.example
    layer = row.make(**arguments).train()
    if KIND[row.kind].takes_tokens:
        x = torch.zeros(shape, dtype=torch.long)
    else:
        x = torch.ones(shape, dtype=torch.float32, requires_grad=torch.is_grad_enabled())
    out = layer(*([x] * len(KIND[row.kind].called_with.split(","))))
    return out[0] if KIND[row.kind].returns_tuple else out
