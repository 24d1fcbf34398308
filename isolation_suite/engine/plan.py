"""The run plan: the items a run judges, how long each may take, and a fingerprint of what decides
their verdicts.

An :class:`Item` is one technique judged for one capability on one device in one execution mode;
it knows its names (the gate item's, the record's, its sweep group's) and its budget weight. A
:class:`Plan` is built once from :class:`~isolation_suite.engine.settings.Settings` (the command line
or the plug-in's options), travels to xdist workers as data (``plan.json``), and is written into
every report, so ``merge`` can refuse shards of different plans and count every planned item.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping

import torch

from isolation_suite import __version__
from isolation_suite.engine.settings import Settings, Shard
from isolation_suite.execution.modes import MODE_BY_KIND
from isolation_suite.spec.mode_kinds import DEFAULT as DEFAULT_MODE

PLAN_FILE = "plan.json"


class PlanError(ValueError):
    """A plan no run can follow (a technique that does not load, a device or mode this machine does
    not have, a model factory that fails, a plan file that cannot be read); one line says why."""


def mode_suffix(mode: str, sep: str = "-") -> str:
    """How a mode shows in a name: eager is the default and shows as nothing."""
    return "" if mode == DEFAULT_MODE else f"{sep}{mode}"


def record_key(technique: str, capabilities: Iterable[str], device: str, mode: str = DEFAULT_MODE) -> str:
    """The name of a record (``results/<key>.json``): ``tech-CAP-device[-mode]``."""
    return f"{technique}-{'+'.join(sorted(capabilities))}-{device}" + mode_suffix(mode)


@dataclass(frozen=True, order=True)
class Item:
    """One technique x capability x device x mode."""

    technique: str  # the technique's name
    capability: str  # a Capability value
    device: str
    mode: str = DEFAULT_MODE
    spec: str = field(default="", compare=False)  # how the technique is loaded

    @property
    def name(self) -> str:
        """The gate item's name: ``tech[CAP-device[-mode]]``."""
        return f"{self.technique}[{self.capability}-{self.device}{mode_suffix(self.mode)}]"

    @property
    def key(self) -> str:
        return record_key(self.technique, [self.capability], self.device, self.mode)

    @property
    def group(self) -> str:
        """The sweep that judges this item with the others of its capability, device and mode."""
        return f"sweep[{self.capability}-{self.device}{mode_suffix(self.mode)}]"

    @property
    def where(self) -> str:
        return f"{self.capability} on {self.device}" + mode_suffix(self.mode, ", ")

    @property
    def weight(self) -> float:
        """Its share of the budget: its mode's weight (a compiled item gets more time)."""
        return MODE_BY_KIND[self.mode].budget_weight

    def expected(self, technique) -> frozenset[str]:
        return technique.expected_in(self.mode)


def declaration(technique) -> dict[str, Any]:
    """What a technique declares, as data: part of the fingerprint (two runs of the same spec whose
    code declares differently are different plans)."""
    return {"name": technique.name, "capabilities": sorted(c.value for c in technique.capabilities),
            "expected": sorted(technique.expected_violations),
            "modes": {m: sorted(v) for m, v in sorted(technique.mode_violations.items())}}


@dataclass(frozen=True)
class Plan:
    """What a run judges and how; ``items`` is this shard's share of ``every``."""

    specs: tuple[str, ...]
    declarations: tuple[Mapping[str, Any], ...]
    devices: tuple[str, ...]
    modes: tuple[str, ...]
    every: tuple[Item, ...]
    items: tuple[Item, ...]
    profile: str
    seed: int | None = None
    seed_given: bool = False  # a drawn seed differs from shard to shard; a given one is part of the plan
    model: str | None = None
    max_examples: int | None = None
    budget: float | None = None  # what was asked: the run's total (fuzz) or per item (check, the plug-in)
    item_budget: float | None = None  # seconds per item of weight 1
    deadline: float | None = None  # no item starts past this (seconds since the epoch)
    timeout: float | None = None
    shard: Shard | None = None
    sweep: bool = False
    versions: Mapping[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """A digest of everything that decides the verdicts, the same for every shard of a run."""
        decided = {"declarations": list(self.declarations), "specs": list(self.specs), "devices": list(self.devices),
                   "modes": list(self.modes), "model": self.model, "seed": self.seed if self.seed_given else "drawn",
                   "profile": self.profile,
                   "max_examples": self.max_examples, "budget": self.budget, "timeout": self.timeout,
                   "shards": self.shard.count if self.shard else 1, "sweep": self.sweep,
                   "versions": dict(self.versions)}
        return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:16]

    def groups(self) -> dict[str, list[Item]]:
        """Sweep name -> its items (one sweep per capability, device and mode), the largest first
        (xdist hands items out in this order)."""
        groups: dict[str, list[Item]] = {}
        for item in sorted(self.items, key=lambda i: i.name):
            groups.setdefault(item.group, []).append(item)
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))

    @property
    def units(self) -> int:
        """What workers are handed one at a time: items, or sweeps."""
        return len(self.groups()) if self.sweep else len(self.items)

    @property
    def weight(self) -> float:
        return sum(item.weight for item in self.items)

    def with_budget(self, total: float, workers: int, reserve: float, started: float) -> "Plan":
        """The plan with a per-item budget from a run's total: each worker runs its share of the
        items one after another, with a fifth kept for start-up and the report, and a deadline
        ``reserve`` seconds before the total is spent."""
        return replace(self, item_budget=item_share(total, workers, self.units, self.weight),
                       deadline=started + total - reserve)

    def summary(self) -> dict[str, Any]:
        """What a report keeps of its plan (merge compares these)."""
        return {"fingerprint": self.fingerprint, "shard": str(self.shard) if self.shard else None,
                "items": [i.key for i in sorted(self.items)], "every": [i.key for i in sorted(self.every)],
                "seed": self.seed}

    def to_json(self) -> str:
        data = asdict(self)
        data["shard"] = str(self.shard) if self.shard else None
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
            data["shard"] = Shard.parse(data["shard"]) if data.get("shard") else None
            for name in ("every", "items"):
                data[name] = tuple(Item(**i) for i in data[name])
            for name in ("specs", "devices", "modes", "declarations"):
                data[name] = tuple(data[name])
            return cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise PlanError(f"not a plan: {type(exc).__name__}: {exc}") from None


def item_share(total: float, workers: int, units: int, weight: float) -> float:
    """Seconds per item of weight 1 when ``workers`` run ``units`` (items, or sweeps) of summed
    ``weight`` one after another within ``total`` seconds, a fifth kept for start-up and the report."""
    return total * min(workers, max(units, 1)) / max(weight, 1) * 0.8


def items_of(techniques: Mapping[str, Any], devices: Iterable[str], modes: Iterable[str]) -> tuple[Item, ...]:
    """Every item of ``techniques`` (spec -> Technique), in the order given (capabilities by name)."""
    return tuple(Item(t.name, c.value, d, m, spec) for spec, t in techniques.items() for d in devices for m in modes
                 for c in sorted(t.capabilities, key=lambda c: c.value))


def make_plan(settings: Settings, techniques: Mapping[str, Any], devices: Iterable[str], modes: Iterable[str],
              seed: int | None) -> Plan:
    """The plan of a run: ``techniques`` (spec -> loaded Technique), the resolved devices and modes."""
    every = items_of(techniques, devices, modes)
    chosen = set(settings.shard.select([i.name for i in every])) if settings.shard else None
    items = tuple(i for i in every if chosen is None or i.name in chosen)
    return Plan(specs=tuple(techniques), declarations=tuple(declaration(t) for t in techniques.values()),
                devices=tuple(devices), modes=tuple(modes), every=every, items=items,
                profile=settings.chosen_profile, seed=seed, seed_given=settings.seed is not None,
                model=settings.model,
                max_examples=settings.max_examples,
                budget=settings.budget if settings.budget is not None else settings.item_budget,
                item_budget=settings.item_budget, deadline=settings.deadline, timeout=settings.timeout,
                shard=settings.shard, sweep=settings.sweep,
                versions={"isolation_suite": __version__, "torch": torch.__version__})
