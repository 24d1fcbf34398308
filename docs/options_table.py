#!/usr/bin/env python
"""Generate the options table of docs/cli.md from ``isolation_suite.engine.settings.OPTIONS``.

    python docs/options_table.py           # print the table
    python docs/options_table.py --write   # rewrite the block between the markers in docs/cli.md
    python docs/options_table.py --check   # exit 1 when docs/cli.md's block is stale

Each option is declared once in the code; this table is its one description for readers.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the shared block helper, wherever this script is loaded from
    sys.path.insert(0, str(HERE))

from generated_block import GeneratedBlock  # noqa: E402 - after the path it lives on

CLI_MD = HERE / "cli.md"


def table() -> str:
    from isolation_suite.engine.settings import OPTIONS, PYTEST

    rows = ["| `isolation-suite` | pytest plug-in | environment | meaning |", "|---|---|---|---|"]
    for o in OPTIONS:
        commands = [s for s in o.surfaces if s != PYTEST]
        cli = f"`{o.cli}`" + (f" ({', '.join(commands)})" if commands else "") if o.cli and commands else ""
        pytest_flag = f"`{o.pytest}`" if o.pytest and PYTEST in o.surfaces else ""
        defaults = "; ".join(f"{s}: `{','.join(v) if isinstance(v, tuple) else v}`" for s, v in o.defaults.items())
        meaning = " ".join(o.help.split()).replace("|", "\\|") + (f" (default {defaults})" if defaults else "")
        rows.append(f"| {cli} | {pytest_flag} | {f'`{o.env}`' if o.env else ''} | {meaning} |")
    return "\n".join(rows) + "\n"


GENERATED = GeneratedBlock(CLI_MD, "options", "options_table.py", "", "the options table", table)
replaced = GENERATED.replaced


def main(argv: list[str] | None = None) -> int:
    return GENERATED.main(argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
