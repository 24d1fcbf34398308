"""Element indices inside one parameter: single entries, several, corners, all-but-one, all."""
from __future__ import annotations

import itertools

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

PATTERNS = ("single", "several", "corners", "all_but_one", "all")


@st.composite
def element_indices(draw, shape: tuple[int, ...], patterns: tuple[str, ...] = PATTERNS):
    """Draw a sorted tuple of distinct index tuples into a tensor of ``shape``.

    >>> element_indices((2, 3))  # doctest: +ELLIPSIS
    element_indices(...)
    """
    shape = tuple(shape)
    if not shape or any((not isinstance(s, int)) or s < 1 for s in shape):
        raise InvalidArgument(f"shape={shape!r} must be a non-empty tuple of positive ints")
    for p in patterns:
        if p not in PATTERNS:
            raise InvalidArgument(f"patterns contains {p!r}, which is not one of {PATTERNS}")
    every = list(itertools.product(*(range(s) for s in shape)))
    pattern = draw(st.sampled_from(patterns))
    if pattern == "single" or len(every) == 1:
        chosen = [draw(st.sampled_from(every))]
    elif pattern == "several":
        chosen = draw(st.lists(st.sampled_from(every), min_size=2, max_size=min(4, len(every)), unique=True))
    elif pattern == "corners":
        chosen = [every[0], every[-1]]
    elif pattern == "all_but_one":
        skip = draw(st.sampled_from(every))
        chosen = [i for i in every if i != skip]
    else:
        chosen = every
    return tuple(sorted(set(chosen)))
