"""Fanning a fuzz run out over machines: which items a shard runs, and merging shard reports.

``--shard I/N`` (1-based, as a Slurm array index plus one or a CI matrix index) runs a
deterministic, balanced share of the run's items: sorted by name and dealt out in turn, so every
machine computes the same split from the same technique list and the shares differ by at most one
item. ``merge`` combines the shards' report folders into one report and names the shards that are
missing or did not finish.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


class ShardError(ValueError):
    """A shard spec or a shard report that cannot be used; one line says why."""


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        index, slash, count = str(text).partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            raise ShardError(f"--shard takes I/N (e.g. 2/8), got {text!r}") from None
        if slash != "/" or not 1 <= shard.index <= shard.count:
            raise ShardError(f"--shard {text!r}: I must be between 1 and N")
        return shard

    def select(self, items: Iterable[str]) -> list[str]:
        """This shard's items: every N-th of the sorted names, starting at the I-th."""
        return sorted(items)[self.index - 1::self.count]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def run_folder(path: Path) -> Path:
    """A run folder (with ``summary.json``), or the reports folder whose ``LATEST`` names one."""
    path = Path(path)
    if (path / "summary.json").is_file():
        return path
    latest = path / "LATEST"
    if latest.is_file() and (path / latest.read_text().strip() / "summary.json").is_file():
        return path / latest.read_text().strip()
    raise ShardError(f"{path} is not a run folder (no summary.json) nor a reports folder naming one in LATEST")


def merge(folders: Iterable[Path], out: Path) -> tuple[dict[str, Any], list[str]]:
    """Copy every shard's records and repro scripts into the run folder ``out``, and return the
    merged run's metadata and the problems found (missing or unfinished shards, mixed runs)."""
    summaries = []
    for folder in folders:
        run = run_folder(folder)
        try:
            summaries.append((run, json.loads((run / "summary.json").read_text())))
        except (OSError, ValueError) as exc:
            raise ShardError(f"cannot read {run / 'summary.json'}: {exc}") from None
    problems: list[str] = []
    shards = [s.get("meta", {}).get("shard") for _, s in summaries]
    counts = {int(s.split("/")[1]) for s in shards if s}
    if len(counts) > 1:
        problems.append(f"the reports come from runs split differently: {sorted(set(filter(None, shards)))}")
    if counts:
        count = max(counts)
        present = {int(s.split("/")[0]) for s in shards if s}
        missing = sorted(set(range(1, count + 1)) - present)
        if missing:
            problems.append(f"missing shard(s) {', '.join(f'{i}/{count}' for i in missing)}")
    for (run, summary), shard in zip(summaries, shards):
        if not summary.get("complete"):
            problems.append(f"shard {shard or run.name} did not finish ({run})")
    out.mkdir(parents=True, exist_ok=True)
    for run, _ in summaries:
        for sub in ("results", "repro"):
            if (run / sub).is_dir():
                (out / sub).mkdir(exist_ok=True)
                for path in (run / sub).iterdir():
                    shutil.copy2(path, out / sub / path.name)
    first = summaries[0][1].get("meta", {}) if summaries else {}
    meta = {**first, "shard": None, "merged_from": [str(run) for run, _ in summaries],
            "shards": sorted(filter(None, shards), key=lambda s: int(s.split("/")[0]))}
    return meta, problems
