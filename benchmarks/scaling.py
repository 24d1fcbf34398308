"""``isolation-suite fuzz`` examples per second with 1 and with 2 workers (and per GPU when present).

    python -m benchmarks.scaling

The runs are bound by ``--budget``, as the main job is, and every item gets the same
seconds in every run (``ITEM_S``). So each item does the same work whatever the number of
workers (Hypothesis draws larger scenarios the longer it runs), and the figure measures
parallel examples per second, not how six items of unequal length pack onto two workers.
Start-up (torch imports, worker bring-up, report writing) is inside the wall time. The
derandomized ``isolation-ci`` profile makes every item draw the same scenarios, in the same
order, in both runs: only the parallelism differs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isolation_suite.engine.plan import item_share

from ._common import table, write

# sound rows only: no shrinking, so every example is one check
TECHNIQUES = "functional_detach,toggle_requires_grad,freeze_and_eval,parametrize_where,weight_dropout," \
             "parametrize_dropconnect"


ITEM_S = 15.0


def budget_for(workers: int, items: int) -> float:
    """The ``--budget`` that gives every item ``ITEM_S`` seconds with ``workers`` workers."""
    budget = ITEM_S * items / min(workers, items) / 0.8
    assert abs(item_share(budget, workers, items, items) - ITEM_S) < 1e-6, "the plan's budget split changed"
    return budget


def fuzz(workers: int, devices: str = "cpu") -> dict:
    items = len(TECHNIQUES.split(","))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "isolation_suite.cli", "fuzz", "--workers", str(workers),
                        "--devices", devices, "--techniques", TECHNIQUES, "--max-examples", "1000000",
                        "--budget", f"{budget_for(workers, items):.3f}", "--profile", "isolation-ci",
                        "--report-dir", out], check=True, capture_output=True)
        wall = time.perf_counter() - start
        run = Path(out) / (Path(out) / "LATEST").read_text().strip()
        summary = json.loads((run / "summary.json").read_text())
    examples = sum(summary["examples_per_technique"].values())
    item_seconds = sum(r["seconds"] for r in summary["results"])
    parallel = min(workers, items)
    return {"workers": workers, "devices": devices, "examples": examples, "wall_s": wall,
            "examples_per_s": examples / wall,
            # inside the items only, start-up left out: what a long (nightly) run converges to
            "steady_examples_per_s": parallel * examples / item_seconds}


SEARCH_RATE = """
import sys, time, torch
torch.set_num_threads(1)
from isolation_suite import catalog
from isolation_suite.engine.check import search
start, n = time.perf_counter(), 0
for name in sys.argv[1].split(","):
    n += search(catalog()[name], max_examples=150, shrink=False).examples
print(n / (time.perf_counter() - start))
"""


def ceiling() -> dict:
    """The machine's own limit: the same search workload in 2 independent processes vs 1."""
    env = {**os.environ, "ISOLATION_PROFILE": "isolation-ci"}
    cmd = [sys.executable, "-c", SEARCH_RATE, "functional_detach,freeze_and_eval,parametrize_where"]
    alone = float(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
    pair = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    together = sum(float(proc.communicate()[0]) for proc in pair)
    return {"one_process_examples_per_s": alone, "two_processes_examples_per_s": together,
            "speedup": together / alone}


def main() -> dict:
    import torch
    runs = [fuzz(1), fuzz(2)]
    if torch.cuda.is_available():
        runs.append(fuzz(torch.cuda.device_count(), "cuda"))
    speedup = runs[1]["examples_per_s"] / runs[0]["examples_per_s"]
    steady = runs[1]["steady_examples_per_s"] / runs[0]["steady_examples_per_s"]
    limit = ceiling()
    data = {"runs": runs, "speedup_2_workers": speedup, "steady_speedup_2_workers": steady,
            "machine_ceiling": limit, "target": 1.7}
    print(table([[r["workers"], r["devices"], r["examples"], f"{r['wall_s']:.1f}", f"{r['examples_per_s']:.1f}",
                  f"{r['steady_examples_per_s']:.1f}"] for r in runs],
                ["workers", "devices", "examples", "wall s", "examples/s", "examples/s inside items"]))
    print(f"\n2 workers: {speedup:.2f}x one worker, {steady:.2f}x inside the items (target >= 1.7); "
          f"this machine runs 2 independent processes of the same search at {limit['speedup']:.2f}x one "
          f"-> {write('scaling', data)}")
    return data


if __name__ == "__main__":
    main()
