"""Layer kinds, declared once (the way PyTorch's ``common_modules.py`` declares ``ModuleInfo``).

Each :class:`LayerInfo` row says how a generated layer is built, which class a module of a user's
model must be to count as that kind, how it behaves in training mode, the layout it works in,
and which weight a reparameterization wraps. ``build``, ``tree``, the catalog's conditions and
the strategies read this table instead of knowing kinds themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class SeededDropout(nn.Dropout):
    """Dropout whose mask is drawn on the CPU, so CPU and CUDA runs drop the same entries.

    The runner seeds the CPU generator before every module call (from the step, micro-batch,
    module path and use), which makes the mask a function of those only.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # drawn in float32 whatever the dtype, so a float64 re-run drops the same units
        keep = (torch.rand(x.shape) >= self.p).to(x.device)
        return x * keep / (1.0 - self.p)


def _batch_first(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    return lambda **kw: cls(batch_first=True, **kw)


@dataclass(frozen=True)
class LayerInfo:
    kind: str
    cls: type[nn.Module]  # a user's module of this class (or a subclass) is this kind
    make: Callable[..., nn.Module]  # builds the generated layer from its scenario arguments
    layout: str  # the value it works on: "any" (last axis), "vec", "seq", "chan1", "chan2", "tokens"
    train_mode: str = ""  # what training mode changes, "" when nothing
    reparam_weight: str = ""  # the weight a reparameterization wraps; "" when none is wrapped
    shape_preserving: bool = True  # can map a value onto its own shape (reuse, residuals)
    called_with: str = "x"  # "x" or "x,x,x" (attention: query, key, value)


LAYERS: tuple[LayerInfo, ...] = (
    LayerInfo("linear", nn.Linear, nn.Linear, "any", reparam_weight="weight"),
    LayerInfo("conv1d", nn.Conv1d, nn.Conv1d, "chan1", reparam_weight="weight"),
    LayerInfo("conv2d", nn.Conv2d, nn.Conv2d, "chan2", reparam_weight="weight"),
    LayerInfo("embedding", nn.Embedding, nn.Embedding, "tokens", shape_preserving=False),
    LayerInfo("lstm", nn.LSTM, _batch_first(nn.LSTM), "seq", reparam_weight="weight_hh_l0"),
    LayerInfo("gru", nn.GRU, _batch_first(nn.GRU), "seq", reparam_weight="weight_hh_l0"),
    LayerInfo("rnn", nn.RNN, _batch_first(nn.RNN), "seq", reparam_weight="weight_hh_l0"),
    LayerInfo("layernorm", nn.LayerNorm, nn.LayerNorm, "any"),
    LayerInfo("batchnorm1d", nn.BatchNorm1d, nn.BatchNorm1d, "chan1",
              train_mode="normalises with batch statistics and updates its running stats"),
    LayerInfo("batchnorm2d", nn.BatchNorm2d, nn.BatchNorm2d, "chan2",
              train_mode="normalises with batch statistics and updates its running stats"),
    LayerInfo("groupnorm", nn.GroupNorm, nn.GroupNorm, "any"),
    LayerInfo("mha", nn.MultiheadAttention, _batch_first(nn.MultiheadAttention), "seq", called_with="x,x,x"),
    LayerInfo("dropout", nn.Dropout, SeededDropout, "any", train_mode="drops units"),
)
BY_KIND: dict[str, LayerInfo] = {row.kind: row for row in LAYERS}
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
        return BY_KIND["batchnorm1d"].train_mode if module.track_running_stats or module.training else ""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return BY_KIND["dropout"].train_mode if module.p > 0 else ""
    return ""


def build_layer(kind: str, kwargs: dict) -> nn.Module:
    return BY_KIND[kind].make(**kwargs)
