#!/usr/bin/env python
"""Generate the options table of docs/cli.md from ``isolation_suite.engine.settings.OPTIONS``.

    python docs/options_table.py           # print the table
    python docs/options_table.py --write   # rewrite the block between the markers in docs/cli.md
    python docs/options_table.py --check   # exit 1 when docs/cli.md's block is stale

Each option is declared once in the code; this table is its one description for readers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI_MD = HERE / "cli.md"
BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"

if str(HERE.parent) not in sys.path:  # run from a checkout: document this checkout's options
    sys.path.insert(0, str(HERE.parent))


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


def replaced(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table()}{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = CLI_MD.read_text()
    if args.write:
        CLI_MD.write_text(replaced(text))
    elif args.check:
        return 0 if replaced(text) == text else 1
    else:
        sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
