"""``check`` (one scenario) and ``check_technique`` (a Hypothesis search)."""
from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterable

from hypothesis import HealthCheck, Phase, event, given, settings, target
from hypothesis import seed as hypothesis_seed

from . import devices as devices_mod
from .invariants import (INVARIANTS, MATCHES_REFERENCE, Context, Violation, confirmed_matches_reference,
                         divergence, evaluate)
from .reference import Reference
from .runner import TechniqueDriver, Trace, run
from .scenario import Scenario
from .technique import Capability, Technique


@dataclass(frozen=True)
class Verdict:
    """The result of checking one technique on one scenario on one device."""

    technique: str
    scenario: Scenario
    device: str
    violations: tuple[Violation, ...] = ()
    divergence: float = 0.0  # distance from the reference in tolerance units (steers the search)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def first(self) -> Violation | None:
        return self.violations[0] if self.violations else None

    @property
    def invariants(self) -> tuple[str, ...]:
        return tuple(v.invariant for v in self.violations)

    def __str__(self) -> str:
        if self.ok:
            return f"{self.technique} on {self.device}: ok"
        return f"{self.technique} on {self.device}:\n" + "\n".join(f"  {v}" for v in self.violations)


_REFERENCE_CACHE: "collections.OrderedDict[tuple[Scenario, str], Trace]" = collections.OrderedDict()
_REFERENCE_CACHE_SIZE = 64


def reference_trace(scenario: Scenario, device: str = "cpu") -> Trace:
    """The reference's trace, cached: several techniques are often checked against one scenario."""
    key = (scenario, device)
    if key in _REFERENCE_CACHE:
        _REFERENCE_CACHE.move_to_end(key)
        return _REFERENCE_CACHE[key]
    trace = run(scenario, Reference(), device)
    _REFERENCE_CACHE[key] = trace
    if len(_REFERENCE_CACHE) > _REFERENCE_CACHE_SIZE:
        _REFERENCE_CACHE.popitem(last=False)
    return trace


def as_technique(technique: Technique | type[Technique]) -> Technique:
    if isinstance(technique, type) and issubclass(technique, Technique):
        return technique()
    if isinstance(technique, Technique):
        return technique
    raise TypeError(f"expected an isolation_suite.Technique instance or subclass, got {technique!r}")


def check(technique: Technique | type[Technique], scenario: Scenario, device: str = "cpu") -> Verdict:
    """Run ``technique`` and the reference on ``scenario`` and judge every invariant.

    On a CUDA device the technique also runs on the CPU, for ``device-parity``.
    """
    technique = as_technique(technique)
    device = devices_mod.normalize(device)
    if device.startswith("cuda"):
        devices_mod.deterministic_cuda()
    reference = reference_trace(scenario, device)
    trace = run(scenario, TechniqueDriver(technique), device)
    other = run(scenario, TechniqueDriver(technique), "cpu") if device.startswith("cuda") else None
    ctx = Context(scenario, trace, reference, other)
    violations = [_confirmed(v, ctx, technique, device) for v in evaluate(ctx)]
    return Verdict(technique.name, scenario, device, tuple(v for v in violations if v is not None),
                   divergence(ctx))


def _confirmed(violation: Violation, ctx: Context, technique: Technique, device: str) -> Violation | None:
    """A float32 ``matches-reference`` mismatch, judged again beside the scenario's float64 twin.

    Two mathematically equal computations can round differently (another kernel path), and
    adaptive optimizers amplify rounding noise on near-zero gradients (``g / (sqrt(v) + eps)``)
    up to ``lr``-sized steps. The twin has the same weights, data and dropout masks, upcast: a
    semantic difference shows there at the same step and place, rounding noise does not
    (``invariants.confirmed_matches_reference``). None when nothing is left of the mismatch.
    """
    scenario = ctx.scenario
    if violation.invariant != MATCHES_REFERENCE or scenario.dtype != "float32":
        return violation
    twin = dataclasses.replace(scenario, dtype="float64")
    twin_ctx = Context(twin, run(twin, TechniqueDriver(technique), device), reference_trace(twin, device))
    if twin_ctx.technique.crash is not None:
        return violation
    return confirmed_matches_reference(ctx, twin_ctx)


# --- the search ---------------------------------------------------------------------------

class BudgetSpent(BaseException):
    """Stops a search when its time budget is spent (a BaseException, so Hypothesis lets it through)."""


class IsolationFailure(AssertionError):
    """Raised inside the search so Hypothesis shrinks it; carries the verdict."""

    def __init__(self, verdict: Verdict):
        super().__init__(str(verdict.first))
        self.verdict = verdict


@dataclass
class SearchResult:
    technique: str
    capabilities: frozenset[Capability]
    device: str
    examples: int = 0
    failure: Verdict | None = None
    first_failure_at: int | None = None  # examples run when the first violation was seen
    invariant_counts: dict[str, int] = field(default_factory=dict)
    budget_reached: bool = False
    seconds_to_first_failure: float | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def search_settings(max_examples: int | None = None, device: str = "cpu") -> settings:
    """The active isolation profile (``ISOLATION_PROFILE`` or the loaded one), with overrides."""
    from .profiles import active_profile
    base = settings.get_profile(active_profile())
    kwargs: dict = dict(parent=base, report_multiple_bugs=False,
                        suppress_health_check=list(base.suppress_health_check) + [HealthCheck.too_slow,
                                                                                   HealthCheck.data_too_large])
    if max_examples is not None:
        kwargs["max_examples"] = max_examples
    if device.startswith("cuda"):
        kwargs["deadline"] = None
    return settings(**kwargs)


def search(technique: Technique | type[Technique], capabilities: Iterable[Capability] | None = None,
           device: str = "cpu", max_examples: int | None = None, budget: float | None = None, *,
           seed: int | None = None, shrink: bool = True) -> SearchResult:
    """Hypothesis search for a scenario that breaks ``technique``; the failure returned is shrunk.

    With ``budget`` (seconds) the search stops generating when the time is spent; a failure
    already found may shrink for as long again, then the smallest one seen is returned.
    """
    import strategies  # the top-level strategies package

    technique = as_technique(technique)
    caps = frozenset(capabilities) if capabilities is not None else technique.capabilities
    if not caps:
        raise ValueError(f"technique {technique.name!r} declares no capabilities: nothing to check")
    device = devices_mod.normalize(device)
    result = SearchResult(technique.name, caps, device)
    started = time.monotonic()
    smallest: list[Verdict] = []

    run_settings = search_settings(max_examples, device)
    if not shrink:  # detection only: stop at the first violation
        run_settings = settings(run_settings, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])

    @run_settings
    @given(strategies.scenarios(capabilities=caps, devices=(device.split(":")[0],)))
    def probe(scenario: Scenario) -> None:
        if budget is not None:
            spent = time.monotonic() - started
            if spent > (2 * budget if smallest else budget):
                raise BudgetSpent()
        result.examples += 1
        verdict = check(technique, scenario, device)
        for v in verdict.violations:
            event(v.invariant)
            result.invariant_counts[v.invariant] = result.invariant_counts.get(v.invariant, 0) + 1
        # steer toward failures: runs that drift further from the reference are more interesting
        target(min(verdict.divergence, 1e6), label="divergence from the reference")
        target(float(len(verdict.violations)), label="violations")
        if not verdict.ok:
            if result.first_failure_at is None:
                result.first_failure_at = result.examples
                result.seconds_to_first_failure = time.monotonic() - started
            smallest[:] = [verdict]  # the shrinker only tries smaller examples
            raise IsolationFailure(verdict)

    if seed is not None:
        probe = hypothesis_seed(seed)(probe)
    # separate database entries per technique, capability set and device
    probe.hypothesis.inner_test._hypothesis_internal_add_digest = (
        f"{technique.name}|{sorted(c.value for c in caps)}|{device}".encode())
    try:
        probe()
    except IsolationFailure as failure:
        result.failure = failure.verdict
    except BudgetSpent:
        result.budget_reached = True
        result.failure = smallest[0] if smallest else None
    return result


def failure_message(verdict: Verdict, capabilities: Iterable[Capability] = ()) -> str:
    caps = ", ".join(sorted(c.value for c in capabilities))
    lines = [f"{verdict.technique} violates {verdict.first.invariant} on {verdict.device}"
             + (f" (capabilities: {caps})" if caps else ""),
             *(f"  {v}" for v in verdict.violations),
             "minimal scenario:",
             *("  " + line for line in repr(verdict.scenario).splitlines()),
             "replay:",
             f"  iso.check(technique, iso.Scenario.from_json({verdict.scenario.to_json()!r}), "
             f"device={verdict.device!r})",
             "  or save the JSON to a file and run: isolation-suite repro FILE --technique SPEC"]
    return "\n".join(lines)


def check_technique(technique: Technique | type[Technique], devices: str | Iterable[str] | None = None,
                    max_examples: int | None = None) -> list[SearchResult]:
    """Search every declared capability on every device; raise ``AssertionError`` on the first violation.

    The message names the invariant, shows the minimal scenario and says how to replay it.
    """
    technique = as_technique(technique)
    results = []
    for device in devices_mod.resolve(devices):
        for capability in sorted(technique.capabilities, key=lambda c: c.value):
            result = search(technique, {capability}, device, max_examples)
            results.append(result)
            if result.failure is not None:
                raise AssertionError(failure_message(result.failure, {capability}))
    return results


__all__ = ["Verdict", "check", "check_technique", "search", "SearchResult", "IsolationFailure", "INVARIANTS",
           "reference_trace"]
