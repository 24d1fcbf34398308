"""Checks per second and memory per check on each shipped real model (``isolation_suite.zoo``).

    python -m benchmarks.models

For every model: a fixed set of scenarios drawn over its tree (FREEZE_MODULE and FREEZE_ELEMENTS
intents, the default recipes), each judged with a sound technique in-process (so one process
holds everything a check allocates). Reported per model: checks/s (median and the slowest check),
the bare-torch floor (the two training loops alone), and memory: the resident set after every
check, its growth from the 10th check to the last (a leak shows there), and the live ``nn.Module``
objects after each check, from the first quarter on (they must stay at one count: nothing a check
built survives it). The "bound" column is the parameter state of the three models a check holds
(the technique's, the reference's and the float64 twin's: weights, gradients and Adam's two
moments); activations and kernel workspaces come on top. With ``--device cuda`` each check's peak
CUDA memory is measured too (``torch.cuda.max_memory_allocated``), with what stays allocated after
it (the first check's one-off allocations, such as cuBLAS's workspace, show there).
"""
from __future__ import annotations

import gc
import os
import statistics
import time

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings

os.environ.setdefault("ISOLATION_SANDBOX", "off")  # everything a check allocates lives in this process

from isolation_suite import catalog, check  # noqa: E402
from isolation_suite import strategies  # noqa: E402
from isolation_suite.judging.judge import clear_reference_cache  # noqa: E402
from isolation_suite.model.factory import factory_tree  # noqa: E402
from isolation_suite.technique import Capability  # noqa: E402
from isolation_suite.zoo import ZOO  # noqa: E402

from ._common import bare_pair, table, write  # noqa: E402

SOUND = {Capability.FREEZE_MODULE: "freeze_and_eval", Capability.FREEZE_ELEMENTS: "parametrize_where"}
PER_CAPABILITY = 40


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_modules() -> int:
    gc.collect()
    return sum(isinstance(o, torch.nn.Module) for o in gc.get_objects())


def scenarios_for(spec: str, capability: Capability, size: int, device: str) -> list:
    drawn = []

    @seed(99)
    @settings(max_examples=size, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategies.scenarios(capabilities=[capability], model=spec, devices=(device.split(":")[0],)))
    def collect(s):
        drawn.append(s)
    collect()
    return drawn[:size]


def main(argv=None) -> dict:
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: then each check's peak CUDA memory is "
                        "measured (torch.cuda.max_memory_allocated), and what is still allocated after it")
    parser.add_argument("--per-capability", type=int, default=PER_CAPABILITY)
    args = parser.parse_args(argv)
    device = args.device
    torch.set_num_threads(1)
    rows, data = [], {}
    for name, factory in ZOO.items():
        spec = f"isolation_suite.zoo:{name}"
        try:
            tree = factory_tree(spec)
        except Exception as exc:  # noqa: BLE001 - a model whose library is missing is reported, not fatal
            print(f"{name}: skipped ({exc})")
            continue
        params = sum(torch.Size(s).numel() for s in tree.parameters.values())
        # technique + reference in the scenario's dtype, the float64 twin: weights, grads, two moments
        bound = params * 4 * (4 + 4 + 8)
        work = [(s, catalog()[SOUND[c]]) for c in SOUND for s in scenarios_for(spec, c, args.per_capability, device)]
        clear_reference_cache()
        seconds, rss, live, peaks, held, failed = [], [], [], [], [], []
        for scenario, technique in work:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            started = time.perf_counter()
            verdict = check(technique, scenario, device)
            seconds.append(time.perf_counter() - started)
            if device.startswith("cuda"):
                peaks.append(torch.cuda.max_memory_allocated() - base)
            if not verdict.ok:  # a sound row failing is the gate's finding; here it is only counted
                failed.append(verdict.first.invariant)
            clear_reference_cache()  # a check that pays for its reference, and holds nothing after it
            if device.startswith("cuda"):
                held.append(torch.cuda.memory_allocated() - base)
            rss.append(rss_mb())
            live.append(live_modules())
        floor = []
        for scenario, technique in work:
            started = time.perf_counter()
            bare_pair(technique, scenario)  # on the CPU: the floor of the CPU runs
            floor.append(time.perf_counter() - started)
        steady = live[len(live) // 4:]
        data[name] = {"checks": len(work), "parameters": params, "not_ok": failed,
                      "checks_per_s": len(work) / sum(seconds),
                      "median_ms": 1000 * statistics.median(seconds), "worst_ms": 1000 * max(seconds),
                      "floor_checks_per_s": len(work) / sum(floor), "rss_mb_first": rss[0], "rss_mb_last": rss[-1],
                      "rss_growth_mb_10_to_last": rss[-1] - rss[min(9, len(rss) - 1)],
                      "live_modules_min_max": [min(steady), max(steady)],
                      "peak_bound_bytes": bound, "device": device,
                      "cuda_peak_bytes_max": max(peaks) if peaks else None,
                      "cuda_peak_bytes_median": statistics.median(peaks) if peaks else None,
                      "cuda_bytes_left_after_a_check_max": max(held) if held else None}
        d = data[name]
        rows.append([name, params, len(work), f"{d['checks_per_s']:.1f}", f"{d['median_ms']:.0f}",
                     f"{d['worst_ms']:.0f}", f"{d['floor_checks_per_s']:.1f}",
                     f"{d['rss_growth_mb_10_to_last']:+.1f}", "{}-{}".format(*d["live_modules_min_max"]),
                     f"{bound / 1024:.0f} KiB"]
                    + ([f"{statistics.median(peaks) / 1024:.0f} / {max(peaks) / 1024:.0f} KiB",
                        f"{max(held)} B"] if peaks else []))
    print(table(rows, ["model", "params", "checks", "checks/s", "median ms", "worst ms", "floor checks/s",
                       "RSS growth MB", "live modules after a check", "bound per check"]
                + (["CUDA peak per check (median / max)", "CUDA left after a check"] if device != "cpu" else [])))
    for name, d in data.items():
        if d["not_ok"]:
            print(f"{name}: {len(d['not_ok'])} checks not ok ({', '.join(sorted(set(d['not_ok'])))})")
    print(f"-> {write('models', data)}")
    return data


if __name__ == "__main__":
    main()
