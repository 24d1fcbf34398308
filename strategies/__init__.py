"""Hypothesis strategies for isolation scenarios: the public name of ``isolation_suite.strategies``.

The strategies live inside the package so the search can use them without the package and the
strategies importing each other in a circle; ``import strategies`` (and ``strategies.reuse``,
``strategies.architectures``, ...) keep working for users' own ``@given`` tests.

>>> import strategies
>>> strategies.scenarios(capabilities=["PASS_THROUGH"], dtypes=["float64"])  # doctest: +ELLIPSIS
scenarios(...)
"""
import importlib
import sys

from isolation_suite import strategies as _impl
from isolation_suite.strategies import *  # noqa: F401,F403 - the public names
from isolation_suite.strategies import __all__  # noqa: F401

for _name in ("architectures", "elements", "hf", "optimizers", "reuse", "scenarios"):
    _module = sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"{_impl.__name__}.{_name}")
    if _name not in __all__:  # ``architectures`` and ``scenarios`` are the strategies of those names
        globals()[_name] = _module
