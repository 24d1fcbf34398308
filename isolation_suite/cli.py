"""``isolation-suite``: list, check, fuzz, repro.

Bad input (unknown technique, bad device, unreadable file, bad number) prints
one line on stderr and exits 2; a violation exits 1; success exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_VIOLATION, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input: reported as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise UsageError(message)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed takes a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--seed takes a non-negative integer, got {text}")
    return value


def _writable(directory: str) -> Path:
    from isolation_suite.reporting.report import ReportDirError, ensure_writable
    try:
        return ensure_writable(Path(directory))
    except ReportDirError as exc:
        raise UsageError(str(exc)) from None


def _workers(text: str) -> str:
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"--workers takes a positive integer or 'auto', got {text!r}")


MODES_HELP = ("execution modes, a comma list of eager, checkpoint, compile, autocast, ddp, or all (default: "
              "$ISOLATION_MODES, else all: every mode the devices run)")


def _modes(text: str, devices) -> tuple[str, ...]:
    from isolation_suite.engine.check import modes_for
    try:
        return modes_for(text, devices)
    except ValueError as exc:
        raise UsageError(f"--modes: {exc}") from None


def _database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", default=None, metavar="SPEC",
                        help="where failing examples are kept and replayed from: a directory, 'none', or "
                             "redis://HOST:PORT/DB shared by many machines (default: $ISOLATION_DATABASE or "
                             ".hypothesis/examples; the isolation-ci profile keeps none)")
    parser.add_argument("--database-readonly", action="store_true", default=None,
                        help="replay the database's failures but never write to it (with a Redis URL the local "
                             ".hypothesis/examples stays writable; also ISOLATION_DATABASE_READONLY=1)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="isolation-suite", description="Property-based testing of gradient isolation in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="the catalog: capabilities and expected verdicts")
    c = sub.add_parser("check", help="search one technique; exit 1 on a violation")
    c.add_argument("spec", help="'pkg.module:attr' or a catalog name")
    c.add_argument("--model", default=None, metavar="PKG.MOD:FACTORY",
                   help="judge on your own model: a zero-argument factory returning (model, example_inputs[, loss])")
    c.add_argument("--devices", default="cpu", help="cpu, cuda, cuda:N, auto, or a comma list (default cpu)")
    c.add_argument("--modes", default=None, help=MODES_HELP)
    c.add_argument("--max-examples", type=_positive(int), default=None)
    c.add_argument("--budget", type=_positive(float), default=None, help="seconds per capability x device")
    c.add_argument("--report-dir", default=None, help="also write a report (and repro scripts) here")
    c.add_argument("--seed", type=_seed, default=None,
                   help="fix the search (default: drawn and printed; derandomized under isolation-ci)")
    c.add_argument("--timeout", type=_positive(float), default=None,
                   help="seconds one training run may take before it is stopped (default: the profile's)")
    _database_options(c)
    f = sub.add_parser("fuzz", help="the main job: the whole catalog, in parallel, with a report")
    f.add_argument("--budget", type=_positive(float), default=120.0, help="total seconds (default 120)")
    f.add_argument("--max-examples", type=_positive(int), default=None, help="cap per technique x device")
    f.add_argument("--devices", default="auto")
    f.add_argument("--modes", default=None, help=MODES_HELP)
    f.add_argument("--workers", type=_workers, default="auto", help="xdist workers: N or auto (default)")
    f.add_argument("--report-dir", default="reports", help="runs go to DIR/<run-id>/ (default reports)")
    f.add_argument("--techniques", default=None, help="comma list of catalog names or specs (default: all)")
    f.add_argument("--profile", default=None, help="Hypothesis profile (default isolation-dev)")
    f.add_argument("--shard", default=None, metavar="I/N",
                   help="run shard I of N of the items (deterministic, balanced); combine with 'merge'")
    f.add_argument("--model", default=None, metavar="PKG.MOD:FACTORY",
                   help="fuzz on your own model: a zero-argument factory returning (model, example_inputs[, loss])")
    f.add_argument("--sweep", action="store_true",
                   help="one sweep per capability and device: every technique judged on shared scenarios, "
                        "each reference computed once (the report still has one record per item)")
    f.add_argument("--seed", type=_seed, default=None,
                   help="fix every search (default: drawn and printed; derandomized under isolation-ci)")
    f.add_argument("--timeout", type=_positive(float), default=None,
                   help="seconds one training run may take before it is stopped (default: the profile's)")
    _database_options(f)
    m = sub.add_parser("merge", help="combine shard reports into one report")
    m.add_argument("folders", nargs="+", metavar="DIR", help="shard run folders (or reports folders with LATEST)")
    m.add_argument("--report-dir", default="reports", help="the merged run goes to DIR/<run-id>/ (default reports)")
    r = sub.add_parser("repro", help="re-run a stored scenario")
    r.add_argument("file", help="a scenario JSON, or a result record from a report's results/ folder")
    r.add_argument("--technique", default=None, help="spec; required when FILE is a bare scenario")
    r.add_argument("--device", default="cpu")
    r.add_argument("--timeout", type=_positive(float), default=None,
                   help="seconds one training run may take before it is stopped (default: the profile's)")
    return p


def _line(text: str) -> None:
    print(text, flush=True)


def _use_database(args) -> None:
    """``--database`` / ``--database-readonly`` become the environment (so ``fuzz``'s workers see
    them too) and the profiles' database; a malformed spec is one line and exit 2, before any search."""
    from isolation_suite.engine.profiles import DATABASE_ENV, READONLY_ENV, register_profiles
    if args.database is not None:
        os.environ[DATABASE_ENV] = args.database
    if args.database_readonly:
        os.environ[READONLY_ENV] = "1"
    register_profiles()


class _DatabaseWarning:
    """Says once per run that the shared example database was lost (the searches go on without it)."""

    def __init__(self) -> None:
        self.said = False

    def __call__(self, result) -> None:
        if result.database_warning and not self.said:
            self.said = True
            print(f"isolation-suite: warning: {result.database_warning}", file=sys.stderr, flush=True)


# --- list ---------------------------------------------------------------------------------

def cmd_list(args) -> int:
    from isolation_suite.techniques import CATALOG
    _line(f"{'technique':28s} {'seed':18s} {'capability':16s} expected verdict")
    for entry in CATALOG:
        t = entry.technique
        caps = ",".join(sorted(c.value for c in t.capabilities))
        verdict = ", ".join(sorted(t.expected_violations)) or "sound"
        for mode, extra in sorted(t.mode_violations.items()):
            verdict += f"; under {mode}: " + ", ".join(sorted(extra))
        _line(f"{t.name:28s} {t.seed or '-':18s} {caps:16s} {verdict}")
    return EXIT_OK


# --- check --------------------------------------------------------------------------------

def cmd_check(args) -> int:
    from isolation_suite.execution import devices as devices_mod
    from isolation_suite.engine.check import failure_message, run_seed, search, search_line, search_settings, seed_text
    from isolation_suite.judging.invariants import DEVICE_PARITY, INVARIANTS
    from isolation_suite.engine.loading import load_technique
    from isolation_suite.engine.profiles import active_profile, describe, describe_database
    from isolation_suite.reporting.report import environment, record, write_summary

    _use_database(args)
    technique = load_technique(args.spec)
    devices = devices_mod.resolve(args.devices)
    modes = _modes(args.modes, devices)
    if args.model:
        from isolation_suite.model.factory import factory_tree
        tree = factory_tree(args.model)  # one line and exit 2 when the factory is wrong, before any search
    run_dir = _writable(args.report_dir) if args.report_dir else None  # before the search, not after it
    seed = args.seed if args.seed is not None else run_seed(args.max_examples)
    replay = _replay(["check", args.spec, "--devices", ",".join(devices), "--modes", ",".join(modes)]
                     + (["--model", args.model] if args.model else []), seed, args.max_examples, args.timeout)
    _line(f"isolation-suite check {technique.name}: profile {describe(active_profile(), args.timeout)}; "
          f"{seed_text(seed)}")
    if args.model:
        _line(f"model {args.model}: {sum(1 for n in tree.nodes if n.path)} modules, "
              f"{sum(math.prod(s) for s in tree.parameters.values())} parameters")
    failures = []
    database_warning = _DatabaseWarning()
    for device in devices:
        for mode in modes:
            for capability in sorted(technique.capabilities, key=lambda c: c.value):
                started = time.monotonic()
                result = search(technique, {capability}, device, args.max_examples, args.budget, seed=seed,
                                timeout=args.timeout, model=args.model, mode=mode)
                record(result, technique, time.monotonic() - started, run_dir, spec=args.spec)
                database_warning(result)
                fired = set(result.failure.invariants) if result.failure else set()
                where = f"{capability.value} on {device}" + ("" if mode == "eager" else f", {mode}")
                _line(f"{technique.name} [{where}]: {search_line(result)}")
                for inv in INVARIANTS if not result.not_applicable else ():
                    if inv == DEVICE_PARITY and not device.startswith("cuda"):
                        state = "n/a (needs cuda)"
                    else:
                        state = "VIOLATED" if inv in fired else "held"
                    _line(f"  {inv:18s} {state}")
                if result.failure:
                    failures.append((result, capability))
    for result, capability in failures:
        _line("")
        _line(failure_message(result.failure, {capability}, result))
    if run_dir is not None:
        write_summary(run_dir, environment({"devices": devices, "modes": list(modes), "technique": args.spec,
                                            "model": args.model, "profile": active_profile(),
                                            "database": describe_database(),
                                            "seed": seed, "seed_text": seed_text(seed), "budget": args.budget,
                                            "max_examples": search_settings(args.max_examples).max_examples}),
                      complete=True)
        _line(f"report: {run_dir}")
    for result, _ in failures:
        expected = technique.expected_in(result.mode)
        if expected:
            _line(f"note: {technique.name} is known-bad in {result.mode} mode "
                  f"(expected: {', '.join(sorted(expected))})")
            break
    _line(f"replay: {replay}")
    return EXIT_VIOLATION if failures else EXIT_OK


def _replay(argv: list[str], seed: int | None, max_examples: int | None, timeout: float | None) -> str:
    """The command line that runs the same searches again."""
    import shlex
    from isolation_suite.engine.profiles import active_profile
    argv = ["isolation-suite", *argv]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if max_examples is not None:
        argv += ["--max-examples", str(max_examples)]
    if timeout is not None:
        argv += ["--timeout", f"{timeout:g}"]
    prefix = f"ISOLATION_PROFILE={active_profile()} "
    return prefix + " ".join(shlex.quote(a) for a in argv)


# --- repro --------------------------------------------------------------------------------

def cmd_repro(args) -> int:
    from isolation_suite.engine.check import check
    from isolation_suite.engine.loading import load_technique
    from isolation_suite.engine.profiles import example_timeout
    from isolation_suite.spec.scenario import Scenario, ScenarioError

    try:
        data = json.loads(Path(args.file).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{args.file} is not JSON: {exc}") from None
    spec = args.technique
    if isinstance(data, dict) and "scenario" in data and "technique" in data:  # a report's record
        if data["scenario"] is None:
            raise UsageError(f"{args.file} is the record of an item without a counterexample: nothing to replay")
        spec = spec or data.get("spec") or data["technique"]
        data = data["scenario"]
    if spec is None:
        raise UsageError(f"{args.file} holds a bare scenario: name the technique with --technique SPEC")
    technique = load_technique(spec)
    try:
        scenario = Scenario.from_dict(data)
        verdict = check(technique, scenario, args.device,
                        timeout=args.timeout if args.timeout is not None else example_timeout())
    except ScenarioError as exc:
        raise UsageError(f"{args.file} is not a valid scenario: {exc}") from None
    _line(repr(scenario))
    _line(str(verdict))
    return EXIT_OK if verdict.ok else EXIT_VIOLATION


# --- fuzz ---------------------------------------------------------------------------------

def _fuzz_techniques(text: str | None) -> dict:
    """spec -> technique; loading fails fast, in one line, before any worker starts."""
    from isolation_suite.engine.loading import load_technique
    from isolation_suite.techniques import CATALOG
    specs = [s.strip() for s in text.split(",") if s.strip()] if text else [e.name for e in CATALOG]
    if not specs:
        raise UsageError("--techniques is empty")
    return {spec: load_technique(spec) for spec in specs}


def _item_mode(name: str) -> str:
    """``tech[CAP-cpu-compile]`` -> ``compile``; an item without a mode is eager."""
    from isolation_suite.execution.modes import MODE_BY_KIND
    last = name.rstrip("]").rpartition("-")[2]
    return last if last in MODE_BY_KIND else "eager"


def item_budget(budget: float, workers: int, items: float) -> float:
    """Seconds per item of weight 1 (``items``: the items' summed mode weights): each worker runs
    its share of the items one after another, with a fifth of the budget kept for start-up and the
    report. Items never run past the run's deadline either (``--isolation-deadline``), so the whole
    run ends within the budget plus one example."""
    return budget * min(workers, items) / max(items, 1) * 0.8


#: seconds of the budget kept for writing the report and stopping the workers
REPORT_RESERVE_S = 1.0


def cmd_fuzz(args) -> int:
    import pytest

    from isolation_suite.execution import devices as devices_mod
    from isolation_suite.engine.check import run_seed, seed_text
    from isolation_suite.engine.profiles import PROFILE_ENV, PROFILES, describe
    from isolation_suite.pytest_plugin import item_name
    from isolation_suite.reporting.report import point_latest, run_id
    from isolation_suite.reporting.shards import Shard

    started = time.time()
    _use_database(args)
    techniques = _fuzz_techniques(args.techniques)
    specs = list(techniques)
    devices = devices_mod.resolve(args.devices)
    modes = _modes(args.modes, devices)
    if args.profile and args.profile not in PROFILES:
        raise UsageError(f"--profile {args.profile!r} is not one of {', '.join(PROFILES)}")
    profile = args.profile or os.environ.get(PROFILE_ENV) or "isolation-dev"
    if profile not in PROFILES:
        raise UsageError(f"{PROFILE_ENV}={profile!r} is not one of {', '.join(PROFILES)}")
    os.environ[PROFILE_ENV] = profile
    if args.model:
        from isolation_suite.model.factory import factory_tree
        factory_tree(args.model)  # one line and exit 2 when the factory is wrong, before any worker starts
    shard = Shard.parse(args.shard) if args.shard else None
    workers = (os.cpu_count() or 1) if args.workers == "auto" else int(args.workers)
    every = [item_name(t, c, d, m) for t in techniques.values() for d in devices for m in modes for c in t.capabilities]
    chosen = shard.select(every) if shard else every
    items = len(chosen)
    # with --sweep, one pytest item (a sweep) per capability, device and mode judges its items together
    groups = len({name.rpartition("[")[2] for name in chosen}) if args.sweep else items
    # an item's budget is per_item times its mode's weight (a compiled item gets more time)
    from isolation_suite.execution.modes import MODE_BY_KIND
    weighted = sum(MODE_BY_KIND[_item_mode(name)].budget_weight for name in chosen)
    per_item = item_budget(args.budget, min(workers, groups), weighted)
    reports = _writable(args.report_dir)
    rid = run_id()
    run_dir = _writable(str(reports / rid))
    point_latest(reports, run_dir)
    seed = args.seed if args.seed is not None else run_seed(args.max_examples)
    replay = _replay(["fuzz", "--budget", f"{args.budget:g}", "--devices", ",".join(devices),
                      "--modes", ",".join(modes)]
                     + (["--techniques", args.techniques] if args.techniques else [])
                     + (["--model", args.model] if args.model else [])
                     + (["--shard", str(shard)] if shard else []) + (["--sweep"] if args.sweep else []),
                     seed, args.max_examples, args.timeout)
    _line(f"isolation-suite fuzz: {len(specs)} techniques, {items} items"
          + (f" (shard {shard} of {len(every)} items)" if shard else "")
          + (f" in {groups} sweeps" if args.sweep else "") + f" on {','.join(devices)} in modes {','.join(modes)}, "
          f"{workers} worker(s), budget {args.budget:g}s (up to {per_item:.1f}s per item); report: {run_dir}")
    _line(f"profile {describe(profile, args.timeout)}; {seed_text(seed)}; replay: {replay}")
    # the plug-in arrives through its pytest11 entry point unless autoloading is off
    plugin = ["-p", "isolation_suite.pytest_plugin"] if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else []
    argv = plugin + ["-p", "no:cacheprovider", "-p", "no:benchmark", "-q", "--no-header",
            "-W", "ignore::pytest.PytestAssertRewriteWarning", "-W", "ignore:Full backward hook is firing",
            "-o", "addopts=", "-o", "testpaths=", "--rootdir", str(run_dir),
            "--isolation-devices", ",".join(devices), "--isolation-modes", ",".join(modes),
            "--isolation-report", str(reports.resolve()),
            "--isolation-run-id", rid, "--isolation-budget", f"{per_item:.3f}",
            "--isolation-deadline", f"{started + args.budget - REPORT_RESERVE_S:.3f}"]
    for spec in specs:
        argv += ["--isolation-technique", spec]
    if args.max_examples:
        argv += ["--isolation-max-examples", str(args.max_examples)]
    if args.model:
        argv += ["--isolation-model", args.model]
    if shard:
        argv += ["--isolation-shard", str(shard)]
    if args.sweep:
        argv.append("--isolation-sweep")
    argv.append("--isolation-progress")
    if seed is not None:
        argv += ["--hypothesis-seed", str(seed)]
    if args.timeout is not None:
        argv += ["--isolation-timeout", f"{args.timeout:g}"]
    # always in xdist workers, even just one: a worker killed by a crashing kernel (a segfault, out of
    # memory) then costs its item an error record, not the whole run and its report
    argv += ["-n", str(max(1, min(workers, groups)))]
    # collect nothing but the gate items: point pytest at an empty folder
    with tempfile.TemporaryDirectory(prefix="isolation-fuzz-") as empty:
        argv.append(empty)
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            code = pytest.main(argv)
        finally:
            signal.signal(signal.SIGTERM, previous)
    summary = json.loads((run_dir / "summary.json").read_text())
    failed = _failed(summary)
    _line(f"report: {run_dir}/report.html ({_status(summary)}{'' if summary['complete'] else ', incomplete'}); "
          f"{len(summary['results'])} of {items} items judged, {len(failed)} failed; {seed_text(seed)}")
    _fail_lines(failed)
    for key, label in (("running", "running when it stopped"), ("not_started", "never started")):
        names = (summary.get("items") or {}).get(key)
        if names and not summary["complete"]:
            _line(f"  {label}: {', '.join(names)}")
    if failed:
        _line(f"replay: {replay}")
    if code == pytest.ExitCode.INTERRUPTED:
        return 130
    return EXIT_OK if code == pytest.ExitCode.OK and summary["ok"] else EXIT_VIOLATION


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_merge(args) -> int:
    from isolation_suite.reporting.report import point_latest, run_id, write_summary
    from isolation_suite.reporting.shards import merge

    reports = _writable(args.report_dir)
    run_dir = _writable(str(reports / run_id()))
    meta, problems = merge([Path(f) for f in args.folders], run_dir)
    summary = write_summary(run_dir, meta, complete=not problems)
    point_latest(reports, run_dir)
    failed = _failed(summary)
    _line(f"merged {len(args.folders)} report(s), shards {', '.join(meta['shards']) or 'none'}: "
          f"{len(summary['results'])} items, {len(failed)} failed -> {run_dir}/report.html ({_status(summary)})")
    for problem in problems:
        _line(f"  INCOMPLETE: {problem}")
    _fail_lines(failed)
    return EXIT_OK if summary["ok"] else EXIT_VIOLATION


def _failed(summary: dict) -> list[dict]:
    return [r for r in summary["results"] if not r["passed"]]


def _status(summary: dict) -> str:
    return "PASS" if summary["ok"] else "FAIL"


def _fail_lines(failed: list[dict]) -> None:
    """One line per failed item, saying why (fuzz and merge print the same)."""
    for r in failed:
        _line(f"  FAIL {r['item']}: {r.get('reason') or r.get('error') or r['outcome']}")


COMMANDS = {"list": cmd_list, "check": cmd_check, "fuzz": cmd_fuzz, "repro": cmd_repro, "merge": cmd_merge}


def main(argv: Sequence[str] | None = None) -> int:
    from isolation_suite.engine.database import DatabaseSpecError
    from isolation_suite.execution.devices import DeviceError
    from isolation_suite.engine.loading import TechniqueLoadError
    from isolation_suite.model.factory import ModelFactoryError
    from isolation_suite.engine.profiles import register_profiles
    from isolation_suite.reporting.shards import ShardError

    saved = dict(os.environ)  # a command sets the database and profile for its workers; not for its caller
    try:
        register_profiles()  # ISOLATION_DATABASE as it is now, not as it was at import
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, TechniqueLoadError, DeviceError, ModelFactoryError, ShardError, DatabaseSpecError) as exc:
        print(f"isolation-suite: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("isolation-suite: interrupted", file=sys.stderr)
        return 130
    finally:
        os.environ.clear()
        os.environ.update(saved)


if __name__ == "__main__":  # pragma: no cover - python -m isolation_suite.cli
    sys.exit(main())
