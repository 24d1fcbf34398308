"""Hypothesis profiles ``isolation-dev``, ``isolation-ci``, ``isolation-nightly``, and where failures are kept.

| profile             | examples | seed                            | example database                        |
|---------------------|----------|---------------------------------|-----------------------------------------|
| ``isolation-dev``   | 60       | drawn per run, printed          | ``$ISOLATION_DATABASE`` (default below) |
| ``isolation-ci``    | 80       | derandomized: fixed per item    | none: every run judges the same things  |
| ``isolation-nightly`` | 2000   | drawn per run, printed          | ``$ISOLATION_DATABASE`` (default below) |

``ISOLATION_DATABASE`` is a directory (default ``.hypothesis/examples``, relative to the working
directory), or ``none`` to keep no database. Failing examples stored there are replayed first.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

PROFILE_ENV = "ISOLATION_PROFILE"
DATABASE_ENV = "ISOLATION_DATABASE"
TIMEOUT_ENV = "ISOLATION_TIMEOUT"
#: seconds one training run of the technique may take before it is stopped (a ``timeout`` violation);
#: runs take milliseconds to a second, so these only ever stop a hang
TIMEOUTS = {"isolation-dev": 60.0, "isolation-ci": 60.0, "isolation-nightly": 300.0}
DEFAULT_PROFILE = "isolation-dev"
DEFAULT_DATABASE = ".hypothesis/examples"
PROFILES = ("isolation-dev", "isolation-ci", "isolation-nightly")

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]


def database_location() -> str | None:
    """The example database directory for the dev and nightly profiles, or None (``ISOLATION_DATABASE=none``)."""
    value = os.environ.get(DATABASE_ENV, DEFAULT_DATABASE).strip()
    return None if value.lower() in ("", "none", "off") else value


def register_profiles() -> None:
    """(Re-)register the three profiles; call again after changing ``ISOLATION_DATABASE``."""
    location = database_location()
    database = DirectoryBasedExampleDatabase(location) if location else None
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


register_profiles()


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


def describe(profile: str, timeout: float | None = None) -> str:
    """``isolation-dev: 60 examples, example database .hypothesis/examples, timeout 60s per run``:
    a profile in one line (``timeout``: the one given instead of the profile's)."""
    chosen = settings.get_profile(profile)
    database = getattr(chosen.database, "path", None) if chosen.database is not None else None
    return (f"{profile}: {chosen.max_examples} examples, "
            + ("derandomized, " if chosen.derandomize else "")
            + (f"example database {database}" if database else "no example database")
            + f", timeout {timeout or example_timeout(profile):g}s per run")
