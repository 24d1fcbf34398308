"""The project's own test configuration.

The isolation plug-in (``isolation_suite.pytest_plugin``) is loaded through its
``pytest11`` entry point; here we only pick the deterministic CI profile for our
own tests unless the caller chose another one, and eager as the default execution mode of the
command lines and plug-in runs they start (``ISOLATION_MODES``): each mode is gated on its own in
``tests/test_modes.py``, and the tests of reports, shards, databases and hostile techniques would
otherwise pay for every mode of every item.
"""
import os

os.environ.setdefault("ISOLATION_PROFILE", "isolation-ci")
os.environ.setdefault("ISOLATION_MODES", "eager")

pytest_plugins = ["pytester"]
