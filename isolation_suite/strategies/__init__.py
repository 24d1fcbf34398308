"""Hypothesis strategies for isolation scenarios.

>>> import strategies
>>> strategies.scenarios(capabilities=["PASS_THROUGH"], dtypes=["float64"])  # doctest: +ELLIPSIS
scenarios(...)
"""
from isolation_suite.strategies._draft import CHILD_NAMES, TOP_NAMES
from isolation_suite.strategies.architectures import architectures
from isolation_suite.strategies.elements import PATTERNS, element_indices
from isolation_suite.strategies.hf import hf_configs, hf_models
from isolation_suite.strategies.optimizers import optimizer_recipes
from isolation_suite.strategies.scenarios import as_capabilities, execution_modes, freeze_schedules, intents, scenarios

__all__ = ["architectures", "element_indices", "optimizer_recipes", "intents", "scenarios",
           "execution_modes", "freeze_schedules", "hf_configs", "hf_models",
           "as_capabilities", "TOP_NAMES", "CHILD_NAMES", "PATTERNS"]
