"""What is said is what is run: trigger examples first, at most ``max_examples`` generated, the budget
(shrinking included), and a seed that fixes the search. Time is a fake clock here, never the machine's."""
from __future__ import annotations

import sys

import pytest
import torch

import isolation_suite as iso
from isolation_suite.engine.check import search, search_line
from isolation_suite.techniques import explicit_examples
from isolation_suite.techniques.freeze_module import FreezeAndEval

check_mod = sys.modules["isolation_suite.engine.check"]  # iso.check is the function of that name


class BrokenOnConvolutions(FreezeAndEval):
    """Sound, except that it forgets to freeze a module holding a convolution: no trigger example
    has one, so only the generated scenarios can find it."""

    name = "broken_on_convolutions"

    def setup(self, model, intent):
        for path in intent.frozen_modules:
            module = model.get_submodule(path)
            if any(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) for m in module.modules()):
                return
        super().setup(model, intent)


class FakeClock:
    """Each judged example costs exactly one second."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        real_judge = check_mod.judge

        def judge(*args, **kwargs):
            self.now += 1.0
            return real_judge(*args, **kwargs)
        monkeypatch.setattr(check_mod, "judge", judge)
        monkeypatch.setattr(check_mod.time, "monotonic", lambda: self.now)


def test_trigger_examples_are_judged_first_and_counted_apart():
    sound = iso.catalog()["freeze_and_eval"]
    result = search(sound, max_examples=5)
    assert result.explicit == len(explicit_examples({iso.Capability.FREEZE_MODULE})) and result.explicit >= 5
    assert result.examples == 5 and result.shrink_examples == 0 and result.failure is None
    bad = search(iso.catalog()["restore_after_step"], max_examples=5)
    assert bad.found_by == "explicit" and bad.examples == 0 and bad.first_failure_at == bad.explicit  # the last one
    assert "(found by a trigger example)" in check_mod.failure_message(bad.failure, (), bad)


def test_the_budget_ends_the_search_within_one_example(monkeypatch):
    clock = FakeClock(monkeypatch)
    result = search(iso.catalog()["functional_detach"], max_examples=10_000, budget=7.0)
    assert result.budget_reached and result.failure is None
    assert clock.now == 7.0 and result.judged == 7  # no example starts once the 7 seconds are spent


def test_generated_examples_are_capped_and_shrinking_is_bounded_and_counted_apart(monkeypatch):
    first = search(BrokenOnConvolutions(), max_examples=60, explicit=False, shrink=False, seed=3)
    assert first.found_by == "search" and first.examples == first.first_failure_at <= 60
    clock = FakeClock(monkeypatch)
    budget = first.first_failure_at + 3.0  # time for the search and three shrinking steps
    result = search(BrokenOnConvolutions(), max_examples=60, budget=budget, explicit=False, seed=3)
    assert result.budget_reached and result.failure is not None and clock.now <= budget
    assert result.examples == first.examples and result.shrink_examples == 3  # shrinking is not "generated"
    assert result.failure.first.invariant == first.failure.first.invariant
    assert f"{result.examples} generated (max 60), 3 while shrinking" in search_line(result)


def test_a_seed_fixes_the_search():
    runs = [search(BrokenOnConvolutions(), max_examples=80, explicit=False, shrink=False, seed=seed)
            for seed in (11, 11, 12)]
    assert runs[0].failure is not None and runs[0].seed == 11
    assert runs[0].failure.scenario == runs[1].failure.scenario
    assert runs[0].first_failure_at == runs[1].first_failure_at
    assert (runs[2].failure is None or runs[2].failure.scenario != runs[0].failure.scenario
            or runs[2].first_failure_at != runs[0].first_failure_at)


def test_a_seed_wins_over_a_derandomized_profile_and_is_drawn_otherwise(monkeypatch):
    monkeypatch.setenv("ISOLATION_PROFILE", "isolation-ci")
    assert search(iso.catalog()["functional_detach"], max_examples=2).seed is None  # derandomized
    assert search(iso.catalog()["functional_detach"], max_examples=2, seed=5).seed == 5
    monkeypatch.setenv("ISOLATION_PROFILE", "isolation-dev")
    monkeypatch.setenv("ISOLATION_DATABASE", "none")
    drawn = search(iso.catalog()["functional_detach"], max_examples=2).seed
    assert isinstance(drawn, int) and 0 <= drawn < 2**32


@pytest.mark.parametrize("capability", sorted(iso.Capability, key=lambda c: c.value), ids=lambda c: c.value)
def test_every_capability_has_trigger_examples_that_use_only_it(capability):
    examples = explicit_examples({capability})
    assert examples
    if capability is iso.Capability.FREEZE_SCHEDULE:  # frozen modules that change: some examples change them
        assert any(s.schedule for s in examples)
    for scenario in examples:
        intent = scenario.intent
        if capability is iso.Capability.FREEZE_SCHEDULE:
            assert any(i.frozen_modules for i in scenario.intents)
            assert not (intent.pass_through or intent.frozen_elements or intent.reparameterized)
            continue
        used = {iso.Capability.FREEZE_MODULE: bool(intent.frozen_modules),
                iso.Capability.PASS_THROUGH: bool(intent.pass_through),
                iso.Capability.FREEZE_ELEMENTS: bool(intent.frozen_elements),
                iso.Capability.REPARAMETERIZE: bool(intent.reparameterized)}
        assert [c for c, on in used.items() if on] == [capability]
