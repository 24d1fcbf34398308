"""Hypothesis strategies for isolation scenarios.

>>> import strategies
>>> strategies.scenarios(capabilities=["PASS_THROUGH"], dtypes=["float64"])  # doctest: +ELLIPSIS
scenarios(...)
"""
from .architectures import CHILD_NAMES, TOP_NAMES, architectures
from .elements import PATTERNS, element_indices
from .optimizers import optimizer_recipes
from .scenarios import as_capabilities, execution_modes, freeze_schedules, intents, scenarios

__all__ = ["architectures", "element_indices", "optimizer_recipes", "intents", "scenarios",
           "execution_modes", "freeze_schedules",
           "as_capabilities", "TOP_NAMES", "CHILD_NAMES", "PATTERNS"]
