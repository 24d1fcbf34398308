"""Detection power: per known-bad row, over many seeds, the share caught within the default budget
and the worst case, for the default search (trigger examples first) and for the random search alone.

    python -m benchmarks.detection [--seeds 50] [--budget 10.7] [--mode fsdp]
    python -m benchmarks.detection --models all [--techniques tests.test_coverage:EvalHookOnFrozenModule]

With ``--models`` the rows are judged on shipped real models (``isolation_suite.zoo``) instead: on
each, every known-bad row whose trigger the model has (a moved trigger example satisfies the row's
condition), and every technique ``--techniques`` names (a violation of any invariant counts as a
catch where it declares none).

The default budget is what one eager item gets in the main job (``isolation-suite fuzz`` on 2
workers, 120 s, the whole catalog in every mode, items weighted by their mode's cost); the examples
are the ``isolation-dev`` profile's. Detection only: a
search stops at its first violation (no shrinking), so the seconds are time to detection. With
``--mode`` the rows known-bad in that execution mode are searched in it, each with the budget times
the mode's weight (``ModeInfo.budget_weight``), as the main job gives its items.
"""
from __future__ import annotations

import argparse
import os

import torch

from isolation_suite import profiles
from isolation_suite.engine.check import search
from isolation_suite.engine.plan import item_share
from isolation_suite.engine.loading import load_technique
from isolation_suite.techniques import CATALOG, model_examples
from isolation_suite.zoo import ZOO

from ._common import median, table, write

def _main_job_eager_budget() -> float:
    """An eager item's seconds in the main job's default run: 120 s on 2 workers over every row's
    capabilities in every mode this machine runs, each item weighted by its mode's budget weight."""
    from isolation_suite.execution.modes import MODE_BY_KIND, parse_modes
    weights = [MODE_BY_KIND[m].budget_weight for row in CATALOG for _ in row.technique.capabilities
               for m in parse_modes(None, ("cpu",))]
    return item_share(120.0, 2, len(weights), sum(weights))


#: one eager item's seconds in the main job's default run
DEFAULT_ITEM_BUDGET = _main_job_eager_budget()


def detect(technique, seeds: int, budget: float, explicit: bool, model: str | None = None,
           mode: str = "eager") -> dict:
    """Caught count, worst and median examples and seconds to the first violation over ``seeds`` seeds."""
    examples, seconds, missed = [], [], []
    expected = technique.expected_in(mode)
    for seed in range(seeds):
        result = search(technique, budget=budget, seed=seed, shrink=False, explicit=explicit, model=model,
                        mode=mode)
        if result.failure is None:
            missed.append(seed)
            continue
        first = result.failure.first.invariant
        if expected and first not in expected:
            missed.append(seed)  # an unexpected invariant is not a catch
            continue
        examples.append(result.first_failure_at)
        seconds.append(result.seconds_to_first_failure)
    return {"caught": seeds - len(missed), "seeds": seeds, "missed_seeds": missed,
            "median_examples": median(examples), "worst_examples": max(examples, default=None),
            "median_seconds": median(seconds), "worst_seconds": max(seconds, default=None)}


def present_rows(spec: str) -> list:
    """The known-bad rows whose trigger the model ``spec`` has (as ``tests/test_models.py`` decides)."""
    out = []
    for entry in CATALOG:
        technique = entry.technique()
        if technique.expected_violations and any(
                c.holds(s) for s in model_examples(spec, technique.capabilities) for c in entry.conditions):
            out.append(technique)
    return out


def on_models(models: list[str], extra: list, seeds: int, budget: float) -> dict:
    """Detection on real models: per model, each present known-bad row and each ``extra`` technique."""
    rows, data = [], {}
    for name in models:
        spec = f"isolation_suite.zoo:{name}"
        for technique in present_rows(spec) + extra:
            found = detect(technique, seeds, budget, explicit=True, model=spec)
            data[f"{name}/{technique.name}"] = found
            rows.append([name, technique.name, f"{found['caught']}/{seeds}", found["median_examples"],
                         found["worst_examples"],
                         f"{found['worst_seconds']:.2f}" if found["worst_seconds"] is not None else "-"])
    print(table(rows, ["model", "known-bad technique", "caught", "median examples", "worst examples", "worst s"]))
    worst = min((v["caught"] for v in data.values()), default=seeds) / seeds
    data["_summary"] = {"seeds": seeds, "budget_s": budget, "worst_share_caught": worst}
    print(f"\n{seeds} seeds, {budget:.1f} s each; worst share caught {worst:.0%} (target 100%) -> "
          f"{write('detection_models', data)}")
    return data


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--budget", type=float, default=DEFAULT_ITEM_BUDGET)
    parser.add_argument("--models", default="", help="zoo models, comma-separated, or 'all'")
    parser.add_argument("--techniques", default="", help="further known-bad techniques (pkg.mod:attr), with --models")
    parser.add_argument("--mode", default="eager", help="the execution mode the rows are searched in")
    parser.add_argument("--default-only", action="store_true", help="the default search only, not the random one")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # detection power from scratch: failures an example database kept would be replayed first
    os.environ["ISOLATION_DATABASE"] = "none"
    profiles.register_profiles()
    if args.models:
        models = list(ZOO) if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
        extra = [load_technique(spec.strip()) for spec in args.techniques.split(",") if spec.strip()]
        return on_models(models, extra, args.seeds, args.budget)
    from isolation_suite.execution.modes import MODE_BY_KIND
    budget = args.budget * MODE_BY_KIND[args.mode].budget_weight
    rows, data = [], {}
    for entry in CATALOG:
        technique = entry.technique()
        if not technique.expected_in(args.mode):
            continue
        default = detect(technique, args.seeds, budget, explicit=True, mode=args.mode)
        random_only = None if args.default_only else detect(technique, args.seeds, budget, explicit=False,
                                                            mode=args.mode)
        data[entry.name] = {"default": default, "random_only": random_only}
        rows.append([entry.name, f"{default['caught']}/{args.seeds}", default["worst_examples"],
                     f"{default['worst_seconds']:.2f}" if default["worst_seconds"] is not None else "-",
                     *(["-"] * 4 if args.default_only else
                       [f"{random_only['caught']}/{args.seeds}", random_only["median_examples"],
                        random_only["worst_examples"],
                        f"{random_only['worst_seconds']:.2f}" if random_only["worst_seconds"] is not None else "-"])])
    worst_share = min(v["default"]["caught"] for v in data.values()) / args.seeds
    data["_summary"] = {"seeds": args.seeds, "budget_s": budget, "mode": args.mode,
                        "target": f"{args.seeds}/{args.seeds}",
                        "worst_share_caught_default": worst_share,
                        "worst_share_caught_random_only": None if args.default_only else min(
                            v["random_only"]["caught"] for v in data.values()) / args.seeds}
    print(table(rows, ["known-bad technique", "caught (default)", "worst examples", "worst s",
                       "caught (random only)", "median examples", "worst examples", "worst s"]))
    name = "detection" if args.mode == "eager" else f"detection_{args.mode}"
    print(f"\n{args.seeds} seeds, {budget:.1f} s each, {args.mode}; worst share caught by the default search "
          f"{worst_share:.0%} (target 100%) -> {write(name, data)}")
    return data


if __name__ == "__main__":
    main()
