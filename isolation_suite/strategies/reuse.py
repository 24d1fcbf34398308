"""The three reuse patterns: one layer at several call sites, tied parameters,
and a sub-module called before and after another (encoder -> generator -> encoder)."""
from __future__ import annotations

from hypothesis import strategies as st

from isolation_suite.spec import kinds
from isolation_suite.spec.scenario import Op

from isolation_suite.strategies._draft import (CHILD_NAMES, PLAIN_KIND, TOP_NAMES, Draft, fresh_name, leaf,
                                               maybe_activation, prepare_for)

#: kinds that map a value onto itself without first changing its layout (``kinds.KindInfo.in_place``)
_IN_PLACE = {layout: kinds.in_place(layout) for layout in kinds.LAYOUTS}


def _in_place_kinds(d: Draft, with_params: bool = False) -> list[str]:
    pool = [k for k in _IN_PLACE[d.layout] if k in d.kinds and (not with_params or k in kinds.PARAM_KINDS)]
    return pool or [PLAIN_KIND]


def block_reused_layer(draw, d: Draft, prefix: str = "") -> None:
    """One parameterised layer called at 2-3 call sites in a row (seed 000)."""
    reusable = [k for k in d.kinds if k in kinds.REUSABLE_KINDS] or [PLAIN_KIND]
    kind = draw(st.sampled_from(reusable))
    prepare_for(draw, d, kind)
    path = leaf(draw, d, fresh_name(draw, TOP_NAMES, d.used_names, prefix), kind, preserve=True)
    for _ in range(draw(st.integers(1, 2))):
        maybe_activation(draw, d)
        d.emit(Op("call", path))


def _in_place_container(draw, d: Draft, pool: tuple[str, ...]) -> str:
    """A container of 1-2 shape-preserving children; returns its path."""
    name = fresh_name(draw, pool, d.used_names)
    previous = d.open(name)
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(_in_place_kinds(d)))
        leaf(draw, d, fresh_name(draw, CHILD_NAMES, d.used_names, name + "."), kind, preserve=True)
        maybe_activation(draw, d)
    d.close(draw, name, previous)
    return name


def block_sandwich(draw, d: Draft, prefix: str = "") -> None:
    """``enc`` -> ``gen`` -> ``enc`` again: one encoder module called before and after a generator,
    all shape-preserving (seed 003)."""
    encoder = _in_place_container(draw, d, ("enc", "encoder") + TOP_NAMES)
    _in_place_container(draw, d, ("gen", "generator") + TOP_NAMES)
    d.emit(d.program[-2] if d.program[-2].target == encoder else Op("call", encoder))


def block_tied(draw, d: Draft, prefix: str = "") -> None:
    """Two square Linear layers sharing one weight ``Parameter``."""
    first = leaf(draw, d, fresh_name(draw, TOP_NAMES, d.used_names), "linear", preserve=True)
    maybe_activation(draw, d)
    second = leaf(draw, d, fresh_name(draw, TOP_NAMES, d.used_names), "linear", preserve=True)
    d.ties.append((second + ".weight", first + ".weight"))
