"""The sweep: one scenario, every technique that fits it, one reference.

A search (:func:`isolation_suite.engine.check.search`) judges one technique and computes the reference
for each of its scenarios. When a set of techniques is judged (the whole catalog), most of them
share their scenarios: ``sweep`` draws each scenario once, computes the reference (and, where a
float32 mismatch needs it, the float64 twin's) once, in this process, and judges every technique
whose capabilities cover the scenario's intent, each in a sandbox of its own for the whole sweep.
A technique's first failure is handed to the same Hypothesis search a per-technique search runs,
which replays and shrinks it, so its result is what :func:`~isolation_suite.engine.check.search` would
report: a :class:`~isolation_suite.engine.check.SearchResult` per technique, with the same counts.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from hypothesis import Phase, event, given, settings, target
from hypothesis import seed as hypothesis_seed
from hypothesis.control import current_build_context
from hypothesis.database import choices_to_bytes

from isolation_suite.execution import devices as devices_mod
from isolation_suite.engine.check import (DEVICE_RANDOM, _NO_TARGET_WHY, SearchResult, Start, _search, mode_settings,
                                          moved_examples, search_settings, search_strategy)
from isolation_suite.judging.invariants import TIMEOUT
from isolation_suite.judging.judge import SharedReference, Verdict, as_technique, judge
from isolation_suite.judging.coverage import Coverage, coverage_examples
from isolation_suite.model.factory import factory_name, factory_tree, is_family, model_trees
from isolation_suite.engine.profiles import example_timeout
from isolation_suite.techniques import explicit_examples
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.execution.trace import watch_user_interrupts
from isolation_suite.execution.sandbox import mode as sandbox_mode
from isolation_suite.spec.mode_kinds import BY_KIND as MODE_KIND
from isolation_suite.spec.mode_kinds import DEFAULT as DEFAULT_MODE
from isolation_suite.spec.scenario import Intent, Scenario
from isolation_suite.technique import Capability, Technique
from isolation_suite.model.tree import targets_for


def intent_capabilities(intent: Intent) -> frozenset[Capability]:
    """The capabilities an intent asks for (the empty set for an intent that isolates nothing)."""
    return frozenset(cap for cap, used in ((Capability.FREEZE_MODULE, intent.frozen_modules),
                                           (Capability.PASS_THROUGH, intent.pass_through),
                                           (Capability.FREEZE_ELEMENTS, intent.frozen_elements),
                                           (Capability.REPARAMETERIZE, intent.reparameterized)) if used)


def scenario_capabilities(scenario: Scenario) -> frozenset[Capability]:
    """What a technique must be able to do to be judged on ``scenario``: its intents' capabilities,
    with frozen modules that change at a step boundary needing ``FREEZE_SCHEDULE``."""
    needed = frozenset().union(*(intent_capabilities(i) for i in scenario.intents))
    if scenario.schedule:
        needed = (needed - {Capability.FREEZE_MODULE}) | {Capability.FREEZE_SCHEDULE}
    return needed


def covers(capabilities: frozenset[Capability], needed: frozenset[Capability]) -> bool:
    """A technique's ``capabilities`` cover ``needed`` (following a freeze schedule includes freezing)."""
    if Capability.FREEZE_SCHEDULE in capabilities:
        capabilities = capabilities | {Capability.FREEZE_MODULE}
    return needed <= capabilities


@dataclass
class SweepResult:
    """What one sweep did: a search result per technique (in the order given) and the sweep's own
    counts (``references``: reference traces computed, one per scenario at most, not counting a
    float64 twin; ``checks``: technique x scenario judgements before shrinking)."""

    results: list[SearchResult]
    capabilities: frozenset[Capability]
    device: str
    scenarios: int = 0  # generated scenarios drawn
    explicit: int = 0  # trigger and coverage examples judged
    references: int = 0
    checks: int = 0
    seconds: float = 0.0
    seed: int | None = None

    def __getitem__(self, name: str) -> SearchResult:
        for result in self.results:
            if result.technique == name:
                return result
        raise KeyError(name)


class _AllDecided(BaseException):
    """Ends the generation once every technique has failed (a BaseException: Hypothesis lets it through)."""


class _BudgetSpent(BaseException):
    """Ends the generation when the sweep's budget is spent."""


class _ExamplesSpent(BaseException):
    """Ends the generation after ``max_examples`` scenarios."""


@dataclass
class _Member:
    """One technique in a sweep: its capabilities here, sandbox, result, and its first failure."""

    technique: Technique
    caps: frozenset[Capability]
    result: SearchResult
    sandbox: Sandbox | None = None
    found: Start | None = None  # a generated scenario's failure, to shrink
    coverage: Coverage | None = None  # on a user's model: which targets its judged scenarios reached

    @property
    def active(self) -> bool:
        return self.result.failure is None and not self.result.not_applicable

    def fits(self, scenario: Scenario) -> bool:
        return covers(self.caps, scenario_capabilities(scenario))


def sweep(techniques: Iterable[Technique | type[Technique]], capabilities: Iterable[Capability] | None = None,
          device: str = "cpu", max_examples: int | None = None, budget: float | None = None, *,
          seed: int | None = None, shrink: bool = True, explicit: bool = True, timeout: float | None = None,
          model: str | Callable | None = None, mode: str = "eager") -> SweepResult:
    """Judge every technique on shared scenarios; one :class:`SearchResult` per technique.

    The scenarios are drawn with ``capabilities`` (every technique's, by default), and a technique
    is judged on a scenario when its capabilities cover the scenario's intent. First the catalog's
    trigger examples for these capabilities, then at most ``max_examples`` generated scenarios (the
    profile's), then each technique's first generated failure is replayed and shrunk by the
    per-technique search's Hypothesis run (the same strategy, database key and settings), within
    what is left of ``budget`` (seconds, the whole sweep, shrinking included). A technique that
    fails is not judged again on later scenarios; a timeout is not shrunk (as in a search). Each
    technique runs in a sandbox of its own for the whole sweep; the reference of a scenario is
    computed once, here, before any technique runs on it. ``seed``, ``timeout``, ``model``: as for
    :func:`~isolation_suite.engine.check.search`; ``mode``: the execution mode every scenario runs in.
    """
    members_in = [as_technique(t) for t in techniques]
    names = [t.name for t in members_in]
    if len(set(names)) != len(names):
        raise ValueError(f"technique names must be unique in a sweep, got {names}")
    caps = frozenset(capabilities) if capabilities is not None else frozenset().union(
        *(t.capabilities for t in members_in))
    if not caps:
        raise ValueError("a sweep needs capabilities: no technique declares any")
    device = devices_mod.normalize(device)
    run_settings = mode_settings(search_settings(max_examples, device), mode, max_examples)
    if not shrink:
        run_settings = settings(run_settings, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])
    if seed is None and not run_settings.derandomize:
        seed = random.SystemRandom().getrandbits(32)
    spec = None if model is None else factory_name(model)
    trees = model_trees(spec) if spec is not None else None
    # coverage counts the targets of one model; a family's draw a model per example
    tree = trees[0] if spec is not None and not is_family(spec) else None
    family_split = spec is not None and is_family(spec) and MODE_KIND[mode].distributed
    members = []
    for technique in members_in:
        mine = technique.capabilities & caps
        if not mine:
            raise ValueError(f"technique {technique.name!r} has none of the sweep's capabilities "
                             f"{sorted(c.value for c in caps)}")
        result = SearchResult(technique.name, mine, device, max_examples=run_settings.max_examples, budget=budget,
                              seed=seed, model=spec or "", mode=mode)
        if family_split:
            result.not_applicable = f"the {mode} mode does not draw {spec}: name one configuration"
        elif trees is not None:
            missing = [c.value for c in sorted(mine, key=lambda c: c.value)
                       if not any(targets_for(t, c) for t in trees)]
            if missing:
                result.not_applicable = (f"the model offers no place for {', '.join(missing)} "
                                         f"({_NO_TARGET_WHY[missing[0]]})")
            elif device.startswith("cuda") and any(t.device_random for t in trees):
                result.parity_not_judged = DEVICE_RANDOM
        member = _Member(technique, mine, result)
        if tree is not None and not result.not_applicable:
            member.coverage = Coverage(tree, mine)
            result.coverage = member.coverage.counts()
        members.append(member)
    if trees is not None:  # draw no intent the model has no place for (it would come out empty)
        caps = frozenset(c for c in caps if any(targets_for(t, c) for t in trees) and not family_split)
    out = SweepResult([m.result for m in members], caps, device, seed=seed)
    started = time.monotonic()
    deadline = None if budget is None else started + budget
    watch_user_interrupts()
    per_run = example_timeout() if timeout is None else timeout
    with contextlib.ExitStack() as stack:
        for m in members:
            m.sandbox = stack.enter_context(Sandbox(m.technique, per_run))
        if caps:
            _run(members, caps, device, run_settings, out, deadline, explicit, spec, mode)
            _shrink_failures(members, caps, device, run_settings, deadline, spec, mode)
    where = "in-process (CUDA runs)" if device.startswith("cuda") else sandbox_mode()
    for m in members:
        m.result.sandbox = where
    out.seconds = time.monotonic() - started
    return out


def judge_shared(judges: Sequence[tuple[Technique, Sandbox]], scenario: Scenario,
                 device: str = "cpu") -> tuple[list[Verdict], SharedReference]:
    """Judge each ``(technique, its sandbox)`` on ``scenario`` against one reference, computed once
    here (its float64 twin too, when a float32 mismatch needs it): the same verdicts as
    :func:`~isolation_suite.judging.judge.judge` gives each technique alone."""
    shared = SharedReference(scenario, device)
    return [judge(technique, scenario, device, sandbox=sandbox, reference=shared)
            for technique, sandbox in judges], shared


def _judge_all(members: Sequence[_Member], scenario: Scenario, device: str, out: SweepResult,
               found_by: str, started: float) -> list[tuple[_Member, Verdict]]:
    """Judge every active member that fits ``scenario`` against one shared reference."""
    fitting = [m for m in members if m.active and m.fits(scenario)]
    if not fitting:
        return []
    verdicts, shared = judge_shared([(m.technique, m.sandbox) for m in fitting], scenario, device)
    out.references += 1
    out.checks += len(fitting)
    for m, verdict in zip(fitting, verdicts):
        result = m.result
        for v in verdict.violations:
            result.invariant_counts[v.invariant] = result.invariant_counts.get(v.invariant, 0) + 1
        if found_by == "explicit":
            result.explicit += 1
        elif found_by == "coverage":
            result.coverage_examples += 1
        else:
            result.examples += 1
        if m.coverage is not None:
            m.coverage.note(scenario)
            result.coverage = m.coverage.counts()
        if not verdict.ok:
            result.first_failure_at = result.explicit + result.coverage_examples + result.examples
            result.seconds_to_first_failure = time.monotonic() - started
            result.found_by = found_by
            result.failure = verdict  # the smallest seen so far; a generated one is shrunk below
    return list(zip(fitting, verdicts))


def _run(members: list[_Member], caps: frozenset[Capability], device: str, run_settings: settings,
         out: SweepResult, deadline: float | None, explicit: bool, model: str | None, mode: str = "eager") -> None:
    started = time.monotonic()

    def spent() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    def budget_reached() -> None:
        for m in members:
            if m.active:
                m.result.budget_reached = True

    # 1. the trigger examples, minimal by construction, then (on a user's model) every target once
    # (``isolation_suite.judging.coverage``): a failure there is the technique's result
    triggers = (moved_examples(model, caps, mode) if model else explicit_examples(caps, mode)) if explicit else ()
    covering = coverage_examples(model, factory_tree(model), caps, mode) \
        if explicit and model and not is_family(model) else ()
    for scenario, found_by in [(s, "explicit") for s in triggers] + [(s, "coverage") for s in covering]:
        if not any(m.active for m in members):
            return
        if spent():
            return budget_reached()
        out.explicit += 1
        _judge_all(members, scenario, device, out, found_by, started)

    # 2. what each technique's own search would replay first: its failures kept in the example database
    for m in members:
        if m.active and run_settings.database is not None:
            if spent():
                return budget_reached()
            _search(m.technique, m.caps, device, run_settings, m.result,
                    None if deadline is None else max(0.0, deadline - time.monotonic()), False, m.sandbox, model,
                    mode, generate=False)

    # 3. generated scenarios, each judged by every technique it fits
    @settings(run_settings, database=None, phases=[p for p in run_settings.phases if p != Phase.shrink])
    @given(search_strategy(caps, device, model, mode))
    def probe(scenario: Scenario) -> None:
        if not any(m.active for m in members):
            raise _AllDecided()
        if spent():
            raise _BudgetSpent()
        if out.scenarios >= run_settings.max_examples:
            raise _ExamplesSpent()
        out.scenarios += 1
        verdicts = _judge_all(members, scenario, device, out, "search", started)
        choices = None
        for m, verdict in verdicts:
            for v in verdict.violations:
                event(v.invariant)
            target(min(verdict.divergence, 1e6), label=f"{m.technique.name}: divergence from the reference")
            if not verdict.ok and TIMEOUT not in verdict.invariants:
                if choices is None:  # the draw that made this scenario, for the technique's own shrinker
                    choices = choices_to_bytes(current_build_context().data.choices)
                m.found = Start(verdict, choices)

    if out.seed is not None:
        probe = hypothesis_seed(out.seed)(probe)
    probe.hypothesis.inner_test._hypothesis_internal_add_digest = (
        f"sweep|{sorted(c.value for c in caps)}|{device}" + (f"|{model}" if model else "")
        + ("" if mode == DEFAULT_MODE else f"|{mode}")).encode()
    try:
        probe()
    except _BudgetSpent:
        budget_reached()
    except (_AllDecided, _ExamplesSpent):
        pass


def _shrink_failures(members: list[_Member], caps: frozenset[Capability], device: str, run_settings: settings,
                     deadline: float | None, model: str | None, mode: str = "eager") -> None:
    """Each technique's first generated failure, shrunk by its own search: the rest of the budget is
    shared out evenly among the failures still to shrink."""
    if Phase.shrink not in run_settings.phases:
        return
    todo = [m for m in members if m.found is not None]
    for i, m in enumerate(todo):
        left = None if deadline is None else max(0.0, deadline - time.monotonic()) / (len(todo) - i)
        if left is not None and left <= 0:
            m.result.budget_reached = True
            continue
        found, m.result.failure = m.found, None
        _search(m.technique, caps, device, run_settings, m.result, left, False, m.sandbox, model, mode, start=found,
                fits=m.fits if caps != m.caps else None)


__all__ = ["sweep", "SweepResult", "judge_shared", "intent_capabilities"]
