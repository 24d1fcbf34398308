"""Layer kinds, declared once (the way PyTorch's ``common_modules.py`` declares ``ModuleInfo``).

Pure data, no torch: the scenario validates against it, ``layers`` adds the torch class and
constructor of each kind (``layers.LAYERS``, keyed by the same names), the strategies draw from it
(``strategies._draft.DRAW_ARGS``: how each kind's arguments are drawn, keyed by the same names), the
oracle and the catalog's conditions read how each behaves in training mode and which weight a
reparameterization wraps. Every subset of kinds is computed from the rows (:func:`kinds_where`),
never typed by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from isolation_suite.spec._tables import where

SIZE, SMALL, FLAG, RATE = "size", "small", "flag", "rate"
LAYOUTS = ("vec", "seq", "chan1", "chan2")  # (F,), (L, F), (C, L), (C, H, W); "tokens" is (L,) of ints
_CONV_ARGS = {"in_channels": (SIZE, True), "out_channels": (SIZE, True), "kernel_size": (SMALL, True),
              "stride": (SMALL, False), "padding": (SMALL, False), "dilation": (SMALL, False),
              "groups": (SIZE, False), "bias": (FLAG, False)}
_RECURRENT_ARGS = {"input_size": (SIZE, True), "hidden_size": (SIZE, True)}
#: what training mode changes (``KindInfo.train_mode``; a tree's ``Node.train_mode`` holds one of them)
BATCHNORM_EFFECT = "normalises with batch statistics and updates its running stats"
DROPOUT_EFFECT = "drops units"


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
    #: it takes token ids (the model's first layer, drawn with a token input), not a float value
    takes_tokens: bool = False
    #: in training mode it normalises with the statistics of the batch it sees (it needs more than one
    #: row, and a ddp rank, seeing its share of the batch, would differ from the whole batch by design)
    batch_statistics: bool = False
    #: in training mode it draws random numbers (on the model's device, unless it is ``SeededDropout``)
    random: bool = False
    #: when a drawn layer maps its input's shape onto itself: () always, pairs of arguments that must be
    #: equal, None never known to (a convolution's lengths shrink with stride and padding)
    same_shape_if: tuple[tuple[str, str], ...] | None = ()

    def keeps_shape(self, args: dict[str, Any]) -> bool:
        """A layer of this kind with ``args`` maps its input's shape onto itself."""
        return self.same_shape_if is not None and all(args[a] == args[b] for a, b in self.same_shape_if)


KINDS: tuple[KindInfo, ...] = (
    KindInfo("linear", {"in_features": (SIZE, True), "out_features": (SIZE, True), "bias": (FLAG, False)},
             reparam_weight="weight", same_shape_if=(("in_features", "out_features"),)),
    KindInfo("conv1d", _CONV_ARGS, in_place=("chan1",), needs="chan1", reparam_weight="weight", same_shape_if=None),
    KindInfo("conv2d", _CONV_ARGS, in_place=("chan2",), needs="chan2", reparam_weight="weight", same_shape_if=None),
    KindInfo("embedding", {"num_embeddings": (SIZE, True), "embedding_dim": (SIZE, True)}, in_place=(),
             preserving=False, takes_tokens=True, same_shape_if=None),
    *(KindInfo(k, _RECURRENT_ARGS, in_place=("seq",), needs="seq", returns_tuple=True,
               reparam_weight="weight_hh_l0", same_shape_if=(("input_size", "hidden_size"),))
      for k in ("lstm", "gru", "rnn")),
    KindInfo("layernorm", {"normalized_shape": (SIZE, True), "elementwise_affine": (FLAG, False)}),
    KindInfo("batchnorm1d", {"num_features": (SIZE, True)}, in_place=("vec", "chan1"), needs="chan1",
             train_mode=BATCHNORM_EFFECT, batch_statistics=True),
    KindInfo("batchnorm2d", {"num_features": (SIZE, True)}, in_place=("chan2",), needs="chan2",
             train_mode=BATCHNORM_EFFECT, batch_statistics=True),
    KindInfo("groupnorm", {"num_groups": (SIZE, True), "num_channels": (SIZE, True)},
             in_place=("vec", "chan1", "chan2")),
    KindInfo("mha", {"embed_dim": (SIZE, True), "num_heads": (SIZE, True)}, in_place=("seq",), needs="seq",
             returns_tuple=True, called_with="x,x,x"),
    KindInfo("dropout", {"p": (RATE, True)}, train_mode=DROPOUT_EFFECT, parameters=False, random=True),
)
BY_KIND: dict[str, KindInfo] = {k.kind: k for k in KINDS}
LAYER_KINDS = tuple(k.kind for k in KINDS)


def kinds_where(**properties: Any) -> tuple[str, ...]:
    """The kinds whose rows have these properties, in table order; a bool asks for truthiness
    (``kinds_where(train_mode=True)``: those training mode changes)."""
    return where(KINDS, **properties)


TUPLE_KINDS = kinds_where(returns_tuple=True)
REPARAM_KINDS = kinds_where(reparam_weight=True)
SHAPE_PRESERVING = kinds_where(preserving=True)
PARAM_KINDS = kinds_where(parameters=True)
STATELESS_KINDS = kinds_where(parameters=False)
TRAIN_MODE_KINDS = kinds_where(train_mode=True)
BATCH_STATISTICS_KINDS = kinds_where(batch_statistics=True)
RANDOM_KINDS = kinds_where(random=True)
TOKEN_KINDS = kinds_where(takes_tokens=True)
#: what a block draws from a float value (a token layer comes first, with the token input)
FLOAT_KINDS = kinds_where(takes_tokens=False)
#: one layer with parameters of its own, at several call sites (``strategies.reuse``)
REUSABLE_KINDS = kinds_where(parameters=True, takes_tokens=False)


def in_place(layout: str, *, chained: bool = False) -> tuple[str, ...]:
    """Kinds that work on ``layout`` as it is; ``chained``: and return one tensor (for a Sequential)."""
    return tuple(k.kind for k in KINDS if layout in k.in_place and not (chained and k.returns_tuple))
