"""Hypothesis profiles: ``isolation-dev``, ``isolation-ci``, ``isolation-nightly``."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

PROFILE_ENV = "ISOLATION_PROFILE"
DEFAULT_PROFILE = "isolation-dev"
PROFILES = ("isolation-dev", "isolation-ci", "isolation-nightly")

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile("isolation-dev", max_examples=60, deadline=None, suppress_health_check=_SLOW)
# CI: derandomized, so the gate gives the same answer on every run; no database writes
settings.register_profile("isolation-ci", max_examples=80, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW, print_blob=True)
# nightly: big budgets; failures stay in the example database so the next plain run replays them first
settings.register_profile(
    "isolation-nightly", max_examples=2000, deadline=None, suppress_health_check=_SLOW, print_blob=True,
    database=DirectoryBasedExampleDatabase(os.environ.get("ISOLATION_DATABASE", ".hypothesis/examples")),
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)


def active_profile() -> str:
    """``ISOLATION_PROFILE``, else the loaded Hypothesis profile when it is an isolation one, else dev."""
    name = os.environ.get(PROFILE_ENV)
    if name:
        if name not in PROFILES:
            raise ValueError(f"{PROFILE_ENV}={name!r} is not one of {PROFILES}")
        return name
    current = getattr(settings, "_current_profile", None)
    return current if current in PROFILES else DEFAULT_PROFILE
