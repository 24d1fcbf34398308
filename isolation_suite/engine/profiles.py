"""Hypothesis profiles ``isolation-dev``, ``isolation-ci``, ``isolation-nightly``, and where failures are kept.

| profile               | examples | seed                         | example database                          |
|-----------------------|----------|------------------------------|-------------------------------------------|
| ``isolation-dev``     | 60       | drawn per run, printed       | ``$ISOLATION_DATABASE`` (default below)   |
| ``isolation-ci``      | 80       | derandomized: fixed per item | none, whatever is set: same answer always |
| ``isolation-nightly`` | 2000     | drawn per run, printed       | ``$ISOLATION_DATABASE`` (default below)   |

What a profile's searches draw beyond generated trees compiled with ``aot_eager`` is its row of
``DRAWS``: the nightly profile also compiles with ``inductor`` and, among the generated trees, draws
tiny random ``transformers`` configurations (``hf:random``), each where it can be judged here
(``missing`` says why not); inductor runs with the compile mode's ``INDUCTOR_CONFIG``.

``ISOLATION_DATABASE`` (``--database``, ``--isolation-database``) is a directory (default
``.hypothesis/examples``, relative to the working directory), ``none`` to keep no database, or
``redis://HOST:PORT/DB``: a Redis shared by many machines, beside the local ``.hypothesis/examples``
(see :mod:`isolation_suite.engine.database`). Failing examples stored there are replayed first.
``ISOLATION_DATABASE_READONLY=1`` (``--database-readonly``) only reads the named database; with a
Redis URL the local directory stays writable. A Redis that is down costs one warning, not the run.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, replace

from hypothesis import HealthCheck, Phase, settings

from isolation_suite.engine.database import DEFAULT_DIRECTORY, DatabaseSpec, DatabaseSpecError, build, parse_spec

PROFILE_ENV = "ISOLATION_PROFILE"
DATABASE_ENV = "ISOLATION_DATABASE"
READONLY_ENV = "ISOLATION_DATABASE_READONLY"
TIMEOUT_ENV = "ISOLATION_TIMEOUT"
#: seconds one training run of the technique may take before it is stopped (a ``timeout`` violation);
#: runs take milliseconds to a second, so these only ever stop a hang
TIMEOUTS = {"isolation-dev": 60.0, "isolation-ci": 60.0, "isolation-nightly": 300.0}
DEFAULT_PROFILE = "isolation-dev"
DEFAULT_DATABASE = DEFAULT_DIRECTORY
PROFILES = ("isolation-dev", "isolation-ci", "isolation-nightly")

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]


def database_spec() -> DatabaseSpec:
    """``ISOLATION_DATABASE`` and ``ISOLATION_DATABASE_READONLY`` as they are now; a malformed
    value raises :class:`~isolation_suite.engine.database.DatabaseSpecError` (one line)."""
    flag = os.environ.get(READONLY_ENV, "").strip().lower()
    if flag not in ("", "0", "1", "true", "false", "yes", "no", "on", "off"):
        raise DatabaseSpecError(f"{READONLY_ENV}={flag!r}: use 1 (read-only) or 0")
    return parse_spec(os.environ.get(DATABASE_ENV), readonly=flag in ("1", "true", "yes", "on"))


#: a malformed ``ISOLATION_DATABASE`` seen when the module was imported; searches raise it
_spec_error: DatabaseSpecError | None = None


def register_profiles() -> None:
    """(Re-)register the three profiles; call again after changing ``ISOLATION_DATABASE``.

    A malformed database spec raises :class:`~isolation_suite.engine.database.DatabaseSpecError`."""
    global _spec_error
    _register(build(database_spec()))
    _spec_error = None


def _register(database) -> None:
    # built on Hypothesis's own defaults, never on whichever profile happens to be loaded now
    base = settings.get_profile("default")
    settings.register_profile("isolation-dev", base, max_examples=60, deadline=None, derandomize=False,
                              suppress_health_check=_SLOW, database=database)
    # CI: derandomized, so the gate gives the same answer on every run; no database reads or writes
    settings.register_profile("isolation-ci", base, max_examples=80, deadline=None, derandomize=True, database=None,
                              suppress_health_check=_SLOW, print_blob=True)
    # nightly: big budgets; failures stay in the example database so the next run replays them first
    settings.register_profile(
        "isolation-nightly", base, max_examples=2000, deadline=None, derandomize=False, suppress_health_check=_SLOW,
        print_blob=True, database=database,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    )


def _register_at_import() -> None:
    """Importing never fails on a bad ``ISOLATION_DATABASE``: the profiles go without a database,
    and every search raises the error (the command line and the plug-in report it in one line)."""
    global _spec_error
    try:
        register_profiles()
    except DatabaseSpecError as exc:
        _register(None)
        _spec_error = exc


def check_database_spec() -> None:
    """Raise the database spec error seen at import, if any (and none was registered since)."""
    if _spec_error is not None:
        raise _spec_error


_register_at_import()


def active_profile() -> str:
    """``ISOLATION_PROFILE``, else the loaded Hypothesis profile when it is an isolation one, else dev."""
    name = os.environ.get(PROFILE_ENV)
    if name:
        if name not in PROFILES:
            raise ValueError(f"{PROFILE_ENV}={name!r} is not one of {PROFILES}")
        return name
    current = getattr(settings, "_current_profile", None)
    return current if current in PROFILES else DEFAULT_PROFILE


def example_timeout(profile: str | None = None) -> float:
    """``ISOLATION_TIMEOUT`` when set, else the profile's (the active one by default)."""
    value = os.environ.get(TIMEOUT_ENV)
    if value:
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
        if seconds <= 0:
            raise ValueError(f"{TIMEOUT_ENV}={value!r} must be positive")
        return seconds
    return TIMEOUTS[profile or active_profile()]


@dataclass(frozen=True)
class Draws:
    """What a profile's searches draw beyond the generated trees: the compile backends of a
    ``compile`` mode, and whether random ``transformers`` configurations are drawn among the trees
    (the strategy's ``backends`` and ``real_models``)."""

    backends: tuple[str, ...] = ("aot_eager",)
    real_models: bool = False

    def strategy_options(self) -> dict:
        return {"backends": self.backends, "real_models": self.real_models}


#: inductor compiles a kernel per graph (C++ on the CPU) and real models cost a few generated ones:
#: the nightly's budget pays for them, the everyday profiles keep to aot_eager and generated trees
DRAWS = {"isolation-dev": Draws(), "isolation-ci": Draws(),
         "isolation-nightly": Draws(("aot_eager", "inductor"), real_models=True)}
#: what inductor compiles with on the CPU (``CXX`` first, as torch's own ``cpp_builder``)
CXX_NAMES = ("g++", "c++", "clang++")
def missing(draws: Draws, device_type: str = "cpu") -> dict[str, str]:
    """What of ``draws`` this machine cannot run, and why (one line each, keyed by what is left out)."""
    out = {}
    if "inductor" in draws.backends:
        # what inductor compiles with is the compile mode's (``execution.modes.INDUCTOR_CONFIG``)
        if device_type == "cuda" and importlib.util.find_spec("triton") is None:
            out["inductor"] = "inductor not drawn: it compiles CUDA kernels with triton, which is not installed"
        elif device_type != "cuda" and not any(shutil.which(c) for c in (os.environ.get("CXX") or "", *CXX_NAMES) if c):
            out["inductor"] = (f"inductor not drawn: it compiles CPU kernels with a C++ compiler, and none of "
                               f"$CXX, {', '.join(CXX_NAMES)} is found")
    if draws.real_models and importlib.util.find_spec("transformers") is None:
        out["real_models"] = "random transformers models not drawn: transformers is not installed"
    return out


def draws(profile: str | None = None, device_type: str = "cpu") -> Draws:
    """The profile's ``DRAWS`` row (the active profile's by default), less what this machine cannot
    run on ``device_type`` (:func:`missing` says why)."""
    wanted = DRAWS[profile or active_profile()]
    left_out = missing(wanted, device_type)
    backends = tuple(b for b in wanted.backends if b not in left_out)
    return replace(wanted, backends=backends, real_models=wanted.real_models and "real_models" not in left_out)


def describe_draws(profile: str | None = None, device_type: str = "cpu") -> str:
    """``, also draws compile backend inductor and random transformers models``, and what is left out
    and why; "" for a profile that draws nothing beyond the defaults."""
    profile = profile or active_profile()
    wanted, got = DRAWS[profile], draws(profile, device_type)
    extra = [f"compile backend {b}" for b in got.backends if b != "aot_eager"]
    extra += ["random transformers models (hf:random)"] if got.real_models else []
    notes = list(missing(wanted, device_type).values())
    return (f", also draws {' and '.join(extra)}" if extra else "") + "".join(f" ({note})" for note in notes)


def describe_database(profile: str | None = None) -> str:
    """``.hypothesis/examples + redis://host:6379/0`` or ``none``: the profile's example database."""
    database = settings.get_profile(profile or active_profile()).database
    if database is None:
        return "none"
    spec = getattr(database, "spec", None)
    return spec.describe() if spec is not None else repr(database)


def describe(profile: str, timeout: float | None = None) -> str:
    """``isolation-dev: 60 examples, example database .hypothesis/examples, timeout 60s per run``:
    a profile in one line (``timeout``: the one given instead of the profile's)."""
    chosen = settings.get_profile(profile)
    database = describe_database(profile)
    return (f"{profile}: {chosen.max_examples} examples, "
            + ("derandomized, " if chosen.derandomize else "")
            + (f"example database {database}" if database != "none" else "no example database")
            + f", timeout {timeout or example_timeout(profile):g}s per run" + describe_draws(profile))
