#!/usr/bin/env python
"""Generate the compatibility table of docs/compatibility.md from the code.

    python docs/compatibility_table.py           # print the table
    python docs/compatibility_table.py --write   # rewrite the block between the markers in docs/compatibility.md
    python docs/compatibility_table.py --check   # exit 1 when docs/compatibility.md's block is stale

One row per library row (``isolation_suite.techniques.library.library_rows()``): the library and the
version the verdicts were judged on, the technique, the models it was judged on, and per execution
mode the declared verdict (``sound`` or the expected invariants; ``—`` where it was not judged in that
mode). The installed version is not in the table (it is a fact of this machine, not of the code):
``isolation-suite list`` shows it.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the shared block helper, wherever this script is loaded from
    sys.path.insert(0, str(HERE))

from generated_block import GeneratedBlock  # noqa: E402 - after the path it lives on

PAGE = HERE / "compatibility.md"


def _models(row) -> str:
    return "<br>".join(f"`{m.rpartition(':')[2]}`" for m in row.models) or "generated"


def _verdict(text: str | None) -> str:
    if text is None:
        return "—"
    return "sound" if text == "sound" else ", ".join(f"`{x}`" for x in text.split(", "))


def table() -> str:
    """The library rows as a Markdown table (ends with a newline)."""
    from isolation_suite.techniques.library import library_modes, library_rows

    rows = library_rows()
    modes = library_modes(rows)
    out = ["| library | judged on | technique | what it does | models | " + " | ".join(modes) + " |",
           "|---|---|---|---|---|" + "---|" * len(modes)]
    for row in rows:
        summary = " ".join(row.technique.summary.split()).replace("|", "\\|")
        out.append(f"| {row.library} | {row.judged_on} | `{row.name}` | {summary} | {_models(row)} | "
                   + " | ".join(_verdict(row.verdict(m)) for m in modes) + " |")
    return "\n".join(out) + "\n"


GENERATED = GeneratedBlock(PAGE, "compatibility", "compatibility_table.py", "isolation_suite.techniques.library",
                           "the compatibility table", table)
block, current_block = GENERATED.block, GENERATED.current_block


def main(argv: list[str] | None = None) -> int:
    return GENERATED.main(argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
