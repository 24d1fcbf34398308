"""A fixed, seeded corpus of scenarios and small helpers shared by the benchmarks."""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
import warnings
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

import strategies
from isolation_suite.model.factory import build
from isolation_suite.execution.reference import Reference
from isolation_suite.execution.runner import Driver, TechniqueDriver, clip_gradients, make_scheduler, optimizer_builder
from isolation_suite.spec.scenario import Scenario
from isolation_suite.technique import Capability
from isolation_suite.model.tree import Router, roles

OUT = Path(os.environ.get("ISOLATION_BENCH_DIR", "reports/bench"))
warnings.simplefilter("ignore")


def corpus(capability: Capability | None = None, size: int = 60, corpus_seed: int = 1234) -> list[Scenario]:
    """``size`` scenarios drawn once from a fixed Hypothesis seed: the same list on every run."""
    drawn: list[Scenario] = []

    @seed(corpus_seed)
    @settings(max_examples=size, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategies.scenarios(capabilities=None if capability is None else [capability]))
    def collect(scenario):
        drawn.append(scenario)

    collect()
    return drawn[:size]


def bare_loop(scenario, driver: Driver) -> None:
    """The training loop a user would write around ``driver``'s code, on the same model, inputs and recipe
    (the driver's ``call`` reached through the harness's own interception, the cheapest way to reach it)."""
    recipe = scenario.optimizer
    built = build(scenario)
    model = built.model
    router = Router(model, roles(built.tree, scenario.intent), driver.call, driver.keywords)
    driver.setup(model, scenario.intent)
    optimizer = driver.make_optimizer(model, scenario.intent, optimizer_builder(recipe))
    scheduler = make_scheduler(recipe, optimizer, scenario.steps)
    for step, batches in enumerate(built.inputs, start=1):
        model.train()
        optimizer.zero_grad(set_to_none=recipe.set_to_none)
        for micro, inputs in enumerate(batches):
            if scenario.data.input_requires_grad:
                inputs = tuple(x.requires_grad_(True) if x.is_floating_point() else x for x in inputs)
            with router.forward():
                out = model(*inputs)
            loss = built.loss(out, step * 10 + micro) / scenario.micro_batches
            if loss.requires_grad:
                loss.backward()
        clip_gradients(recipe, list(model.parameters()))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        driver.after_step(model, optimizer)
    router.close()


def bare_pair(technique, scenario) -> None:
    """The two loops a check runs, in bare torch: the technique's, then the reference's."""
    try:
        bare_loop(scenario, TechniqueDriver(technique))
    except Exception:  # noqa: BLE001 - a known-bad technique may crash; the run stops there too
        pass
    bare_loop(scenario, Reference())


@contextlib.contextmanager
def env_restored(name: str, value: str | None = None):
    """The environment variable ``name`` set to ``value`` (when given) for the block, and as it was
    before after it, whatever the block set it to."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def median(values):
    return statistics.median(values) if values else float("nan")


def write(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return path


def table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
