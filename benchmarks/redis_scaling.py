"""The cost of a shared failure database: N ``fuzz --shard I/N`` processes against one real Redis.

    python -m benchmarks.redis_scaling

Starts one ``redis-server`` (no persistence, a free local port), then for N = 1, 2, 4 runs N shard
processes at once, each ``isolation-suite fuzz --shard I/N --workers 1 --database redis://...``
with the same seed, every item judging ``EXAMPLES`` generated examples (a fixed amount of work,
whatever N: a time budget would be eaten by the start-up of four processes on two cores). Each
shard's report records, per item, the calls and seconds its shared database spent in
fetch/save/delete/move (``database_ops``); Redis's
own command counters give the commands per example. Reported per N: examples/s per shard and the
database's share of the shard's item time, median and worst shard.

From the measured commands and round trips per example, and the single instance's ceiling
(``redis-benchmark`` on the commands the database sends), it projects the load of 100 machines
sharing one Redis, and the time a LAN round trip would add per example.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from isolation_suite.engine.database import OPERATIONS

from ._common import median, table, write

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from redis_server import RedisServer  # noqa: E402

# sound rows: each runs the whole budget, its searches fetch once and save their Pareto front
TECHNIQUES = "functional_detach,toggle_requires_grad,freeze_and_eval,parametrize_where,weight_dropout," \
             "parametrize_dropconnect"
EXAMPLES = 200
BUDGET_S = 1200.0  # never reached: the examples bound every item
SHARDS = (1, 2, 4)
SEED = 20240601
MACHINES = 100
LAN_RTT_MS = 0.5  # a round trip between two machines in one data centre, for the projection
#: Redis round trips per database call: RedisExampleDatabase pipelines each call, and a call that
#: changes a set also publishes the change (save/delete: 2; move: 1 pipeline + up to 2 publishes)
ROUND_TRIPS = {"fetch": 1, "save": 2, "delete": 2, "move": 3}


def run_shards(count: int, url: str, out: Path) -> list[dict]:
    """``count`` shard processes at once; one row per shard from its summary."""
    procs = []
    for index in range(1, count + 1):
        folder = out / f"n{count}-shard{index}"
        cmd = [sys.executable, "-m", "isolation_suite.cli", "fuzz", "--shard", f"{index}/{count}", "--workers", "1",
               "--devices", "cpu", "--techniques", TECHNIQUES, "--max-examples", str(EXAMPLES),
               "--seed", str(SEED), "--budget", f"{BUDGET_S:g}", "--profile", "isolation-dev", "--database", url,
               "--report-dir", str(folder)]
        work = out / f"work-n{count}-{index}"  # its own local .hypothesis/examples, as on its own machine
        work.mkdir(parents=True)
        procs.append((index, folder, subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True)))
    rows = []
    for index, folder, proc in procs:
        output = proc.communicate()[0]
        if proc.returncode != 0:
            raise RuntimeError(f"shard {index}/{count} failed:\n{output}")
        run = folder / (folder / "LATEST").read_text().strip()
        rows.append(shard_row(index, count, json.loads((run / "summary.json").read_text())))
    return rows


def shard_row(index: int, count: int, summary: dict) -> dict:
    records = summary["results"]
    examples = sum(r["explicit_examples"] + r["examples"] + r["shrink_examples"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    ops = {op: {"calls": sum(r["database_ops"][op]["calls"] for r in records),
                "seconds": sum(r["database_ops"][op]["seconds"] for r in records)} for op in OPERATIONS}
    db_seconds = sum(v["seconds"] for v in ops.values())
    warnings = sorted({r["database_warning"] for r in records if r.get("database_warning")})
    return {"shard": f"{index}/{count}", "items": len(records), "examples": examples, "item_seconds": seconds,
            "examples_per_s": examples / seconds, "database_ops": ops, "database_seconds": db_seconds,
            "database_share": db_seconds / seconds, "database_calls_per_example":
                sum(v["calls"] for v in ops.values()) / max(examples, 1),
            "round_trips_per_example": sum(ROUND_TRIPS[op] * v["calls"] for op, v in ops.items()) / max(examples, 1),
            "warnings": warnings}


def redis_commands(client) -> int:
    """Commands the server ran since the last reset (the benchmark's own INFO/CONFIG left out)."""
    stats = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if not k.startswith(("cmdstat_info", "cmdstat_config")))


def ceiling(port: int) -> dict:
    """Requests/s of one Redis instance for the commands the database sends (50 clients)."""
    out = {}
    for name, command in (("sadd", ["-t", "sadd"]), ("publish", ["publish", "hypothesis-changes", "x"]),
                          ("smembers", ["smembers", "myset:__rand_int__"])):
        text = subprocess.run(["redis-benchmark", "-p", str(port), "--csv", "-n", "100000", "-c", "50", *command],
                              check=True, capture_output=True, text=True).stdout
        out[name] = float(text.strip().splitlines()[-1].split(",")[1].strip('"'))
    out["min"] = min(out.values())
    return out


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        client = server.client()
        runs = []
        for count in SHARDS:
            client.flushall()  # every N starts from an empty shared store, as a first night does
            client.config_resetstat()
            shards = run_shards(count, server.url, Path(tmp))
            examples = sum(s["examples"] for s in shards)
            commands = redis_commands(client)
            runs.append({"shards": count, "per_shard": shards, "examples": examples, "redis_commands": commands,
                         "commands_per_example": commands / examples})
        limit = ceiling(server.port)
    single = runs[0]["per_shard"][0]
    per_example = max(r["commands_per_example"] for r in runs)
    rate = single["examples_per_s"]  # one uncontended worker, one machine
    demand = MACHINES * rate * per_example
    projection = {
        "machines": MACHINES, "examples_per_s_per_machine": rate, "commands_per_example": per_example,
        "commands_per_s": demand, "ceiling_commands_per_s": limit["min"], "utilisation": demand / limit["min"],
        "lan_rtt_ms": LAN_RTT_MS,
        "round_trips_per_example": max(s["round_trips_per_example"] for r in runs for s in r["per_shard"]),
    }
    projection["lan_share_of_example_time"] = (projection["round_trips_per_example"] * LAN_RTT_MS / 1000 * rate)
    data = {"runs": runs, "examples_per_item": EXAMPLES, "techniques": TECHNIQUES, "redis_ceiling": limit,
            "projection": projection, "cpu_count": os.cpu_count()}
    rows = []
    for r in runs:
        shards = r["per_shard"]
        rates = [s["examples_per_s"] for s in shards]
        shares = [s["database_share"] for s in shards]
        rows.append([r["shards"], r["examples"], f"{median(rates):.1f}", f"{min(rates):.1f}",
                     f"{100 * median(shares):.2f}", f"{100 * max(shares):.2f}",
                     f"{median([s['database_calls_per_example'] for s in shards]):.2f}",
                     f"{r['commands_per_example']:.2f}", sum(len(s["warnings"]) for s in shards)])
    print(table(rows, ["shards", "examples", "ex/s per shard (median)", "(worst)", "db % of time (median)",
                       "(worst)", "db calls/example", "redis cmds/example", "warnings"]))
    print(f"\nredis-benchmark, one instance, 50 clients: SADD {limit['sadd']:.0f}/s, PUBLISH {limit['publish']:.0f}/s, "
          f"SMEMBERS {limit['smembers']:.0f}/s")
    print(f"{MACHINES} machines at {rate:.1f} examples/s each, {per_example:.2f} commands per example: "
          f"{demand:.0f} commands/s, {100 * projection['utilisation']:.1f}% of the slowest ceiling; "
          f"a {LAN_RTT_MS} ms round trip adds {100 * projection['lan_share_of_example_time']:.2f}% per example "
          f"-> {write('redis_scaling', data)}")
    return data


if __name__ == "__main__":
    main()
