"""Every catalog row's verdict on each shipped real model (``isolation_suite.zoo``), per execution mode.

    python -m benchmarks.zoo_verdicts [--models a,b] [--modes eager,checkpoint] [--max-examples N]
                                      [--rows r1,r2] [--budget S] [--no-shrink] [--verbose]

For every model and mode, one sweep per capability judges the rows of that capability on shared
scenarios over the model (its trigger examples first, then ``N`` generated ones), as the gate's
``--sweep`` does. Printed per model and mode: each row, the invariants it is known to violate in that
mode (``technique.expected_in``; empty: sound), and its verdict: ``held``, the invariant it was
caught with, or ``n/a`` where the model offers no place for its capability. ``WRONG`` marks a sound
row that failed, or a known-bad row caught with an invariant it is not known for, and the first
violation of each is printed under the table (``--verbose``: the whole failure with its minimal
scenario). A known-bad row that held is not marked: whether the model has its trigger is the gate's
question (``tests/test_models.py``). The profile defaults to ``isolation-ci`` (derandomized, no
example database), so a run's table is the same on every run; it runs on the CPU.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("ISOLATION_PROFILE", "isolation-ci")

import torch  # noqa: E402

from isolation_suite import sweep  # noqa: E402
from isolation_suite.engine.check import failure_message  # noqa: E402
from isolation_suite.model.factory import factory_tree  # noqa: E402
from isolation_suite.execution.modes import parse_modes  # noqa: E402
from isolation_suite.techniques import CATALOG  # noqa: E402
from isolation_suite.zoo import ZOO  # noqa: E402

from ._common import table, write  # noqa: E402


def _names(text: str | None, known: list[str], what: str) -> list[str]:
    if not text:
        return known
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def verdict_of(result, expected: frozenset[str]) -> tuple[str, bool]:
    """(what the table shows, wrong): held, the invariant it was caught with, or n/a."""
    if result.not_applicable:
        return "n/a", False
    if result.failure is None:
        return "held", False
    first = result.failure.first.invariant
    return first, not expected or first not in expected


def run_model(name: str, mode: str, rows: list[str], max_examples: int | None, budget: float | None,
              shrink: bool) -> list[dict]:
    """One sweep per capability over ``rows``: one record per row."""
    spec = f"isolation_suite.zoo:{name}"
    groups: dict = {}
    for entry in CATALOG:
        if entry.name in rows:
            for capability in sorted(entry.technique.capabilities, key=lambda c: c.value):
                groups.setdefault(capability, []).append(entry.technique())
    records = []
    for capability, techniques in sorted(groups.items(), key=lambda kv: kv[0].value):
        started = time.monotonic()
        try:
            done = sweep(techniques, {capability}, "cpu", max_examples, budget, model=spec, mode=mode, shrink=shrink)
        except Exception as exc:  # noqa: BLE001 - one sweep crashing is a row of the table, not the end of the run
            line = (str(exc).strip().splitlines() or [""])[0]
            for technique in techniques:
                records.append({"row": technique.name, "capability": capability.value,
                                "expected": sorted(technique.expected_in(mode)), "verdict": "error", "wrong": True,
                                "judged": 0, "first": f"{type(exc).__name__}: {line}", "detail": ""})
            continue
        seconds = time.monotonic() - started
        for technique, result in zip(techniques, done.results):
            expected = frozenset(technique.expected_in(mode))
            shown, wrong = verdict_of(result, expected)
            failure = result.failure
            records.append({
                "row": technique.name, "capability": capability.value, "expected": sorted(expected),
                "verdict": shown, "wrong": wrong, "judged": result.explicit + result.examples,
                "found_by": result.found_by, "sweep_seconds": round(seconds, 2),
                "not_applicable": result.not_applicable,
                "first": str(failure.first) if failure is not None else "",
                "detail": failure_message(failure, {capability}, result) if failure is not None else ""})
    order = [entry.name for entry in CATALOG]
    return sorted(records, key=lambda r: order.index(r["row"]))  # catalog order, not capability order


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated zoo names (default: all of {', '.join(ZOO)})")
    parser.add_argument("--modes", default="eager", help="comma-separated execution modes (default: eager)")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="generated scenarios per sweep (default: the profile's)")
    parser.add_argument("--rows", help="comma-separated catalog rows (default: all)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per sweep, shrinking included")
    parser.add_argument("--no-shrink", action="store_true", help="report the first failure as found, unshrunk")
    parser.add_argument("--verbose", action="store_true", help="print each WRONG row's whole failure")
    args = parser.parse_args(argv)
    models = _names(args.models, list(ZOO), "model")
    rows = _names(args.rows, [entry.name for entry in CATALOG], "row")
    try:
        modes = parse_modes(args.modes, ("cpu",))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    data: dict = {}
    wrong_total = 0
    for name in models:
        try:
            factory_tree(f"isolation_suite.zoo:{name}")
        except Exception as exc:  # noqa: BLE001 - a model whose library is missing is reported, not fatal
            print(f"{name}: skipped ({exc})\n")
            continue
        for mode in modes:
            started = time.monotonic()
            records = run_model(name, mode, rows, args.max_examples, args.budget, not args.no_shrink)
            data[f"{name}/{mode}"] = records
            wrong = [r for r in records if r["wrong"]]
            wrong_total += len(wrong)
            print(f"== {name} ({mode}, {time.monotonic() - started:.0f}s)")
            print(table([[r["row"], ",".join(r["expected"]), r["verdict"], r["judged"], "WRONG" if r["wrong"] else ""]
                         for r in records], ["row", "expected", "verdict", "judged", ""]))
            for r in wrong:
                print(f"  {r['row']}: {r['first']}" if not args.verbose else f"\n{r['detail'] or r['first']}")
            print()
    print(f"{wrong_total} WRONG")
    print(f"-> {write('zoo_verdicts', data)}")
    return data


if __name__ == "__main__":
    main()
