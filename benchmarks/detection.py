"""Detection power: examples and seconds until the first violation, per known-bad row, median over seeds.

    python -m benchmarks.detection [--seeds 10] [--max-examples 300]
"""
from __future__ import annotations

import argparse

import torch

from isolation_suite.check import search
from isolation_suite.techniques import CATALOG

from ._common import median, table, write


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--max-examples", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, data = [], {}
    for entry in CATALOG:
        technique = entry.technique()
        if not technique.expected_violations:
            continue
        examples, seconds, caught = [], [], 0
        for seed in range(args.seeds):
            result = search(technique, max_examples=args.max_examples, seed=seed, shrink=False)
            if result.first_failure_at is not None:
                caught += 1
                examples.append(result.first_failure_at)
                seconds.append(result.seconds_to_first_failure)
        data[entry.name] = {"median_examples": median(examples), "median_seconds": median(seconds),
                            "caught": caught, "seeds": args.seeds, "examples": examples}
        rows.append([entry.name, f"{caught}/{args.seeds}", median(examples), f"{median(seconds):.2f}"])
    worst = max(v["median_examples"] for v in data.values())
    data["_summary"] = {"worst_median_examples": worst, "target": 50}
    print(table(rows, ["known-bad technique", "caught", "median examples", "median seconds"]))
    print(f"\nworst median {worst} examples (target <= 50) -> {write('detection', data)}")
    return data


if __name__ == "__main__":
    main()
