"""The live view of a fuzz run: items done of total, examples and examples/s, violations so far,
time left in the budget. A ``tqdm`` bar on a terminal; plain lines (one per finished item) when the
output is not a terminal or ``CI`` is set, so logs stay readable."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable


def progress_text(records: list[dict[str, Any]], total: int, started: float, deadline: float | None,
                  now: float | None = None) -> str:
    """``3/18 items, 412 examples (38.1/s), 2 with violations, 61s left``."""
    now = time.time() if now is None else now
    examples = sum(r.get("explicit_examples", 0) + r.get("coverage_examples", 0) + r.get("examples", 0)
                   + r.get("shrink_examples", 0)
                   for r in records)
    violations = sum(1 for r in records if r.get("violations") or r.get("outcome") == "error")
    rate = examples / max(now - started, 1e-9)
    text = f"{len(records)}/{total} items, {examples} examples ({rate:.1f}/s), {violations} with violations"
    if deadline is not None:
        text += f", {max(0.0, deadline - now):.0f}s left"
    return text


class LiveView:
    """Shows the run's progress after every finished item (``update`` with the records so far)."""

    def __init__(self, total: int, deadline: float | None, write_line: Callable[[str], None],
                 interactive: bool | None = None):
        self.total, self.deadline, self.write_line = total, deadline, write_line
        self.started = time.time()
        if interactive is None:
            interactive = sys.stderr.isatty() and not os.environ.get("CI")
        self.bar = None
        if interactive:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="item", file=sys.stderr, leave=True, dynamic_ncols=True)
        self.shown = -1

    def update(self, records: list[dict[str, Any]]) -> None:
        if len(records) == self.shown:
            return
        self.shown = len(records)
        text = progress_text(records, self.total, self.started, self.deadline)
        if self.bar is not None:
            self.bar.n = len(records)
            self.bar.set_postfix_str(text.split(", ", 1)[1], refresh=True)
        else:
            self.write_line(f"progress: {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
