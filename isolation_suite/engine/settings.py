"""Every option of a run, declared once.

Each :class:`Option` is rendered into the ``isolation-suite`` command line (``--budget``), the
pytest plug-in (``--isolation-budget``) and, where it has one, an environment variable
(``ISOLATION_TIMEOUT``); one parser validates it wherever it comes from, and a bad value is one
:class:`SettingError` line naming where the value came from. This module imports neither torch
nor Hypothesis: the plug-in declares its options from here in every pytest session.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping

from isolation_suite.spec import hf
from isolation_suite.spec.mode_kinds import MODE_KINDS

#: the Hypothesis profiles the harness registers (``engine.profiles``)
PROFILE_NAMES = ("isolation-dev", "isolation-ci", "isolation-nightly")
DEFAULT_PROFILE = "isolation-dev"


class SettingError(ValueError):
    """A value no run can use; the message is one line naming the option and the value."""


# --- parsers: text -> value, or ValueError saying what is wrong ---------------------------------

def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be positive (a finite number above 0)")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("is not a whole number") from None
    if value <= 0:
        raise ValueError("must be positive (a whole number, at least 1)")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("is not a non-negative integer") from None
    if value < 0:
        raise ValueError("is not a non-negative integer")
    return value


def epoch(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("is not a time in seconds since the epoch") from None
    if not math.isfinite(value):
        raise ValueError("is not a time in seconds since the epoch")
    return value


def comma_list(text: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in str(text).split(",") if part.strip())
    if not items:
        raise ValueError("is empty: name at least one")
    return items


def profile(text: str) -> str:
    if text not in PROFILE_NAMES:
        raise ValueError(f"is not one of {', '.join(PROFILE_NAMES)}")
    return text


def switch(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("use 1 or 0")


def workers(text: str) -> str:
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text
    raise ValueError("takes a positive integer or 'auto'")


def text(value: str) -> str:
    if not str(value).strip():
        raise ValueError("is empty")
    return str(value).strip()


def model(value: str) -> str:
    """A factory's 'pkg.module:factory' (imported when the plan is made), or an ``hf:`` name (spelled
    right here: ``hf.check``)."""
    spec = text(value)
    return hf.check(spec) if hf.is_hf(spec) else spec


@dataclass(frozen=True)
class Shard:
    """``--shard I/N`` (1-based, as a Slurm array index plus one or a CI matrix index): every N-th
    item of the sorted plan, starting at the I-th, so every machine computes the same split and
    the shares differ by at most one item."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        index, slash, count = str(text).partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            raise ValueError("takes I/N (e.g. 2/8)") from None
        if slash != "/" or not 1 <= shard.index <= shard.count:
            raise ValueError("takes I/N: I must be between 1 and N")
        return shard

    def select(self, names):
        return sorted(names)[self.index - 1::self.count]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# --- the table ----------------------------------------------------------------------------------

CHECK, FUZZ, REPRO, PYTEST = "check", "fuzz", "repro", "pytest"


@dataclass(frozen=True)
class Option:
    """One setting: its field, how it is spelled on each surface, and how its text is parsed."""

    field: str
    parse: Callable[[str], Any]
    help: str
    cli: str | None = None  # ``isolation-suite`` flag
    pytest: str | None = None  # the plug-in's flag
    env: str | None = None
    metavar: str | None = None
    surfaces: tuple[str, ...] = (CHECK, FUZZ, PYTEST)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # surface -> default (else None)
    switch: bool = False  # a flag without a value
    repeat: bool = False  # the plug-in's flag may be given more than once

    def default(self, surface: str) -> Any:
        return self.defaults.get(surface)

    def spelled(self, surface: str) -> str:
        return (self.pytest if surface == PYTEST else self.cli) or self.field


_DATABASE_HELP = ("where failing examples are kept and replayed from: a directory, 'none', or redis://HOST:PORT/DB "
                  "shared by many machines (default: .hypothesis/examples; the isolation-ci profile keeps none)")

OPTIONS: tuple[Option, ...] = (
    Option("techniques", comma_list, "techniques to judge: catalog names or 'pkg.module:attr' specs "
           "(fuzz: a comma list, default all; the plug-in: repeatable)",
           cli="--techniques", pytest="--isolation-technique", metavar="SPEC", surfaces=(FUZZ, PYTEST), repeat=True),
    Option("model", model, "judge on your own model: a zero-argument factory returning (model, example_inputs[, loss]); "
           "or hf:random, a tiny random transformers configuration per example (or one: hf:llama?layers=2)",
           cli="--model", pytest="--isolation-model", metavar="PKG.MOD:FACTORY"),
    Option("devices", comma_list, "cpu, cuda, cuda:N, auto (cpu plus cuda when present), or a comma list",
           cli="--devices", pytest="--isolation-devices", metavar="LIST",
           defaults={CHECK: ("cpu",), FUZZ: ("auto",), PYTEST: ("auto",)}),
    Option("modes", comma_list, f"execution modes: a comma list of {', '.join(MODE_KINDS)}, or all "
           "(default: every mode the devices run)", cli="--modes", pytest="--isolation-modes",
           env="ISOLATION_MODES", metavar="LIST"),
    Option("max_examples", positive_int, "generated examples per item, at most (default: the profile's)",
           cli="--max-examples", pytest="--isolation-max-examples", metavar="N"),
    Option("budget", positive_number, "total seconds of the run (default 120)", cli="--budget", metavar="SECONDS",
           surfaces=(FUZZ,), defaults={FUZZ: 120.0}),
    Option("item_budget", positive_number, "seconds per item (a capability on one device and mode), shrinking "
           "included, times the mode's weight", cli="--budget", pytest="--isolation-budget", metavar="SECONDS",
           surfaces=(CHECK, PYTEST)),
    Option("deadline", epoch, "no item runs past this time (seconds since the epoch); items not started by then "
           "are recorded as not run", pytest="--isolation-deadline", metavar="EPOCH", surfaces=(PYTEST,)),
    Option("timeout", positive_number, "seconds one training run may take before it is stopped "
           "(default: the profile's)", cli="--timeout", pytest="--isolation-timeout", env="ISOLATION_TIMEOUT",
           metavar="SECONDS", surfaces=(CHECK, FUZZ, REPRO, PYTEST)),
    Option("seed", seed, "fix the search (default: drawn and printed; derandomized under isolation-ci)",
           cli="--seed", metavar="N", surfaces=(CHECK, FUZZ)),
    Option("profile", profile, f"Hypothesis profile: {', '.join(PROFILE_NAMES)} (default {DEFAULT_PROFILE})",
           cli="--profile", pytest="--isolation-profile", env="ISOLATION_PROFILE", metavar="NAME",
           surfaces=(CHECK, FUZZ, PYTEST)),
    Option("database", text, _DATABASE_HELP, cli="--database", pytest="--isolation-database",
           env="ISOLATION_DATABASE", metavar="SPEC"),
    Option("database_readonly", switch, "replay the database's failures but never write to it (with a Redis URL the "
           "local directory stays writable)", cli="--database-readonly", pytest="--isolation-database-readonly",
           env="ISOLATION_DATABASE_READONLY", switch=True),
    Option("report_dir", text, "write a report into DIR/<run-id>/ (DIR/LATEST names it); check writes into DIR "
           "itself, and its summary counts that check's items only", cli="--report-dir",
           pytest="--isolation-report", metavar="DIR", defaults={FUZZ: "reports"}),
    Option("run_id", text, "the report's run id (default: date, time and process id)", pytest="--isolation-run-id",
           metavar="ID", surfaces=(PYTEST,)),
    Option("shard", Shard.parse, "run only shard I of N of the items (deterministic, balanced; combine the shards "
           "with 'isolation-suite merge')", cli="--shard", pytest="--isolation-shard", metavar="I/N",
           surfaces=(FUZZ, PYTEST)),
    Option("sweep", switch, "one sweep per capability, device and mode: every technique judged on shared scenarios, "
           "each reference computed once (still one record per item)", cli="--sweep", pytest="--isolation-sweep",
           switch=True, surfaces=(FUZZ, PYTEST)),
    Option("workers", workers, "xdist workers: N or auto (default: one per core)", cli="--workers", metavar="N",
           surfaces=(FUZZ,), defaults={FUZZ: "auto"}),
    Option("progress", switch, "show the run's progress after every item", pytest="--isolation-progress",
           switch=True, surfaces=(PYTEST,)),
    Option("plan", text, "run the items of a plan file written by 'isolation-suite fuzz' (the plan decides "
           "techniques, devices, modes, budgets and seed)", pytest="--isolation-plan", metavar="FILE",
           surfaces=(PYTEST,)),
)
OPTION = {o.field: o for o in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """What a run was asked for, validated (None: not given, the run's default applies)."""

    techniques: tuple[str, ...] = ()
    model: str | None = None
    devices: tuple[str, ...] = ("cpu",)
    modes: tuple[str, ...] | None = None
    max_examples: int | None = None
    budget: float | None = None
    item_budget: float | None = None
    deadline: float | None = None
    timeout: float | None = None
    seed: int | None = None
    profile: str | None = None
    database: str | None = None
    database_readonly: bool = False
    report_dir: str | None = None
    run_id: str | None = None
    shard: Shard | None = None
    sweep: bool = False
    workers: str = "auto"
    progress: bool = False
    plan: str | None = None

    @property
    def chosen_profile(self) -> str:
        return self.profile or DEFAULT_PROFILE

    def but(self, **changes: Any) -> "Settings":
        return replace(self, **changes)


def _parse(option: Option, value: Any, source: str) -> Any:
    if option.repeat and isinstance(value, (list, tuple)):  # a repeated flag: each one a comma list
        return tuple(x for v in value for x in _parse(option, v, source))
    if option.switch and isinstance(value, bool):
        return value
    try:
        return option.parse(value)
    except ValueError as exc:
        raise SettingError(f"{source}{'' if source.endswith('=') else ' '}{value!r}: {exc}") from None


def settings(given: Mapping[str, Any], surface: str, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of ``surface`` from the values given on it (field -> text, None where not given),
    else the environment, else the surface's default; every value parsed by its option's parser."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if surface not in option.surfaces:
            continue
        value = given.get(option.field)
        if value in (None, [], False) and option.env and environ.get(option.env) is not None:
            values[option.field] = _parse(option, environ[option.env], f"{option.env}=")
            continue
        if value in (None, []):
            default = option.default(surface)
            if default is not None:
                values[option.field] = default
            continue
        if value is False:
            continue
        values[option.field] = _parse(option, value, option.spelled(surface))
    names = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in names})


# --- rendering into the two surfaces ------------------------------------------------------------

def add_arguments(parser, surface: str, skip: tuple[str, ...] = ()) -> None:
    """Declare ``surface``'s options on an argparse parser (values stay text: ``settings`` parses)."""
    for option in OPTIONS:
        if surface not in option.surfaces or option.cli is None or option.field in skip:
            continue
        help_text = option.help + (f" (also ${option.env})" if option.env else "")
        if option.switch:
            parser.add_argument(option.cli, dest=option.field, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(option.cli, dest=option.field, default=None, metavar=option.metavar, help=help_text)


def add_pytest_options(group) -> None:
    """Declare the plug-in's options on its pytest option group."""
    for option in OPTIONS:
        if PYTEST not in option.surfaces or option.pytest is None:
            continue
        help_text = option.help + (f" (also ${option.env})" if option.env else "")
        if option.switch:
            group.addoption(option.pytest, dest=f"isolation_{option.field}", action="store_true", default=False,
                            help=help_text)
        elif option.repeat:
            group.addoption(option.pytest, dest=f"isolation_{option.field}", action="append", default=[],
                            metavar=option.metavar, help=help_text)
        else:
            group.addoption(option.pytest, dest=f"isolation_{option.field}", default=None, metavar=option.metavar,
                            help=help_text)


def given_on_pytest(getoption: Callable[[str], Any]) -> dict[str, Any]:
    """The plug-in's given values, by field (``config.getoption``)."""
    return {o.field: getoption(f"isolation_{o.field}") for o in OPTIONS if PYTEST in o.surfaces and o.pytest}
