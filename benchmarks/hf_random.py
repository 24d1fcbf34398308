"""Every catalog row on random ``transformers`` configurations (``--model hf:random``).

    python -m benchmarks.hf_random [--examples N] [--mode eager] [--rows r1,r2] [--seed S] [--verbose]

For every capability, ``N`` scenarios are drawn once from the search's own strategy
(``strategies.scenarios(model="hf:random")``, a fixed Hypothesis seed): each a tiny random BERT,
GPT-2 or LLaMA configuration, an intent over its tree, an optimizer recipe and a loop. Every row of
the capability is judged on every scenario its capabilities fit (one reference per scenario, each
row in a sandbox of its own, as the sweep does), with no trigger examples: this is the random
search alone. Printed per row: how many scenarios it was judged on, how many it held, the
invariants it was caught with, and, for a known-bad row, on how many scenarios one of its catalog
conditions held (its trigger exists there) and how many of those caught it.

``WRONG`` marks a sound row that failed, and a known-bad row caught with an invariant it does not
declare in the mode, or without any of its conditions holding on the scenario (an unexplained
failure); ``MISSED`` counts the scenarios where a trigger exists and the row held. The first
scenario of each WRONG and MISSED is printed (``--verbose``: every one), with its configuration in
``Scenario.model``. One torch thread, as one worker; it runs on the CPU.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import time
import warnings

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings

from isolation_suite.engine.sweep import covers, judge_shared, scenario_capabilities
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.spec.hf import RANDOM
from isolation_suite.strategies import scenarios
from isolation_suite.strategies.hf import family_fits
from isolation_suite.techniques import CATALOG, entry, model_examples

from ._common import table, write


def drawn(capability, count: int, mode: str, corpus_seed: int) -> list:
    """``count`` scenarios over random configurations, drawn once from a fixed seed."""
    out: list = []

    @seed(corpus_seed)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(scenarios(capabilities=[capability], model=RANDOM, modes=(mode,)))
    def collect(scenario):
        out.append(scenario)

    collect()
    return out[:count]


def triggered(row, scenario, mode: str) -> bool:
    """One of the row's conditions for this mode holds on ``scenario`` (a condition is what a failure
    needs, not what makes one certain: it may hold on a scenario the row survives)."""
    return any(c.in_mode(mode) and c.holds(scenario) for c in row.conditions)


class Judges:
    """Each row with its technique and a sandbox of its own for the whole run, as the sweep keeps them."""

    def __init__(self, rows: list, stack: contextlib.ExitStack):
        self.rows = rows
        self.techniques = [row.technique() for row in rows]
        self.sandboxes = [stack.enter_context(Sandbox(t)) for t in self.techniques]

    def verdicts(self, scenario) -> list:
        """``(row, technique, verdict)`` for every row the scenario fits, against one reference."""
        needed = scenario_capabilities(scenario)
        fitting = [(r, t, s) for r, t, s in zip(self.rows, self.techniques, self.sandboxes)
                   if covers(t.capabilities, needed)]
        if not fitting:
            return []
        verdicts, _ = judge_shared([(t, s) for _, t, s in fitting], scenario)
        return [(r, t, v) for (r, t, _), v in zip(fitting, verdicts)]


def explained(row, technique, verdict, mode: str) -> bool:
    """A failure the catalog declares: an invariant the row is known for in this mode, one of whose
    conditions holds on the scenario."""
    first = verdict.first.invariant
    return first in technique.expected_in(mode) and row.explains(first, verdict.scenario)


def judge_corpus(judges: Judges, corpus: list, mode: str, stats: dict, notes: dict) -> None:
    """The random search alone: every row on every drawn scenario it fits."""
    for scenario in corpus:
        for row, technique, verdict in judges.verdicts(scenario):
            count = stats[row.name]
            count["judged"] += 1
            if verdict.ok:
                count["held"] += 1
                count["held_with_condition"] += not technique.sound and triggered(row, scenario, mode)
                continue
            count[f"caught:{verdict.first.invariant}"] += 1
            if not explained(row, technique, verdict, mode):
                count["wrong"] += 1
                notes[row.name].append(("WRONG", verdict))


def judge_triggers(judges: Judges, configs: list, capability, mode: str, stats: dict, notes: dict) -> None:
    """Per configuration drawn, the catalog's trigger examples moved onto it (``model_examples``, as a
    search over one model judges them first): a known-bad row whose condition holds on one of them
    (its trigger exists in that configuration) must be caught on one; a sound row must hold on all."""
    for config in configs:
        present: dict[str, bool] = {}
        caught: dict[str, bool] = {}
        for scenario in model_examples(config, {capability}, mode):
            for row, technique, verdict in judges.verdicts(scenario):
                if not technique.sound and triggered(row, scenario, mode):
                    present[row.name] = True
                if verdict.ok:
                    continue
                if explained(row, technique, verdict, mode):
                    caught[row.name] = True
                else:
                    stats[row.name]["wrong"] += 1
                    notes[row.name].append(("WRONG", verdict))
        for name in present:
            stats[name]["trigger_configs"] += 1
            stats[name]["caught_configs"] += caught.get(name, False)
            if not caught.get(name):
                notes[name].append(("MISSED", config))


def _show(kind: str, name: str, what) -> str:
    if kind == "MISSED":
        return f"  MISSED {name}: held on every trigger example moved onto {what}"
    return f"  WRONG {name}: {what.first}\n    model={what.scenario.model}\n    {what.scenario.to_json()}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="scenarios per capability (default 500)")
    parser.add_argument("--mode", default="eager", help="the execution mode every scenario runs in (default eager)")
    parser.add_argument("--rows", help="comma-separated catalog rows (default: all)")
    parser.add_argument("--seed", type=int, default=1234, help="the corpus's Hypothesis seed")
    parser.add_argument("--verbose", action="store_true", help="print every WRONG and MISSED scenario")
    args = parser.parse_args(argv)
    names = [e.name for e in CATALOG] if not args.rows else [n.strip() for n in args.rows.split(",")]
    rows = [entry(n) for n in names]
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    by_capability: dict = {}
    for row in rows:
        for capability in row.technique.capabilities:
            by_capability.setdefault(capability, []).append(row)
    data: dict = {"examples": args.examples, "mode": args.mode, "seed": args.seed, "capabilities": {}, "rows": {}}
    for capability, members in sorted(by_capability.items(), key=lambda kv: kv[0].value):
        if not family_fits({capability}):
            print(f"== {capability.value}: no configuration has a place for it "
                  f"({', '.join(r.name for r in members)}: n/a)\n")
            continue
        started = time.monotonic()
        corpus = drawn(capability, args.examples, args.mode, args.seed)
        drawn_s = time.monotonic() - started
        configs = sorted({s.model for s in corpus})
        classes = collections.Counter(s.model.split("?")[0][len("hf:"):] for s in corpus)
        stats = {row.name: collections.Counter() for row in members}
        notes: dict[str, list] = {row.name: [] for row in members}
        with contextlib.ExitStack() as stack:
            judges = Judges(members, stack)
            judge_corpus(judges, corpus, args.mode, stats, notes)
            corpus_s = time.monotonic() - started - drawn_s
            judge_triggers(judges, configs, capability, args.mode, stats, notes)
        seconds = time.monotonic() - started
        data["capabilities"][capability.value] = {"scenarios": len(corpus), "configs": len(configs),
                                                  "classes": dict(classes), "draw_s": drawn_s,
                                                  "corpus_s": corpus_s, "seconds": seconds}
        print(f"== {capability.value}: {len(corpus)} scenarios over {len(configs)} configurations "
              f"({', '.join(f'{k} {v}' for k, v in sorted(classes.items()))}); drawn in {drawn_s:.0f}s, "
              f"judged in {corpus_s:.0f}s, moved triggers in {seconds - drawn_s - corpus_s:.0f}s")
        table_rows = []
        for row in members:
            technique, c = row.technique(), stats[row.name]
            caught = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(c.items()) if k.startswith("caught:"))
            triggers = "" if technique.sound else f"{c['caught_configs']}/{c['trigger_configs']}"
            table_rows.append([row.name, ",".join(sorted(technique.expected_in(args.mode))) or "(sound)",
                               c["judged"], c["held"], caught, "" if technique.sound else c["held_with_condition"],
                               triggers, c["wrong"] or ""])
            data["rows"].setdefault(row.name, {})[capability.value] = {
                "counts": dict(c), "notes": [(kind, str(x.first), x.scenario.to_json()) if kind == "WRONG"
                                             else (kind, x) for kind, x in notes[row.name]]}
        print(table(table_rows, ["row", "expected", "judged", "held", "caught with", "held, a condition holding",
                                 "configs caught / with its trigger", "WRONG"]))
        for row in members:
            shown = notes[row.name] if args.verbose else list({k: (k, x) for k, x in notes[row.name]}.values())
            for kind, x in shown:
                print(_show(kind, row.name, x))
        print()
    wrong = sum(c["counts"].get("wrong", 0) for r in data["rows"].values() for c in r.values())
    missed = sum(kind == "MISSED" for r in data["rows"].values() for c in r.values() for kind, *_ in c["notes"])
    print(f"{wrong} WRONG, {missed} MISSED")
    print(f"-> {write('hf_random', data)}")
    return data


if __name__ == "__main__":
    main()
