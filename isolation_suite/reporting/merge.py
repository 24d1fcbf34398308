"""Merging shard reports into one, against their plan.

Every shard's report carries its plan's summary (``meta.plan``): the fingerprint of what decides the
verdicts, the items this shard was to judge, and every item of the run. ``merge`` refuses shards of
different plans (:class:`MergeError`, one line), and the merged run is complete only when every
planned item has exactly one valid record: a record that is missing, truncated, of another item or
of another plan makes it INCOMPLETE, never a pass.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

from isolation_suite.reporting.report import record_path


class MergeError(ValueError):
    """Shard reports that cannot be merged (not reports, different plans); one line says why."""


def run_folder(path: Path) -> Path:
    """A run folder (with ``summary.json``), or the reports folder whose ``LATEST`` names one."""
    path = Path(path)
    if (path / "summary.json").is_file():
        return path
    latest = path / "LATEST"
    if latest.is_file() and (path / latest.read_text().strip() / "summary.json").is_file():
        return path / latest.read_text().strip()
    raise MergeError(f"{path} is not a run folder (no summary.json) nor a reports folder naming one in LATEST")


def _summary(run: Path) -> dict[str, Any]:
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"cannot read {run / 'summary.json'}: {exc}") from None
    meta = summary.get("meta") if isinstance(summary, dict) else None
    plan = meta.get("plan") if isinstance(meta, dict) else None
    if not isinstance(plan, dict) or not {"fingerprint", "items", "every"} <= set(plan):
        raise MergeError(f"{run / 'summary.json'} is not the report of a planned run (no meta.plan): "
                         f"made by another tool or an older version")
    return summary


def _valid_record(run: Path, key: str, fingerprint: str) -> dict[str, Any] | None:
    """The record of ``key`` in ``run``, or None when it is missing, unreadable, of another item or plan."""
    try:
        data = json.loads(record_path(run, key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("item") != key or data.get("plan") != fingerprint \
            or not isinstance(data.get("passed"), bool):
        return None
    return data


def merge(folders: Iterable[Path], out: Path) -> tuple[dict[str, Any], list[str]]:
    """Copy every shard's valid records and repro scripts into the run folder ``out``; return the
    merged run's metadata and the problems that make it incomplete."""
    shards = [(run, _summary(run)) for run in (run_folder(f) for f in folders)]
    if not shards:
        raise MergeError("nothing to merge")
    plans = [s["meta"]["plan"] for _, s in shards]
    prints = {p["fingerprint"] for p in plans}
    if len(prints) > 1:
        which = ", ".join(f"{run} ({p['fingerprint']}, shard {p.get('shard') or 'all'})"
                          for (run, _), p in zip(shards, plans))
        raise MergeError(f"the reports come from different plans (techniques, devices, modes, model, seed, profile, "
                         f"budget or shard count differ): {which}")
    fingerprint = prints.pop()
    every = plans[0]["every"]
    problems: list[str] = []
    names = [p.get("shard") or "all" for p in plans]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"shard {name} is given more than once")
    counts = {int(n.split("/")[1]) for n in names if n != "all"}
    if len(counts) == 1:
        count = counts.pop()
        absent = sorted(set(range(1, count + 1)) - {int(n.split("/")[0]) for n in names if n != "all"})
        if absent:
            problems.append(f"missing shard(s) {', '.join(f'{i}/{count}' for i in absent)}")
    recorded: dict[str, Path] = {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results").mkdir(exist_ok=True)
    for (run, summary), plan in zip(shards, plans):
        if not summary.get("complete"):
            problems.append(f"shard {plan.get('shard') or run.name} did not finish ({run})")
        for key in plan["items"]:
            data = _valid_record(run, key, fingerprint)
            if data is None or key in recorded:
                continue
            recorded[key] = run
            shutil.copy2(record_path(run, key), record_path(out, key))
            if data.get("repro") and (run / data["repro"]).is_file():
                (out / data["repro"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run / data["repro"], out / data["repro"])
    missing = [key for key in every if key not in recorded]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        problems.append(f"{len(missing)} of {len(every)} planned items have no valid record: {shown}")
    first = shards[0][1]["meta"]
    seeds = sorted({p.get("seed") for p in plans}, key=lambda s: (s is None, s or 0))
    meta = {**first, "shard": None, "merged_from": [str(run) for run, _ in shards], "seeds": seeds,
            "plan": {**plans[0], "shard": None, "items": list(every)},
            "shards": sorted({p["shard"] for p in plans if p.get("shard")}, key=lambda s: int(s.split("/")[0]))}
    return meta, problems
