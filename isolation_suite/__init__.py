"""isolation-suite: property-based testing and fuzzing of gradient isolation in PyTorch.

>>> import isolation_suite as iso
>>> sorted(iso.catalog())[:2]
['backward_hook_zero_grad', 'freeze_and_eval']
"""
from . import modes, profiles  # profiles registers the Hypothesis profiles
from .check import IsolationFailure, SearchResult, Verdict, check, check_technique, search
from .invariants import INVARIANTS, Violation
from .loading import TechniqueLoadError, load_technique
from .sandbox import SandboxError
from .scenario import Architecture, Data, Intent, Layer, Mode, Op, OptimizerRecipe, Scenario, ScenarioError
from .sweep import SweepResult, sweep
from .technique import Capability, Role, Technique
from .techniques import CATALOG, catalog

__all__ = [
    "Architecture", "Data", "Intent", "Layer", "Mode", "Op", "OptimizerRecipe", "Scenario", "ScenarioError",
    "SandboxError",
    "Capability", "Role", "Technique", "Verdict", "Violation", "INVARIANTS",
    "check", "check_technique", "search", "SearchResult", "IsolationFailure", "sweep", "SweepResult",
    "catalog", "CATALOG", "load_technique", "TechniqueLoadError", "profiles", "modes",
]
__version__ = "0.1.0"
