"""The one engine behind both surfaces: settings -> plan, and ``run_item(plan, item) -> ItemResult``.

The command line (``check`` in-process, ``fuzz`` through xdist workers) and the pytest plug-in
build their plan here and judge its items here; they only render options and results.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from isolation_suite.engine import profiles
from isolation_suite.engine.check import (SearchResult, failure_message, modes_for, run_seed, search, search_settings,
                                          seed_text)
from isolation_suite.engine.database import DatabaseSpecError, parse_spec
from isolation_suite.engine.loading import TechniqueLoadError, load_technique, unique_names
from isolation_suite.engine.plan import Item, Plan, PlanError, make_plan
from isolation_suite.engine.settings import OPTION, Settings
from isolation_suite.engine.sweep import SweepResult, sweep
from isolation_suite.execution import devices as devices_mod
from isolation_suite.model.factory import ModelFactoryError, model_trees
from isolation_suite.spec.mode_kinds import DEFAULT as DEFAULT_MODE
from isolation_suite.reporting.report import environment, error_record, outcome, reason, record
from isolation_suite.technique import Capability, Technique
from isolation_suite.techniques import CATALOG

#: what a bad plan raises, each reported in one line
PLAN_ERRORS = (PlanError, TechniqueLoadError, devices_mod.DeviceError, ModelFactoryError, DatabaseSpecError)


def use_settings(settings: Settings) -> None:
    """The profile and the example database of ``settings`` become the environment (so xdist workers
    and sandbox children see them too) and the registered profiles; a bad database is one line."""
    os.environ[profiles.PROFILE_ENV] = settings.chosen_profile
    if settings.database is not None:
        os.environ[profiles.DATABASE_ENV] = settings.database
    if settings.database_readonly:
        os.environ[profiles.READONLY_ENV] = "1"
    _check_database_folder(os.environ.get(profiles.DATABASE_ENV))
    profiles.register_profiles()


def _check_database_folder(spec: str | None) -> None:
    """A directory database under a file could never store anything: say so before any search."""
    directory = parse_spec(spec).directory
    if directory is None:
        return
    path = Path(directory).resolve()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise DatabaseSpecError(f"database {directory!r}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise DatabaseSpecError(f"database {directory!r}: {parent} is not writable")
            return


def load_techniques(specs) -> dict[str, Technique]:
    """spec -> technique (the whole catalog when ``specs`` is empty); loading fails fast, in one line."""
    specs = list(specs) or [entry.name for entry in CATALOG]
    techniques = {spec: load_technique(spec) for spec in specs}
    unique_names(techniques)
    return techniques


def plan_for(settings: Settings, surface: str) -> tuple[Plan, dict[str, Technique]]:
    """The plan of ``settings`` and its loaded techniques; :data:`PLAN_ERRORS` say what is wrong
    (naming the option as ``surface`` spells it)."""
    techniques = load_techniques(settings.techniques)
    devices = devices_mod.resolve(",".join(settings.devices))
    try:
        modes = modes_for(",".join(settings.modes) if settings.modes else None, devices)
    except ValueError as exc:
        raise PlanError(f"{OPTION['modes'].spelled(surface)}: {exc}") from None
    if settings.model:
        # a factory that fails or hangs says so now, before any search
        model_trees(settings.model, limit=settings.timeout or profiles.example_timeout())
    seed = settings.seed if settings.seed is not None else run_seed(settings.max_examples)
    return make_plan(settings, techniques, devices, modes, seed), techniques


def read_plan(path: str | Path) -> tuple[Plan, dict[str, Technique]]:
    """A plan written by ``fuzz`` for its workers, with its techniques loaded again here."""
    try:
        plan = Plan.from_json(Path(path).read_text())
    except OSError as exc:
        raise PlanError(f"cannot read the plan {path}: {exc.strerror or exc}") from None
    return plan, load_techniques(plan.specs)


@dataclass(frozen=True)
class ItemResult:
    """An item's verdict against its technique's declaration."""

    item: Item
    result: SearchResult
    status: str  # held | caught | violated | missed | n/a
    failure: str | None  # why the item failed, for the reader (None when it passed)

    @property
    def passed(self) -> bool:
        return self.failure is None


class NotRun(Exception):
    """The run's time was spent before the item started (its records say so; it never passes)."""


def item_budget(plan: Plan, items: list[Item], techniques: Mapping[str, Technique], run_dir: Path | None) -> float | None:
    """Seconds for ``items`` judged together: the plan's per-item budget times each one's weight, and
    never past the plan's deadline. Past the deadline each item gets a ``not-run`` record and
    :class:`NotRun` is raised: an item that never ran never passes."""
    budget = None if plan.item_budget is None else plan.item_budget * sum(i.weight for i in items)
    if plan.deadline is None:
        return budget
    left = plan.deadline - time.time()
    if left <= 0:
        what = items[0].group if len(items) > 1 else items[0].name
        message = f"not run: the run's time budget was spent before {what} started"
        if run_dir is not None:
            for item in items:
                error_record(run_dir, techniques[item.spec], [item.capability], item.device, message, item.spec,
                             outcome="not-run", mode=item.mode, plan=plan.fingerprint)
        raise NotRun(message)
    return left if budget is None else min(budget, left)


def gate_failure(item: Item, technique: Technique, result: SearchResult) -> str | None:
    """None when ``result`` is what ``technique`` declares for the item's mode (``n/a`` too), else
    why not: an expected violation missed, or an invariant it does not declare."""
    expected = item.expected(technique)
    status, passed = outcome(result, expected)
    if passed:
        return None
    where = f" on {item.device}" + ("" if item.mode == DEFAULT_MODE else f" in {item.mode} mode")
    if status == "missed":
        return f"{technique.name} declares expected violations {sorted(expected)} but " \
               + reason(status, result, expected) + where
    message = failure_message(result.failure, {Capability(item.capability)}, result)
    return f"unexpected invariant (declared{where}: {sorted(expected)})\n" + message if expected else message


def _judged(item: Item, technique: Technique, result: SearchResult) -> ItemResult:
    status, _ = outcome(result, item.expected(technique))
    return ItemResult(item, result, status, gate_failure(item, technique, result))


def run_item(plan: Plan, item: Item, techniques: Mapping[str, Technique], run_dir: Path | None) -> ItemResult:
    """Search one item within its budget and write its record (and repro script) into ``run_dir``."""
    technique = techniques[item.spec]
    budget = item_budget(plan, [item], techniques, run_dir)
    started = time.monotonic()
    result = search(technique, {Capability(item.capability)}, item.device, plan.max_examples, budget,
                    seed=plan.seed, timeout=plan.timeout, model=plan.model, mode=item.mode)
    record(result, technique, time.monotonic() - started, run_dir, spec=item.spec, plan=plan.fingerprint)
    return _judged(item, technique, result)


def run_sweep(plan: Plan, items: list[Item], techniques: Mapping[str, Technique],
              run_dir: Path | None) -> tuple[SweepResult, list[ItemResult]]:
    """Judge the items of one capability, device and mode with one sweep; one record per item."""
    first = items[0]
    budget = item_budget(plan, items, techniques, run_dir)
    done = sweep([techniques[i.spec] for i in items], {Capability(first.capability)}, first.device,
                 plan.max_examples, budget, seed=plan.seed, timeout=plan.timeout, model=plan.model, mode=first.mode)
    results = []
    for item, result in zip(items, done.results):
        record(result, techniques[item.spec], done.seconds, run_dir, spec=item.spec, sweep=first.group,
               plan=plan.fingerprint)
        results.append(_judged(item, techniques[item.spec], result))
    return done, results


def run_meta(plan: Plan, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a report says about its run: the environment, the plan, and ``extra``."""
    return environment({"devices": list(plan.devices), "modes": list(plan.modes), "techniques": list(plan.specs),
                        "model": plan.model, "profile": plan.profile, "database": profiles.describe_database(),
                        "seed": plan.seed, "seed_text": seed_text(plan.seed), "budget": plan.budget,
                        "item_budget": plan.item_budget,
                        "max_examples": search_settings(plan.max_examples).max_examples,
                        "shard": str(plan.shard) if plan.shard else None, "sweep": plan.sweep,
                        "plan": plan.summary(), **(extra or {})})
