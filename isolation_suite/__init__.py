"""isolation-suite: property-based testing and fuzzing of gradient isolation in PyTorch.

>>> import isolation_suite as iso
>>> sorted(iso.catalog())[:2]
['backward_hook_zero_grad', 'freeze_and_eval']

The names below are imported on first use (PEP 562), so ``import isolation_suite`` (and the
pytest plug-in's entry point, which imports this package in every pytest session) costs no torch
import until something is asked for.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("Architecture", "Data", "Intent", "Layer", "Mode", "Op", "OptimizerRecipe", "Scenario",
                     "ScenarioError"), "isolation_suite.spec.scenario"),
    "SandboxError": "isolation_suite.execution.sandbox",
    **dict.fromkeys(("Capability", "Role", "Technique"), "isolation_suite.technique"),
    **dict.fromkeys(("IsolationFailure", "SearchResult", "Verdict", "check", "check_technique", "search"),
                    "isolation_suite.engine.check"),
    **dict.fromkeys(("INVARIANTS", "Violation"), "isolation_suite.judging.invariants"),
    **dict.fromkeys(("TechniqueLoadError", "load_technique"), "isolation_suite.engine.loading"),
    **dict.fromkeys(("SweepResult", "sweep"), "isolation_suite.engine.sweep"),
    **dict.fromkeys(("CATALOG", "catalog"), "isolation_suite.techniques"),
}
#: public submodules under their short names (``iso.modes.MODES``)
_MODULES = {"modes": "isolation_suite.execution.modes", "profiles": "isolation_suite.engine.profiles",
            "devices": "isolation_suite.execution.devices", "scenario": "isolation_suite.spec.scenario",
            "techniques": "isolation_suite.techniques", "strategies": "isolation_suite.strategies"}

__all__ = sorted([*_EXPORTS, "modes", "profiles"])
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'isolation_suite' has no attribute {name!r}")
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_MODULES})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from isolation_suite.engine import profiles
    from isolation_suite.engine.check import (IsolationFailure, SearchResult, Verdict, check, check_technique,
                                              search)
    from isolation_suite.engine.loading import TechniqueLoadError, load_technique
    from isolation_suite.engine.sweep import SweepResult, sweep
    from isolation_suite.execution import modes
    from isolation_suite.execution.sandbox import SandboxError
    from isolation_suite.judging.invariants import INVARIANTS, Violation
    from isolation_suite.spec.scenario import (Architecture, Data, Intent, Layer, Mode, Op, OptimizerRecipe,
                                               Scenario, ScenarioError)
    from isolation_suite.technique import Capability, Role, Technique
    from isolation_suite.techniques import CATALOG, catalog
