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
from hypothesis import strategies as st
from hypothesis import seed as hypothesis_seed
from hypothesis.control import current_build_context
from hypothesis.database import choices_to_bytes

from isolation_suite.execution import devices as devices_mod
from isolation_suite.engine.check import (DEVICE_RANDOM, _NO_TARGET_WHY, JudgedExample, SearchResult, Start, _search,
                                          mode_settings, moved_examples, search_settings, search_strategy)
from isolation_suite.judging.invariants import TIMEOUT
from isolation_suite.judging.judge import SharedReference, Verdict, judge
from isolation_suite.judging.coverage import Coverage, coverage_examples
from isolation_suite.model.factory import ModelFactoryError, factory_name, factory_tree, is_family, model_trees
from isolation_suite.engine.loading import technique_of
from isolation_suite.engine.profiles import example_timeout
from isolation_suite.techniques import explicit_examples
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.execution.trace import watch_user_interrupts
from isolation_suite.execution.sandbox import mode as sandbox_mode
from isolation_suite.spec.mode_kinds import BY_KIND as MODE_KIND
from isolation_suite.spec.mode_kinds import DEFAULT as DEFAULT_MODE
from isolation_suite.spec.scenario import Intent, Scenario, ScenarioError
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


def sweep(techniques: Iterable[str | Technique | type[Technique]], capabilities: Iterable[Capability] | None = None,
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
    members_in = [technique_of(t) for t in techniques]
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
                              seed=seed, model=spec or "", mode=mode,
                              timeout=example_timeout() if timeout is None else timeout)
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
    verdicts = judge_batch([(technique, sandbox, [scenario]) for technique, sandbox in judges], device,
                           references={id(scenario): shared})
    return [v for (v,) in verdicts], shared


def judge_batch(judges: Sequence[tuple[Technique, Sandbox, Sequence[Scenario]]], device: str = "cpu", *,
                references: dict[int, SharedReference] | None = None,
                on_verdict: Callable[[int, Scenario, Verdict], bool] | None = None) -> list[list[Verdict]]:
    """Judge each ``(technique, its sandbox, its scenarios)`` against one reference per scenario
    (``references``, by ``id`` of the scenario, or computed here); per judge, its verdicts in order.

    Each technique's child is sent its scenarios in one request (``Sandbox.prefetch``) and runs them
    back to back, ``CHILDREN_AT_ONCE`` techniques' children at once: this process computes the
    references while they run, then judges one run of each of them in turn (the first scenario of
    each, then the second, ...) while they run their next ones; a technique whose runs are all judged
    makes room for the next technique's child. ``on_verdict(judge's index, scenario, verdict)``
    returning False judges that technique on none of its later scenarios (its child, still running
    them, is ended rather than waited for). The verdicts are those
    :func:`~isolation_suite.judging.judge.judge` gives each technique alone on each scenario: each
    child runs its own technique only, and each technique's scenarios are judged in order."""
    references = {} if references is None else references
    shares = [_Flight(i, technique, sandbox, list(mine)) for i, (technique, sandbox, mine) in enumerate(judges) if mine]
    flights = _Flights(shares, device)  # the first children run while the references are computed
    for flight in shares:
        for scenario in flight.scenarios:  # before any verdict (a scenario the reference cannot run raises)
            references.setdefault(id(scenario), SharedReference(scenario, device)).trace
    out: list[list[Verdict]] = [[] for _ in judges]
    while flights.flying:
        for flight in list(flights.flying):  # one run of each, in the order they were sent
            scenario = flight.scenarios[len(out[flight.index])]
            verdict = judge(flight.technique, scenario, device, sandbox=flight.sandbox,
                            reference=references[id(scenario)])
            out[flight.index].append(verdict)
            stop = on_verdict is not None and not on_verdict(flight.index, scenario, verdict)
            if stop or len(out[flight.index]) == len(flight.scenarios):
                flights.land(flight)
    return out


#: how many techniques' children run their batches at once in ``judge_batch`` (None: every
#: technique's). This process's work per run (the invariants, the float64 twin's reference, judging)
#: is a fraction of a child's: with one child at a time a core sat idle, and a batch's last technique
#: ran alone. On two cores (``benchmarks.sweep_profile --children-at-once``), the worst capability's
#: median share of the physical floor was 51 % with 1, 75 % with 2, 80 % with 3, and with all of a
#: capability's 9 techniques at once 72 %: each more child is more processes taking turns on the cores.
CHILDREN_AT_ONCE: int | None = 3


@dataclass
class _Flight:
    """One technique's share of a batch: its child is sent the scenarios when it takes off."""

    index: int
    technique: Technique
    sandbox: Sandbox
    scenarios: list


class _Flights:
    """The batch's shares, sent to their children (``Sandbox.prefetch``) in order, at most
    ``CHILDREN_AT_ONCE`` flying at once, and never to a sandbox still flying an earlier share (a
    technique named twice: its second share waits for the first to land)."""

    def __init__(self, shares: list[_Flight], device: str):
        self.device, self.waiting, self.flying = device, list(shares), []
        self.take_off()

    def take_off(self) -> None:
        while self.waiting and (CHILDREN_AT_ONCE is None or len(self.flying) < CHILDREN_AT_ONCE) \
                and not any(f.sandbox is self.waiting[0].sandbox for f in self.flying):
            flight = self.waiting.pop(0)
            flight.sandbox.prefetch(flight.scenarios, self.device)
            self.flying.append(flight)

    def land(self, flight: _Flight) -> None:
        """``flight`` is judged (or stopped): runs it was sent and nobody asked for are dropped."""
        flight.sandbox.drop_ahead()
        self.flying.remove(flight)
        self.take_off()


#: the most scenarios a technique's child is sent in one request
MAX_BATCH = 8
#: a batch is sized to be judged in about this long at the pace seen so far (and within the budget)
BATCH_SECONDS = 1.0


class _Pace:
    """How many scenarios the next batch takes: one at first (a known-bad row is usually caught on its
    first trigger example, and runs sent after a failure are wasted), then as many as are judged in
    about ``BATCH_SECONDS`` at the pace seen so far, never more than what is left of the budget."""

    def __init__(self, deadline: float | None):
        self.deadline, self.scenarios, self.seconds = deadline, 0, 0.0

    def size(self) -> int:
        if not self.scenarios or not self.seconds:
            return 1
        per_scenario = self.seconds / self.scenarios
        fits = BATCH_SECONDS / per_scenario
        if self.deadline is not None:
            fits = min(fits, (self.deadline - time.monotonic()) / per_scenario)
        return max(1, min(MAX_BATCH, int(fits)))

    def note(self, scenarios: int, seconds: float) -> None:
        self.scenarios, self.seconds = self.scenarios + scenarios, self.seconds + seconds


def _judge_batch(members: Sequence[_Member], batch: Sequence[tuple[Scenario, str]], device: str, out: SweepResult,
                 started: float, pace: _Pace) -> list[list[tuple[_Member, Verdict]]]:
    """Judge every active member on each scenario of ``batch`` (with how it was found) that it fits
    (``judge_batch``); per scenario, the members' verdicts. The verdicts, counts and first failures
    are those of judging the scenarios one by one in order: a member is judged on no scenario after
    its first failure."""
    begun = time.monotonic()
    references: dict[int, SharedReference] = {}
    scenarios = [scenario for scenario, _ in batch if _trainable(scenario, device, references, members)]
    found_by = {id(scenario): how for scenario, how in batch}
    queue = [(m, _room(m, [s for s in scenarios if m.fits(s)], found_by)) for m in members if m.active]
    queue = [(m, mine) for m, mine in queue if mine]
    out.references += len({id(s) for _, mine in queue for s in mine})
    judged: dict[int, list[tuple[_Member, Verdict]]] = {id(s): [] for s in scenarios}

    def note(i: int, scenario: Scenario, verdict: Verdict) -> bool:
        m = queue[i][0]
        _record(m, scenario, verdict, found_by[id(scenario)], out, started)
        judged[id(scenario)].append((m, verdict))
        return verdict.ok

    judge_batch([(m.technique, m.sandbox, mine) for m, mine in queue], device, references=references,
                on_verdict=note)
    pace.note(len(scenarios), time.monotonic() - begun)
    return [judged.get(id(s), []) for s, _ in batch]  # no verdict for one left out (``_trainable``)


def _room(m: _Member, mine: list[Scenario], found_by: dict[int, str]) -> list[Scenario]:
    """``mine`` up to the generated examples ``m`` may still judge: its own search's ``max_examples``
    counts the database's replays too, and so does its sweep's (a record said 10 of at most 5)."""
    if m.result.max_examples is None:
        return mine
    room = m.result.max_examples - m.result.examples
    out = []
    for scenario in mine:
        if found_by[id(scenario)] == "search":
            if room <= 0:
                continue
            room -= 1
        out.append(scenario)
    return out


def _trainable(scenario: Scenario, device: str, references: dict[int, SharedReference],
               members: Sequence[_Member]) -> bool:
    """A scenario on a user's model is judged only where the reference can train the model in it
    (as in a search: ``SearchResult.unrunnable``); its reference is then computed here, before the
    technique's children run. A generated scenario always is (its reference is computed beside them)."""
    if not scenario.model:
        return True
    shared = SharedReference(scenario, device)
    try:
        shared.trace
    except ScenarioError as exc:
        if isinstance(exc, ModelFactoryError):
            raise
        for m in members:
            if m.active and m.fits(scenario):
                m.result.leave_out(str(exc))
        return False
    references[id(scenario)] = shared
    return True


def _reached(judged: list[list[tuple[_Member, Verdict]]], active: Sequence[_Member]) -> int:
    """How many scenarios of a batch judged one by one would have been reached: all of them, but
    those after the last first failure when every member ``active`` at its start failed in it."""
    if any(m.active for m in active):
        return len(judged)
    return 1 + max((i for i, verdicts in enumerate(judged) for _, verdict in verdicts if not verdict.ok), default=-1)


def _record(m: _Member, scenario: Scenario, verdict: Verdict, found_by: str, out: SweepResult,
            started: float) -> None:
    """Count one judgement in ``m``'s result (its first failure too)."""
    out.checks += 1
    result = m.result
    for v in verdict.violations:
        result.invariant_counts[v.invariant] = result.invariant_counts.get(v.invariant, 0) + 1
    if found_by == "explicit":
        result.explicit += 1
    elif found_by == "coverage":
        result.coverage_examples += 1
    else:
        result.examples += 1
    phase = {"explicit": "trigger", "coverage": "coverage"}.get(found_by, "generated")  # as a search notes it
    result.note_example(JudgedExample(phase, "held" if verdict.ok else "violated", verdict.divergence))
    if m.coverage is not None:
        m.coverage.note(scenario)
        result.coverage = m.coverage.counts()
    if not verdict.ok:
        result.first_failure_at = result.explicit + result.coverage_examples + result.examples
        result.seconds_to_first_failure = time.monotonic() - started
        result.found_by = found_by
        result.failure = verdict  # the smallest seen so far; a generated one is shrunk below


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
    pace = _Pace(deadline)
    triggers = (moved_examples(model, caps, mode) if model else explicit_examples(caps, mode)) if explicit else ()
    covering = coverage_examples(model, factory_tree(model), caps, mode) \
        if explicit and model and not is_family(model) else ()
    todo = [(s, "explicit") for s in triggers] + [(s, "coverage") for s in covering]
    while todo:
        if not any(m.active for m in members):
            return
        if spent():
            return budget_reached()
        size, active = pace.size(), [m for m in members if m.active]
        batch, todo = todo[:size], todo[size:]
        out.explicit += _reached(_judge_batch(members, batch, device, out, started, pace), active)

    # 2. what each technique's own search would replay first: its failures kept in the example database
    for m in members:
        if m.active and run_settings.database is not None:
            if spent():
                return budget_reached()
            _search(m.technique, m.caps, device, run_settings, m.result,
                    None if deadline is None else max(0.0, deadline - time.monotonic()), False, m.sandbox, model,
                    mode, generate=False)

    # 3. generated scenarios, each judged by every technique it fits. An example draws a batch of them
    # one by one from the scenario strategy (so each one's own choices replay it in a technique's
    # search); it always draws MAX_BATCH (Hypothesis replays the same choices to the same draws), and
    # judges as many of them as the pace and the budget allow.
    strategy = search_strategy(caps, device, model, mode)

    @settings(run_settings, database=None, phases=[p for p in run_settings.phases if p != Phase.shrink])
    @given(st.data())
    def probe(data) -> None:
        drawing = current_build_context().data
        drawn: list[tuple[Scenario, int, int]] = []
        for _ in range(MAX_BATCH):  # first: an example that stops the generation draws what the others do
            first = len(drawing.choices)
            scenario = data.draw(strategy)
            drawn.append((scenario, first, len(drawing.choices)))
        if not any(m.active for m in members):
            raise _AllDecided()
        if spent():
            raise _BudgetSpent()
        if out.scenarios >= run_settings.max_examples:
            raise _ExamplesSpent()
        choices = drawing.choices
        # a repeat is judged once (Hypothesis's first example draws the simplest scenario MAX_BATCH times)
        unique = [d for i, d in enumerate(drawn) if all(d[0] != e[0] for e in drawn[:i])]
        drawn = unique[:min(pace.size(), run_settings.max_examples - out.scenarios)]
        active = [m for m in members if m.active]
        judged = _judge_batch(members, [(scenario, "search") for scenario, _, _ in drawn], device, out, started, pace)
        out.scenarios += _reached(judged, active)
        divergence: dict[str, float] = {}
        for (_, first, end), verdicts in zip(drawn, judged):
            for m, verdict in verdicts:
                for v in verdict.violations:
                    event(v.invariant)
                name = m.technique.name
                divergence[name] = max(divergence.get(name, 0.0), min(verdict.divergence, 1e6))
                if not verdict.ok and TIMEOUT not in verdict.invariants:
                    # the draw that made this scenario, for the technique's own shrinker
                    m.found = Start(verdict, choices_to_bytes(choices[first:end]))
        for name, score in divergence.items():
            target(score, label=f"{name}: divergence from the reference")

    if out.seed is not None:
        probe = hypothesis_seed(out.seed)(probe)
    probe.hypothesis.inner_test._hypothesis_internal_add_digest = (
        f"sweep|{sorted(c.value for c in caps)}|{device}" + (f"|{model}" if model else "")
        + ("" if mode == DEFAULT_MODE else f"|{mode}")).encode()
    if not any(m.active for m in members) or out.scenarios >= run_settings.max_examples:
        return
    if spent():
        return budget_reached()
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


__all__ = ["sweep", "SweepResult", "judge_shared", "judge_batch", "intent_capabilities"]
