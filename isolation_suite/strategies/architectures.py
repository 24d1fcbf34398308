"""Random module architectures whose shapes are valid by construction.

An architecture is drawn as a chain of *blocks* (a layer, a residual block, a
container of layers, or one of the reuse patterns in :mod:`strategies.reuse`).
Containers are real modules (``block``, ``nn.Sequential``, a residual block, an
``nn.ModuleList`` looped over by its parent) and can nest. A small mutable
:class:`~isolation_suite.strategies._draft.Draft` tracks the current value's layout and shape and
the program each container is writing while blocks are drawn; what comes out is a frozen
:class:`isolation_suite.Architecture`.

>>> from strategies import architectures
>>> architectures(max_blocks=2)  # doctest: +ELLIPSIS
architectures(...)
"""
from __future__ import annotations

from typing import Callable

from hypothesis import strategies as st

from isolation_suite.spec import kinds
from isolation_suite.spec.scenario import LAYER_KINDS, Architecture, Container, Op

from isolation_suite.strategies import reuse
from isolation_suite.strategies._draft import (CHILD_NAMES, DRAW_ARGS, KNOB_COUNT, PLAIN_KIND, TOP_NAMES,  # noqa: F401 - the draft's names, as before
                                               Draft, Knobs, divisors, fresh_name, leaf, maybe_activation, prepare_for,
                                               rename, to_layout)
from isolation_suite.strategies._validate import check_choice, check_int

SIZES = st.integers(1, 4)
# (``architectures`` takes a ``kinds`` argument: the tables' subsets are read under these names)
SHAPE_PRESERVING = kinds.SHAPE_PRESERVING
TUPLE_KINDS = kinds.TUPLE_KINDS
REPARAM_KINDS = kinds.REPARAM_KINDS
PARAM_KINDS = kinds.PARAM_KINDS
TOKEN_KINDS = kinds.TOKEN_KINDS
LAYOUTS = kinds.LAYOUTS


# --- blocks ------------------------------------------------------------------------------

def _kind(draw, d: Draft, preserve: bool = False) -> str:
    pool = [k for k in d.kinds if k in kinds.FLOAT_KINDS and (not preserve or k in SHAPE_PRESERVING)]
    return draw(st.sampled_from(pool))


def block_layer(draw, d: Draft, prefix: str = "") -> None:
    leaf(draw, d, fresh_name(draw, TOP_NAMES if not prefix else CHILD_NAMES, d.used_names, prefix),
         _kind(draw, d))
    maybe_activation(draw, d)


def block_residual(draw, d: Draft, prefix: str = "") -> None:
    """``x + f(x)``: a ``Residual`` container (or, around a layer that returns a tuple, a block
    that saves and adds) holding one shape-preserving layer."""
    kind = _kind(draw, d, preserve=True)
    prepare_for(draw, d, kind)
    name = fresh_name(draw, TOP_NAMES if not prefix else CHILD_NAMES, d.used_names, prefix)
    previous = d.open(name)
    tuple_out = kind in TUPLE_KINDS
    if tuple_out:
        d.emit(Op("save"))
    leaf(draw, d, fresh_name(draw, CHILD_NAMES, d.used_names, name + "."), kind, preserve=True)
    if tuple_out:
        d.emit(Op("add"))
    d.close(draw, name, previous, "block" if tuple_out else "residual")
    # every block ends with an optional activation: equal draw counts keep shrinking fair
    maybe_activation(draw, d)


def block_container(draw, d: Draft, depth: int = 0, prefix: str = "", preserve: bool = False) -> str:
    """A named sub-module holding 1-3 children (layers or, once, another container). Its kind is
    drawn first: a ``block`` runs activations and reshapes between its children and may call one
    child twice; an ``nn.Sequential`` or a looped ``nn.ModuleList`` only chains children that work
    on the current layout and return one tensor."""
    name = fresh_name(draw, TOP_NAMES if not prefix else CHILD_NAMES, d.used_names, prefix)
    kind = draw(st.sampled_from(("block", "sequential", "modulelist")))
    chained = kind != "block"
    previous = d.open(name)
    for _ in range(draw(st.integers(1, 3 if depth == 0 else 2))):
        if depth == 0 and not preserve and draw(st.integers(0, 4)) == 4:
            block_container(draw, d, depth + 1, prefix=name + ".")
            continue
        if chained:
            pool = [k for k in _IN_PLACE_KINDS[d.layout] if k in d.kinds and (not preserve or k in SHAPE_PRESERVING)]
            child_kind = draw(st.sampled_from(pool or [PLAIN_KIND]))
        else:
            child_kind = _kind(draw, d, preserve=preserve)
            if preserve:
                prepare_for(draw, d, child_kind)
        child = leaf(draw, d, fresh_name(draw, CHILD_NAMES, d.used_names, name + "."), child_kind, preserve=preserve)
        if not chained:
            maybe_activation(draw, d)
            if draw(st.integers(0, 5)) == 5 and child_kind in kinds.REUSABLE_KINDS and _same_shape(d, child):
                d.emit(Op("call", child))  # a child called twice by its container
    d.close(draw, name, previous, kind if kind in d.allowed_kinds(name) else "block")
    return name


#: kinds that work on a layout as it is (no reshape first) and return one tensor
_IN_PLACE_KINDS = {layout: kinds.in_place(layout, chained=True) for layout in kinds.LAYOUTS}


def _same_shape(d: Draft, path: str) -> bool:
    """The layer at ``path`` maps the current value onto its own shape (it can be called again)."""
    layer = next(l for l in d.layers if l.path == path)
    return kinds.BY_KIND[layer.kind].keeps_shape(layer.kwargs)


BlockFn = Callable[..., None]


@st.composite
def architectures(draw, *, max_blocks: int = 3, kinds: tuple[str, ...] = LAYER_KINDS,
                  require: frozenset[str] = frozenset()) -> Architecture:
    """Draw an :class:`Architecture`.

    ``kinds`` restricts the layer kinds; ``require`` asks for structures the
    intent will need: ``"reuse"`` (a module at two or more call sites),
    ``"trainable_pair"`` (at least two parameterised layers), ``"reparam"`` (a
    Linear, convolution or recurrent layer to wrap).
    """
    check_int("max_blocks", max_blocks, 1, 12)
    kinds = check_choice("kinds", kinds, LAYER_KINDS)
    check_choice("require", require or {"reuse"}, ("reuse", "trainable_pair", "reparam"))
    tokens = [k for k in kinds if k in TOKEN_KINDS]
    if tokens and draw(st.integers(0, 3)) == 3:
        k = Knobs(draw)
        length = k.pick(range(1, 5))
        d = Draft("tokens", (length,), kinds)
        leaf(draw, d, fresh_name(draw, TOP_NAMES, d.used_names), tokens[0], knobs=k)  # draws the vocabulary
        input_shape, input_kind = (length,), "tokens"
    else:
        layout = draw(st.sampled_from(LAYOUTS))
        shape = {"vec": 1, "seq": 2, "chan1": 2, "chan2": 3}[layout]
        dims = tuple(draw(SIZES) for _ in range(shape))
        d = Draft(layout, dims, kinds)
        input_shape, input_kind = dims, "float"
    blocks: dict[str, BlockFn] = {
        "layer": block_layer,
        "reuse": reuse.block_reused_layer,
        "sandwich": reuse.block_sandwich,
        "tied": reuse.block_tied,
        "residual": block_residual,
        "container": block_container,
    }
    # two blocks up front rather than appending one later: an appended layer makes that path
    # draw fewer choices, and the shrinker would then prefer it over the plain one
    least = 2 if "trainable_pair" in require else 1
    count = draw(st.integers(least, max(least, max_blocks)))
    # a required reuse block takes a drawn position (shrinking to the front) instead of being
    # appended; requirements are met by construction, never by filtering
    reuse_at = draw(st.integers(0, count - 1)) if "reuse" in require else -1
    for position in range(count):
        if position == reuse_at:
            reuse.block_reused_layer(draw, d)
        else:
            blocks[draw(st.sampled_from(tuple(blocks)))](draw, d)
    param_layers = [l for l in d.layers if l.kind in PARAM_KINDS]
    if "reparam" in require and not any(l.kind in REPARAM_KINDS and not _tied(d, l.path) for l in param_layers):
        leaf(draw, d, fresh_name(draw, TOP_NAMES, d.used_names), draw(st.sampled_from(
            [k for k in REPARAM_KINDS if k in kinds] or [PLAIN_KIND])))
    if "trainable_pair" in require:
        # two untied parameterised layers: one to isolate, one that keeps training
        while sum(l.kind in PARAM_KINDS and not _tied(d, l.path) for l in d.layers) < 2:
            leaf(draw, d, fresh_name(draw, TOP_NAMES, d.used_names), PLAIN_KIND)
    return Architecture(input_shape=input_shape, layers=tuple(d.layers), program=tuple(d.programs[""]),
                        input_kind=input_kind, vocab=d.vocab, ties=tuple(d.ties),
                        containers=tuple(Container(p, kind, tuple(d.programs[p])) for p, kind in d.containers.items()))



def _tied(d: Draft, path: str) -> bool:
    return any(t.startswith(path + ".") for tie in d.ties for t in tie)
