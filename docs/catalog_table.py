#!/usr/bin/env python
"""Generate the catalog table of docs/catalog.md from the code.

    python docs/catalog_table.py           # print the table
    python docs/catalog_table.py --write   # rewrite the block between the markers in docs/catalog.md
    python docs/catalog_table.py --check   # exit 1 when docs/catalog.md's block is stale

One row per entry of ``isolation_suite.techniques.CATALOG``: the technique's name, seed,
capabilities and one-line summary, its expected verdict (``expected_violations``, plus the
invariants it is known to break under one execution mode only, ``mode_violations``) and the
conditions under which each expected violation shows up (``CatalogEntry.conditions``).
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the shared block helper, wherever this script is loaded from
    sys.path.insert(0, str(HERE))

from generated_block import GeneratedBlock  # noqa: E402 - after the path it lives on

CATALOG_MD = HERE / "catalog.md"

#: the order modes are listed in; a mode not named here comes after these, alphabetically
from isolation_suite.spec.mode_kinds import MODE_KINDS as MODE_ORDER  # noqa: E402


def _cell(text: str) -> str:
    """``text`` made safe for one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _ids(invariants) -> str:
    return ", ".join(f"`{x}`" for x in sorted(invariants))


def _mode_key(mode: str) -> tuple[int, str]:
    return (MODE_ORDER.index(mode), "") if mode in MODE_ORDER else (len(MODE_ORDER), mode)


def _modes_key(modes: tuple[str, ...]) -> tuple:
    return (0,) if not modes else (1, *sorted(_mode_key(m) for m in modes))


def verdict(technique) -> str:
    """``sound`` or the expected invariants, then what each execution mode adds."""
    expected = frozenset(technique.expected_violations)
    parts = [_ids(expected) if expected else "sound"]
    for mode in sorted(technique.mode_violations, key=_mode_key):
        extra = frozenset(technique.mode_violations[mode]) - expected
        if extra:
            parts.append(f"under `{mode}`: {_ids(extra)}")
    return "<br>".join(parts)


def breaks(entry) -> str:
    """The row's conditions: every mode's first, then each mode's own; one description with
    several invariants is given once."""
    grouped: dict[tuple[tuple[str, ...], str], list[str]] = {}
    for condition in sorted(entry.conditions, key=lambda c: _modes_key(tuple(c.modes))):
        key = (tuple(sorted(condition.modes, key=_mode_key)), condition.description)
        grouped.setdefault(key, [])
        if condition.invariant not in grouped[key]:
            grouped[key].append(condition.invariant)
    lines = []
    for (modes, description), invariants in grouped.items():
        where = f"under {', '.join(f'`{m}`' for m in modes)}: " if modes else ""
        lines.append(f"{where}{_cell(description)} ({', '.join(f'`{x}`' for x in invariants)})")
    return "<br>".join(lines)


def table() -> str:
    """The catalog as a Markdown table (ends with a newline)."""
    from isolation_suite.techniques import CATALOG

    rows = ["| technique | seed | capability | what it does | verdict | what breaks it |",
            "|---|---|---|---|---|---|"]
    for entry in CATALOG:
        t = entry.technique
        capabilities = ", ".join(sorted(c.name for c in t.capabilities))
        rows.append("| " + " | ".join([
            f"`{t.name}`",
            _cell(t.seed) or "—",
            capabilities,
            _cell(t.summary),
            verdict(t),
            breaks(entry),
        ]) + " |")
    return "\n".join(rows) + "\n"


GENERATED = GeneratedBlock(CATALOG_MD, "catalog", "catalog_table.py", "isolation_suite.techniques.CATALOG",
                           "the catalog table", table)
block, current_block = GENERATED.block, GENERATED.current_block


def main(argv: list[str] | None = None) -> int:
    return GENERATED.main(argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
