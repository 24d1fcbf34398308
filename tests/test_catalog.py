"""The regression gate: every sound technique passes, every known-bad one is caught as declared.

Runs the default search (the active isolation profile; ``isolation-ci`` in the
project's own runs: derandomized, so the gate gives the same answer each time).
"""
import pytest

import isolation_suite as iso
from isolation_suite.execution import devices
from isolation_suite.engine.check import failure_message, search
from isolation_suite.techniques import CATALOG, entry, explicit_examples

SOUND = [e for e in CATALOG if not e.technique.expected_violations]
KNOWN_BAD = [e for e in CATALOG if e.technique.expected_violations]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not devices.cuda_available(),
                                                                  reason="CUDA is not available"))]


def test_catalog_has_every_seed_technique():
    names = set(iso.catalog())
    assert names == {e.name for e in CATALOG} and len(names) == 22
    seeds = {s.strip() for e in CATALOG for s in e.technique.seed.split(",") if s.strip()}
    documents = {s for s in seeds if s.isdigit()}
    assert documents == {"000", "001", "002", "003", "004"}
    # the rest are rows from the wild: each cites the public report it comes from
    assert seeds - documents == {"transformers#21381", "pytorch#83769", "lightning:BaseFinetuning", "pytorch#22049",
                                 "ClassyVision#398"}


@pytest.mark.parametrize("row", CATALOG, ids=lambda e: e.name)
def test_rows_declare_metadata(row):
    t = row.technique()
    assert t.capabilities and t.summary
    assert t.expected_violations <= set(iso.INVARIANTS)
    # every expected violation of a known-bad row names the condition that triggers it, with an example
    for invariant in t.expected_violations - {"device-parity"}:
        condition = row.condition_for(invariant)
        assert condition is not None, invariant
        assert condition.examples, f"{row.name}: no trigger example for {invariant}"
        for example in condition.examples:
            assert condition.holds(example), f"{row.name}: a trigger example for {invariant} lacks the trigger"
    # a violation expected in one mode only names a condition of that mode, and the mode has a trigger
    for mode, invariants in t.mode_violations.items():
        assert invariants <= set(iso.INVARIANTS) and mode in iso.modes.MODE_BY_KIND
        in_mode = [c for c in row.conditions if c.invariant in invariants and mode in c.modes]
        assert {c.invariant for c in in_mode} == invariants, (row.name, mode)
        assert any(c.examples for c in in_mode), f"{row.name}: no trigger example in {mode} mode"
        for condition in in_mode:
            assert all(e.mode.kind == mode and condition.holds(e) for e in condition.examples)


TRIGGERS = [(row, condition, i) for row in CATALOG for condition in row.conditions
            for i in range(len(condition.examples))]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("row, condition, i", TRIGGERS,
                         ids=[f"{r.name}-{c.invariant}-{i}" for r, c, i in TRIGGERS])
def test_every_trigger_example_catches_its_row(row, condition, i):
    """Each row's own trigger examples break it: the headline is expected and its trigger is present."""
    example = condition.examples[i]
    verdict = iso.check(row.technique(), example)
    assert not verdict.ok, f"{row.name} held on its trigger example for {condition.invariant}"
    headline = verdict.first.invariant
    assert headline in row.technique().expected_in(example.mode.kind), str(verdict)
    assert row.explains(headline, example), str(verdict)


@pytest.mark.parametrize("capability", sorted(iso.Capability, key=lambda c: c.value), ids=lambda c: c.value)
def test_sound_rows_hold_on_every_trigger_example_of_their_capability(capability):
    examples = explicit_examples({capability})
    assert examples
    for row in SOUND:
        if row.technique.capabilities == {capability}:
            for example in examples:
                verdict = iso.check(row.technique(), example)
                assert verdict.ok, str(verdict)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row", SOUND, ids=lambda e: e.name)
def test_sound_technique_passes_the_gate(row, device):
    result = search(row.technique(), device=device)
    assert result.failure is None, failure_message(result.failure)
    assert result.examples == result.max_examples and result.explicit >= 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row", KNOWN_BAD, ids=lambda e: e.name)
def test_known_bad_technique_is_caught_with_its_invariant(row, device):
    """The default search (trigger examples first) catches every known-bad row, on every run."""
    technique = row.technique()
    result = search(technique, device=device)
    assert result.failure is not None, f"{row.name}: no violation in {result.judged} examples"
    first = result.failure.first.invariant
    assert first in technique.expected_violations, failure_message(result.failure)
    assert row.explains(first, result.failure.scenario), (
        f"{row.name}: the minimal counterexample for {first} lacks its trigger "
        f"({row.condition_for(first).description})\n" + failure_message(result.failure))


@pytest.mark.parametrize("row", KNOWN_BAD, ids=lambda e: e.name)
def test_the_random_search_alone_catches_every_known_bad_row(row):
    """Without the trigger examples, the generated scenarios still find each flaw (the random search has
    teeth of its own; benchmarks/detection measures how fast over many seeds)."""
    technique = row.technique()
    result = search(technique, explicit=False, shrink=False)
    assert result.explicit == 0 and result.found_by == "search", f"{row.name}: missed in {result.examples} examples"
    first = result.failure.first.invariant
    assert first in technique.expected_violations, failure_message(result.failure)
    assert row.explains(first, result.failure.scenario)


def test_seed_004_backward_hook_counterexample_names_its_trigger():
    """The seed-004 hook is caught either way it breaks, and the message says which."""
    result = search(entry("backward_hook_zero_grad").technique())
    first = result.failure.first
    scenario = result.failure.scenario
    if first.invariant == "no-crash":  # the hook ran before weight.grad existed
        assert "NoneType" in first.message
        assert scenario.data.input_requires_grad is False or len(scenario.architecture.call_sites) > 1
    else:
        assert first.invariant == "frozen-unchanged"
        assert ("weight_decay=" in first.message or "set_to_none=False" in first.message
                or scenario.micro_batches > 1)
