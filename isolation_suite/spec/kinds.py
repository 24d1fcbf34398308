"""Layer kinds, declared once (the way PyTorch's ``common_modules.py`` declares ``ModuleInfo``).

Pure data, no torch: the scenario validates against it, ``layers`` adds the torch class and
constructor of each kind, the strategies draw from it, the oracle and the catalog's conditions
read how each behaves in training mode and which weight a reparameterization wraps.
"""
from __future__ import annotations

from dataclasses import dataclass

SIZE, SMALL, FLAG, RATE = "size", "small", "flag", "rate"
LAYOUTS = ("vec", "seq", "chan1", "chan2")  # (F,), (L, F), (C, L), (C, H, W); "tokens" is (L,) of ints
_CONV_ARGS = {"in_channels": (SIZE, True), "out_channels": (SIZE, True), "kernel_size": (SMALL, True),
              "stride": (SMALL, False), "padding": (SMALL, False), "dilation": (SMALL, False),
              "groups": (SIZE, False), "bias": (FLAG, False)}
_RECURRENT_ARGS = {"input_size": (SIZE, True), "hidden_size": (SIZE, True)}
BATCHNORM_EFFECT = "normalises with batch statistics and updates its running stats"


@dataclass(frozen=True)
class KindInfo:
    kind: str
    #: argument -> (sort of value, required): sizes 1..MAX_WIDTH, small 0/1..MAX_KERNEL, flags, rates in [0, 1)
    args: dict[str, tuple[str, bool]]
    #: the layouts it works on as they are, mapping them onto the same layout (no reshape first)
    in_place: tuple[str, ...] = LAYOUTS
    #: the layout it moves the value into first when it is not in ``in_place``
    needs: str = ""
    returns_tuple: bool = False  # (output, state) or (output, weights): a block unpacks it
    called_with: str = "x"  # "x", or "x,x,x" (attention: query, key, value)
    preserving: bool = True  # can be drawn so that it maps a shape onto itself (reuse, residuals)
    train_mode: str = ""  # what training mode changes in it ("" when nothing)
    reparam_weight: str = ""  # the weight a reparameterization wraps ("" when none is wrapped)
    parameters: bool = True


KINDS: tuple[KindInfo, ...] = (
    KindInfo("linear", {"in_features": (SIZE, True), "out_features": (SIZE, True), "bias": (FLAG, False)},
             reparam_weight="weight"),
    KindInfo("conv1d", _CONV_ARGS, in_place=("chan1",), needs="chan1", reparam_weight="weight"),
    KindInfo("conv2d", _CONV_ARGS, in_place=("chan2",), needs="chan2", reparam_weight="weight"),
    KindInfo("embedding", {"num_embeddings": (SIZE, True), "embedding_dim": (SIZE, True)}, in_place=(),
             preserving=False),
    *(KindInfo(k, _RECURRENT_ARGS, in_place=("seq",), needs="seq", returns_tuple=True,
               reparam_weight="weight_hh_l0") for k in ("lstm", "gru", "rnn")),
    KindInfo("layernorm", {"normalized_shape": (SIZE, True), "elementwise_affine": (FLAG, False)}),
    KindInfo("batchnorm1d", {"num_features": (SIZE, True)}, in_place=("vec", "chan1"), needs="chan1",
             train_mode=BATCHNORM_EFFECT),
    KindInfo("batchnorm2d", {"num_features": (SIZE, True)}, in_place=("chan2",), needs="chan2",
             train_mode=BATCHNORM_EFFECT),
    KindInfo("groupnorm", {"num_groups": (SIZE, True), "num_channels": (SIZE, True)},
             in_place=("vec", "chan1", "chan2")),
    KindInfo("mha", {"embed_dim": (SIZE, True), "num_heads": (SIZE, True)}, in_place=("seq",), needs="seq",
             returns_tuple=True, called_with="x,x,x"),
    KindInfo("dropout", {"p": (RATE, True)}, train_mode="drops units", parameters=False),
)
BY_KIND: dict[str, KindInfo] = {k.kind: k for k in KINDS}
LAYER_KINDS = tuple(k.kind for k in KINDS)
TUPLE_KINDS = tuple(k.kind for k in KINDS if k.returns_tuple)
REPARAM_KINDS = tuple(k.kind for k in KINDS if k.reparam_weight)
SHAPE_PRESERVING = tuple(k.kind for k in KINDS if k.preserving)


def in_place(layout: str, *, chained: bool = False) -> tuple[str, ...]:
    """Kinds that work on ``layout`` as it is; ``chained``: and return one tensor (for a Sequential)."""
    return tuple(k.kind for k in KINDS if layout in k.in_place and not (chained and k.returns_tuple))
