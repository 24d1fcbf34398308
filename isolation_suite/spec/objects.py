"""``'pkg.module:attr'``: the object a spec names, or one clear error (techniques and model factories)."""
from __future__ import annotations

import importlib
import sys


def import_object(spec: str, what: str, error: type[Exception]) -> object:
    """The object ``'pkg.module:attr'`` names (the working directory importable, as under pytest and
    ``python -m``); ``error`` with one line saying why when it cannot be imported."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise error(f"{what} spec {spec!r} must look like 'pkg.module:attr'")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # a user's module in the working directory, as pytest and python -m do
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise error(f"cannot import module {module_name!r} for {what} {spec!r}") from None
        raise error(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a broken plug-in is the user's error, reported in one line
        raise error(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
