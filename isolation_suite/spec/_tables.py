"""What the declaration tables (``kinds``, ``mode_kinds``) share: subsets computed from the rows."""
from __future__ import annotations

from typing import Any, Iterable


def where(rows: Iterable[Any], **properties: Any) -> tuple[str, ...]:
    """The ``kind`` of every row with these properties; a bool asks for truthiness
    (``reparam_weight=True``: a row that names one)."""
    return tuple(row.kind for row in rows if all(
        (bool(getattr(row, name)) if isinstance(wanted, bool) else getattr(row, name)) == wanted
        for name, wanted in properties.items()))
