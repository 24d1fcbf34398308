"""The project's own test configuration.

The isolation plug-in (``isolation_suite.pytest_plugin``) is loaded through its
``pytest11`` entry point; here we only pick the deterministic CI profile for our
own tests unless the caller chose another one.
"""
import os

os.environ.setdefault("ISOLATION_PROFILE", "isolation-ci")

pytest_plugins = ["pytester"]
