"""Tiny random configurations of real ``transformers`` classes (``isolation_suite.spec.hf``).

``hf_configs`` draws one field at a time, each from its smallest value up, so a failure shrinks
toward the first class with one layer, one head, the narrowest hidden size, untied, eager attention
and no dropout. ``hf_models`` draws the name a scenario carries (``Scenario.model``): repro scripts
and the example database replay the same configuration from it.
"""
from __future__ import annotations

from typing import Iterable

from hypothesis import assume
from hypothesis import strategies as st

from isolation_suite.model.factory import factory_tree, members
from isolation_suite.model.tree import targets_for
from isolation_suite.spec import hf
from isolation_suite.strategies._validate import check_choice
from isolation_suite.technique import Capability


@st.composite
def hf_configs(draw, classes: Iterable[str] = hf.CLASSES) -> hf.HFConfig:
    """Draw a :class:`~isolation_suite.spec.hf.HFConfig` of one of ``classes``."""
    classes = check_choice("classes", classes, hf.CLASSES)
    arch = draw(st.sampled_from(classes))
    values: dict[str, str] = {}
    for field, choices in hf.CHOICES.items():
        if not hf.has_field(arch, field):
            continue
        if field == "kv":  # no more key/value heads than heads
            choices = choices[:int(values["heads"])]
        values[field] = draw(st.sampled_from(choices))
    return hf.HFConfig(arch, **values)


def fits(tree, capabilities: Iterable[Capability]) -> bool:
    """The model offers a place for every one of ``capabilities``."""
    return all(targets_for(tree, c) for c in capabilities)


def family_fits(capabilities: Iterable[Capability]) -> bool:
    """Some configuration has a place for all of ``capabilities`` (asked of the representatives;
    none has a module with parameters called twice, so none fits ``PASS_THROUGH``)."""
    caps = tuple(capabilities)
    return any(fits(factory_tree(member), caps) for member in members(hf.RANDOM))


@st.composite
def hf_models(draw, capabilities: Iterable[Capability] = (), classes: Iterable[str] = hf.CLASSES) -> str:
    """Draw the name of a configuration whose model has a place for every one of ``capabilities``
    (a configuration without one, say a tied GPT-2 for ``REPARAMETERIZE``, is rejected: its
    intent would come out empty). Each configuration's tree is probed once per process."""
    name = hf.name(draw(hf_configs(classes)))
    assume(fits(factory_tree(name), tuple(capabilities)))
    return name
