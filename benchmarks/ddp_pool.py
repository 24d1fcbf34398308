"""The ddp mode's pool: a ddp check against an eager one, with the pool and without it.

    python -m benchmarks.ddp_pool [--size 10] [--rounds 3] [--technique freeze_and_eval] [--corpus drawn]

A fixed corpus of ``--size`` ddp scenarios of the technique's capabilities (``drawn``: by the
strategies for the ddp mode, so the batch splits and no BatchNorm trains; ``triggers``: the catalog's
trigger examples a ddp search judges first, small models where the fixed cost shows most) is
checked three ways, each in its own ``Sandbox`` as a search keeps one (one child for all its
examples):

* ``eager``: the same scenarios with the mode set to eager (same model, batch and recipe);
* ``ddp``: the ddp mode with its pool (rank 1 and the gloo group kept across runs);
* ``ddp-no-pool``: the ddp mode with ``ISOLATION_DDP_POOL=off``: a fresh rank 1, process group and
  sandbox child for every run, as before the pool.

Side by side: every round checks each scenario in the three ways in a rotating order, before the
next scenario, so machine noise falls on all three alike; every check pays for its reference (the
cache is cleared), as a search's examples do. One untimed check per way first (imports, the first
fork). Reported per way: the median and the worst check, and the ratios to eager (median to median,
total to total); the verdicts of the two ddp ways must be the same. One torch thread, as one worker.
Target: a pooled ddp check costs at most 4 eager ones.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings

import strategies
from isolation_suite import catalog, check
from isolation_suite.execution import ddp
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.judging.judge import clear_reference_cache
from isolation_suite.spec.scenario import Mode, Scenario
from isolation_suite.techniques import explicit_examples

from ._common import env_restored, table, write

TARGET = 4.0
WAYS = ("eager", "ddp", "ddp-no-pool")


def ddp_corpus(technique, size: int, corpus_seed: int = 1234) -> list[Scenario]:
    """``size`` ddp scenarios of the technique's capabilities, drawn once from a fixed seed."""
    drawn: list[Scenario] = []

    @seed(corpus_seed)
    @settings(max_examples=size, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategies.scenarios(capabilities=sorted(technique.capabilities, key=lambda c: c.value), modes=("ddp",)))
    def collect(scenario):
        drawn.append(scenario)

    collect()
    return drawn[:size]


def pool_off():
    """``ISOLATION_DDP_POOL=off`` while a check runs: its sandbox forks its child (every run, as the
    child is retired after each) with it."""
    return env_restored(ddp.POOL_ENV, "off")


def main(size: int = 10, rounds: int = 3, technique_name: str = "freeze_and_eval", source: str = "drawn") -> dict:
    torch.set_num_threads(1)
    technique = catalog()[technique_name]
    if source == "triggers":
        triggers = explicit_examples(technique.capabilities, "ddp")
        warm, scenarios = triggers[0], list(triggers[:size])
    else:
        drawn = ddp_corpus(technique, size + 1)
        warm, scenarios = drawn[0], drawn[1:]
    as_eager = lambda s: dataclasses.replace(s, mode=Mode())  # noqa: E731
    sandboxes = {way: Sandbox(technique) for way in WAYS}
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    verdicts: dict[str, list] = {way: [] for way in WAYS}
    children: dict[str, set] = {way: set() for way in WAYS}

    def one(way: str, scenario: Scenario, record: bool = True):
        clear_reference_cache()  # every check pays for its reference, as a search's examples do
        sandbox = sandboxes[way]
        with pool_off() if way == "ddp-no-pool" else contextlib.nullcontext():
            started = time.perf_counter()
            verdict = check(technique, as_eager(scenario) if way == "eager" else scenario, sandbox=sandbox)
            spent = time.perf_counter() - started
        children[way].add(sandbox.pid)
        if record:
            seconds[way].append(spent)
            verdicts[way].append((scenario, verdict.invariants))

    try:
        for way in WAYS:  # untimed: imports, the first fork of each sandbox's child and rank 1
            one(way, warm, record=False)
        for round_ in range(rounds):
            for i, scenario in enumerate(scenarios):
                shift = (round_ + i) % len(WAYS)
                for way in WAYS[shift:] + WAYS[:shift]:
                    one(way, scenario)
    finally:
        for sandbox in sandboxes.values():
            sandbox.close()

    eager_median, eager_total = statistics.median(seconds["eager"]), sum(seconds["eager"])
    rows, data = [], {"technique": technique_name, "corpus": source, "size": len(scenarios), "rounds": rounds,
                      "target": TARGET, "cpus": os.cpu_count()}
    for way in WAYS:
        values = seconds[way]
        data[way] = {"checks": len(values), "median_s": statistics.median(values), "worst_s": max(values),
                     "total_s": sum(values), "median_vs_eager": statistics.median(values) / eager_median,
                     "total_vs_eager": sum(values) / eager_total, "sandbox_children": len(children[way] - {None}),
                     "violations": sum(1 for _, v in verdicts[way] if v)}
        rows.append([way, len(values), f"{1000 * statistics.median(values):.1f}", f"{1000 * max(values):.1f}",
                     f"{statistics.median(values) / eager_median:.2f}x", f"{sum(values) / eager_total:.2f}x",
                     data[way]["violations"]])
    same = [a == b for a, b in zip(verdicts["ddp"], verdicts["ddp-no-pool"])]
    data["ddp_verdicts_equal_without_pool"] = all(same)
    capabilities = ", ".join(sorted(c.value for c in technique.capabilities))
    print(f"{technique_name} on {len(scenarios)} {source} ddp scenarios of {capabilities}, {rounds} rounds, "
          f"{os.cpu_count()} CPUs")
    print(table(rows, ["way", "checks", "median ms/check", "worst ms/check", "median vs eager", "total vs eager",
                       "violations"]))
    print(f"pooled ddp median: {data['ddp']['median_vs_eager']:.2f}x eager (target <= {TARGET:g}x); without the "
          f"pool: {data['ddp-no-pool']['median_vs_eager']:.2f}x; verdicts with and without the pool "
          f"{'the same' if all(same) else 'DIFFER'}")
    print(f"-> {write(f'ddp_pool_{source}', data)}")
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--technique", default="freeze_and_eval")
    parser.add_argument("--corpus", choices=("drawn", "triggers"), default="drawn")
    args = parser.parse_args()
    main(args.size, args.rounds, args.technique, args.corpus)
