"""Harness time over bare-torch time for the same training loops, side by side in one run.

The bare version trains the same built model twice (the technique's run and the
reference's run) with a plain loop: no routing hooks' bookkeeping, no recording,
no invariants. The physical floor is 1.0.

    python -m benchmarks.overhead
"""
from __future__ import annotations

import torch

from isolation_suite import catalog, check
from isolation_suite.build import build_model, loss_fn, make_inputs
from isolation_suite.check import _REFERENCE_CACHE
from isolation_suite.runner import clip_gradients, make_scheduler, optimizer_builder

from ._common import corpus, median, table, timed, write

TECHNIQUES = ("freeze_and_eval", "functional_detach", "parametrize_where", "weight_dropout")


def bare_loop(scenario) -> None:
    """The training loop a user would write, on the same model, inputs and recipe."""
    model = build_model(scenario)
    optimizer = optimizer_builder(scenario.optimizer)(model.parameters())
    scheduler = make_scheduler(scenario.optimizer, optimizer, scenario.steps)
    for step, batches in enumerate(make_inputs(scenario), start=1):
        model.train()
        optimizer.zero_grad(set_to_none=scenario.optimizer.set_to_none)
        for micro, x in enumerate(batches):
            if scenario.data.input_requires_grad:
                x.requires_grad_(True)
            loss = loss_fn(scenario.data.loss, model(x), step * 10 + micro) / scenario.micro_batches
            loss.backward()
        clip_gradients(scenario.optimizer, list(model.parameters()))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def main() -> dict:
    torch.set_num_threads(1)
    rows, data = [], {}
    for name in TECHNIQUES:
        technique = catalog()[name]
        (capability,) = technique.capabilities
        scenarios = corpus(capability, 40)
        ratios = []
        for s in scenarios:
            _REFERENCE_CACHE.clear()
            _, harness = timed(check, technique, s)
            _, bare = timed(lambda: (bare_loop(s), bare_loop(s)))
            ratios.append(harness / bare)
        data[name] = {"median_overhead": median(ratios), "scenarios": len(scenarios)}
        rows.append([name, len(scenarios), f"{median(ratios):.2f}"])
    worst = max(v["median_overhead"] for v in data.values())
    data["_summary"] = {"worst_median_overhead": worst, "target": 1.3}
    print(table(rows, ["technique", "scenarios", "median overhead (harness / bare)"]))
    print(f"\nworst median overhead {worst:.2f} (target <= 1.3) -> {write('overhead', data)}")
    return data


if __name__ == "__main__":
    main()
