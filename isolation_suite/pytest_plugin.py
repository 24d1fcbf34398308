"""pytest plug-in: ``--isolation-technique pkg.mod:attr`` turns any pytest run into the isolation gate.

Installed as a ``pytest11`` entry point, so it loads in every pytest session of the environment:
this module only declares the options (from ``engine.settings``, which imports neither torch nor
Hypothesis). The gate itself (``pytest_gate``) is imported only when an ``--isolation-*`` option or
``ISOLATION_PROFILE`` asks for it.
"""
from __future__ import annotations

import os
import sys

import pytest

from isolation_suite.engine.settings import OPTION, add_pytest_options, given_on_pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    add_pytest_options(parser.getgroup("isolation", "gradient isolation gate (isolation-suite)"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "isolation: an isolation-suite gate item")
    given = given_on_pytest(config.getoption)
    if all(value in (None, [], False) for value in given.values()) and not os.environ.get(OPTION["profile"].env):
        return  # nothing asked of the gate: nothing imported
    from isolation_suite import pytest_gate
    pytest_gate.configure(config, given)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Warm ``iso.check`` children (``execution.warm``) end with the test that forked them, so no
    later test's fixtures and patches meet a child forked before them."""
    warm = sys.modules.get("isolation_suite.execution.warm")
    if warm is not None:
        warm.retire_all()
