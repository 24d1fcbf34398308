"""``isolation-suite fuzz`` examples per second with 1 and with 2 workers (and per GPU when present).

    python -m benchmarks.scaling

The runs are bound by ``--budget``, as the main job is, and every item gets the same
seconds in every run (``ITEM_S``). So each item does the same work whatever the number of
workers (Hypothesis draws larger scenarios the longer it runs), and the figure measures
parallel examples per second, not how six items of unequal length pack onto two workers.
Start-up (torch imports, worker bring-up, report writing) is inside the wall time.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isolation_suite.cli import item_budget

from ._common import table, write

# sound rows only: no shrinking, so every example is one check
TECHNIQUES = "functional_detach,toggle_requires_grad,freeze_and_eval,parametrize_where,weight_dropout," \
             "parametrize_dropconnect"


ITEM_S = 15.0


def budget_for(workers: int, items: int) -> float:
    """The ``--budget`` that gives every item ``ITEM_S`` seconds with ``workers`` workers."""
    budget = ITEM_S * items / min(workers, items) / 0.8
    assert abs(item_budget(budget, workers, items) - ITEM_S) < 1e-6, "cli's budget split changed"
    return budget


def fuzz(workers: int, devices: str = "cpu") -> dict:
    items = len(TECHNIQUES.split(","))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "isolation_suite.cli", "fuzz", "--workers", str(workers),
                        "--devices", devices, "--techniques", TECHNIQUES, "--max-examples", "1000000",
                        "--budget", f"{budget_for(workers, items):.3f}", "--report-dir", out], check=True, capture_output=True)
        wall = time.perf_counter() - start
        run = Path(out) / (Path(out) / "LATEST").read_text().strip()
        summary = json.loads((run / "summary.json").read_text())
    examples = sum(summary["examples_per_technique"].values())
    return {"workers": workers, "devices": devices, "examples": examples, "wall_s": wall,
            "examples_per_s": examples / wall}


def main() -> dict:
    import torch
    runs = [fuzz(1), fuzz(2)]
    if torch.cuda.is_available():
        runs.append(fuzz(torch.cuda.device_count(), "cuda"))
    speedup = runs[1]["examples_per_s"] / runs[0]["examples_per_s"]
    data = {"runs": runs, "speedup_2_workers": speedup, "target": 1.7}
    print(table([[r["workers"], r["devices"], r["examples"], f"{r['wall_s']:.1f}", f"{r['examples_per_s']:.1f}"]
                 for r in runs], ["workers", "devices", "examples", "wall s", "examples/s"]))
    print(f"\n2 workers: {speedup:.2f}x one worker (target >= 1.7) -> {write('scaling', data)}")
    return data


if __name__ == "__main__":
    main()
