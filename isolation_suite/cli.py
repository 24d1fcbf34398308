"""``isolation-suite``: list, check, fuzz, merge, repro.

A thin adapter over the engine (``engine.runs``): options come from ``engine.settings``, where each
is declared once; ``check`` judges its plan in-process, ``fuzz`` hands its plan to pytest-xdist
workers as a file. Bad input (unknown technique, bad device, unreadable file, bad number) prints one
line on stderr and exits 2; a violation exits 1; success exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from isolation_suite.engine import runs
from isolation_suite.engine.check import check, failure_message, search_line, seed_text
from isolation_suite.engine.loading import load_technique
from isolation_suite.engine.plan import PLAN_FILE, Plan
from isolation_suite.engine.profiles import describe, example_timeout
from isolation_suite.execution.lifetime import end_children
from isolation_suite.engine.settings import CHECK, FUZZ, REPRO, Settings, SettingError, add_arguments, settings
from isolation_suite.judging.invariants import DEVICE_PARITY, INVARIANTS
from isolation_suite.model.factory import describe_model
from isolation_suite.reporting.merge import MergeError, merge
from isolation_suite.reporting.report import ReportDirError, ensure_writable, point_latest, run_id, write_summary
from isolation_suite.spec.scenario import Scenario, ScenarioError
from isolation_suite.techniques import CATALOG
from isolation_suite.techniques.library import library_rows

EXIT_OK, EXIT_VIOLATION, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input: reported as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise UsageError(message)


def _writable(directory: str | Path) -> Path:
    try:
        return ensure_writable(Path(directory))
    except ReportDirError as exc:
        raise UsageError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="isolation-suite", description="Property-based testing of gradient isolation in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="the catalog: capabilities and expected verdicts")
    c = sub.add_parser("check", help="search one technique; exit 1 on a violation")
    c.add_argument("spec", help="'pkg.module:attr' or a catalog name")
    add_arguments(c, CHECK)
    f = sub.add_parser("fuzz", help="the main job: the whole catalog, in parallel, with a report")
    add_arguments(f, FUZZ)
    m = sub.add_parser("merge", help="combine shard reports into one report")
    m.add_argument("folders", nargs="+", metavar="DIR", help="shard run folders (or reports folders with LATEST)")
    m.add_argument("--report-dir", default="reports", help="the merged run goes to DIR/<run-id>/ (default reports)")
    r = sub.add_parser("repro", help="re-run a stored scenario")
    r.add_argument("file", help="a scenario JSON, or a result record from a report's results/ folder")
    r.add_argument("--technique", default=None, help="spec; required when FILE is a bare scenario")
    r.add_argument("--device", default="cpu")
    add_arguments(r, REPRO)
    return p


def _settings(args, surface: str) -> Settings:
    """The command's settings: its arguments, else the environment, else the defaults."""
    return settings(vars(args), surface)


def _line(text: str) -> None:
    print(text, flush=True)


class _DatabaseWarning:
    """Says once per run that the shared example database was lost (the searches go on without it)."""

    def __init__(self) -> None:
        self.said = False

    def __call__(self, result) -> None:
        if result.database_warning and not self.said:
            self.said = True
            print(f"isolation-suite: warning: {result.database_warning}", file=sys.stderr, flush=True)


def _replay(argv: list[str], chosen: Settings, seed: int | None) -> str:
    """The command line that runs the same searches again."""
    argv = ["isolation-suite", *argv]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if chosen.max_examples is not None:
        argv += ["--max-examples", str(chosen.max_examples)]
    if chosen.timeout is not None:
        argv += ["--timeout", f"{chosen.timeout:g}"]
    if chosen.database is not None:  # a search replays its database's failures first: the same ones
        argv += ["--database", chosen.database] + (["--database-readonly"] if chosen.database_readonly else [])
    return f"ISOLATION_PROFILE={chosen.chosen_profile} " + " ".join(shlex.quote(a) for a in argv)


# --- list ---------------------------------------------------------------------------------

def cmd_list(args) -> int:
    _line(f"{'technique':28s} {'seed':18s} {'capability':16s} expected verdict")
    for entry in CATALOG:
        t = entry.technique
        caps = ",".join(sorted(c.value for c in t.capabilities))
        verdict = ", ".join(sorted(t.expected_violations)) or "sound"
        for mode, extra in sorted(t.mode_violations.items()):
            verdict += f"; under {mode}: " + ", ".join(sorted(extra))
        _line(f"{t.name:28s} {t.seed or '-':18s} {caps:16s} {verdict}")
    _line("")
    _line("library rows (isolation-suite check SPEC; verdicts per mode: docs/compatibility.md)")
    _line(f"{'technique':40s} {'installed':22s} {'judged on':10s} expected verdict")
    for row in library_rows():
        installed = f"{row.library} {row.installed() or '(not installed)'}"
        _line(f"{row.name:40s} {installed:22s} {row.judged_on:10s} {row.verdict_line()}")
        _line(f"  {row.spec}")
    return EXIT_OK


# --- check --------------------------------------------------------------------------------

def cmd_check(args) -> int:
    chosen = _settings(args, CHECK).but(techniques=(args.spec.strip(),))
    runs.use_settings(chosen)
    plan, techniques = runs.plan_for(chosen, CHECK)
    technique = techniques[args.spec.strip()]
    run_dir = _writable(chosen.report_dir) if chosen.report_dir else None  # before the search, not after it
    replay = _replay(["check", args.spec, "--devices", ",".join(plan.devices), "--modes", ",".join(plan.modes)]
                     + (["--model", plan.model] if plan.model else []), chosen, plan.seed)
    _line(f"isolation-suite check {technique.name}: profile {describe(plan.profile, plan.timeout)}; "
          f"{seed_text(plan.seed)}")
    if plan.model:
        _line(describe_model(plan.model, limit=plan.timeout or example_timeout()))
    failures = []
    database_warning = _DatabaseWarning()
    for item in sorted(plan.items, key=lambda i: (plan.devices.index(i.device), plan.modes.index(i.mode),
                                                  i.capability)):
        judged = runs.run_item(plan, item, techniques, run_dir)
        result = judged.result
        database_warning(result)
        fired = set(result.failure.invariants) if result.failure else set()
        _line(f"{technique.name} [{item.where}]: {search_line(result)}")
        for inv in INVARIANTS if not result.not_applicable else ():
            if inv == DEVICE_PARITY and not item.device.startswith("cuda"):
                state = "n/a (needs cuda)"
            else:
                state = "VIOLATED" if inv in fired else "held"
            _line(f"  {inv:18s} {state}")
        if result.failure:
            failures.append(judged)
    for judged in failures:
        _line("")
        _line(failure_message(judged.result.failure, set(judged.result.capabilities), judged.result))
    if run_dir is not None:
        # the folder is this check's own, but may hold an earlier run's records: only this one's count
        write_summary(run_dir, runs.run_meta(plan, {"technique": args.spec}), complete=True,
                      items=[item.key for item in plan.items])
        _line(f"report: {run_dir}")
    for judged in failures:
        expected = technique.expected_in(judged.item.mode)
        if expected:
            _line(f"note: {technique.name} is known-bad in {judged.item.mode} mode "
                  f"(expected: {', '.join(sorted(expected))})")
            break
    _line(f"replay: {replay}")
    return EXIT_VIOLATION if failures else EXIT_OK


# --- repro --------------------------------------------------------------------------------

def cmd_repro(args) -> int:
    chosen = _settings(args, REPRO)
    try:
        data = json.loads(Path(args.file).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{args.file} is not JSON: {exc}") from None
    spec, timeout = args.technique, chosen.timeout
    if isinstance(data, dict) and "scenario" in data and "technique" in data:  # a report's record
        if data["scenario"] is None:
            raise UsageError(f"{args.file} is the record of an item without a counterexample: nothing to replay")
        spec = spec or data.get("spec") or data["technique"]
        # the run's own limit per training run: a timeout found under --timeout 2 is one under 2 s again
        timeout = timeout if timeout is not None else data.get("timeout")
        data = data["scenario"]
    if isinstance(data, dict) and "results" in data and "meta" in data:
        raise UsageError(f"{args.file} is a run's summary: give one of its records (results/*.json) to replay")
    if spec is None:
        raise UsageError(f"{args.file} holds a bare scenario: name the technique with --technique SPEC")
    technique = load_technique(spec)
    try:
        scenario = Scenario.from_dict(data)
        verdict = check(technique, scenario, args.device,
                        timeout=timeout if timeout is not None else example_timeout())
    except ScenarioError as exc:
        raise UsageError(f"{args.file} is not a valid scenario: {exc}") from None
    _line(repr(scenario))
    _line(str(verdict))
    return EXIT_OK if verdict.ok else EXIT_VIOLATION


# --- fuzz ---------------------------------------------------------------------------------

#: seconds of the budget kept for writing the report and stopping the workers
REPORT_RESERVE_S = 1.0


def _workers(chosen: Settings, plan: Plan) -> int:
    """xdist workers: as asked, never more than the units of work (items, or sweeps)."""
    asked = (os.cpu_count() or 1) if chosen.workers == "auto" else int(chosen.workers)
    return max(1, min(asked, plan.units))


def cmd_fuzz(args) -> int:
    import pytest

    started = time.time()
    chosen = _settings(args, FUZZ)
    runs.use_settings(chosen)
    plan, _ = runs.plan_for(chosen, FUZZ)
    workers = _workers(chosen, plan)
    plan = plan.with_budget(chosen.budget, workers, REPORT_RESERVE_S, started)
    reports = _writable(chosen.report_dir)
    rid = run_id()
    run_dir = _writable(reports / rid)
    (run_dir / PLAN_FILE).write_text(plan.to_json())
    replay = _replay(["fuzz", "--budget", f"{chosen.budget:g}", "--devices", ",".join(plan.devices),
                      "--modes", ",".join(plan.modes)]
                     + (["--techniques", ",".join(chosen.techniques)] if chosen.techniques else [])
                     + (["--model", plan.model] if plan.model else [])
                     + (["--shard", str(plan.shard)] if plan.shard else []) + (["--sweep"] if plan.sweep else []),
                     chosen, plan.seed)
    items = len(plan.items)
    _line(f"isolation-suite fuzz: {len(plan.specs)} techniques, {items} items"
          + (f" (shard {plan.shard} of {len(plan.every)} items)" if plan.shard else "")
          + (f" in {len(plan.groups())} sweeps" if plan.sweep else "")
          + f" on {','.join(plan.devices)} in modes {','.join(plan.modes)}, {workers} worker(s), "
          f"budget {chosen.budget:g}s (up to {plan.item_budget:.1f}s per item); report: {run_dir}")
    _line(f"profile {describe(plan.profile, plan.timeout)}; {seed_text(plan.seed)}; replay: {replay}")
    if plan.items:
        code = _run_workers(plan, reports, run_dir, workers)
    else:  # a shard with nothing to do: a valid empty report, which merge accepts
        code = pytest.ExitCode.OK
        write_summary(run_dir, runs.run_meta(plan, {"workers": 0}), complete=True,
                      progress={"finished": [], "running": [], "not_started": []})
    point_latest(reports, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    failed = _failed(summary)
    _line(f"report: {run_dir}/report.html ({_status(summary)}{'' if summary['complete'] else ', incomplete'}); "
          f"{_judged_text(summary['results'], items)}, {len(failed)} failed; {seed_text(plan.seed)}")
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


def _run_workers(plan: Plan, reports: Path, run_dir: Path, workers: int):
    """pytest with the plug-in over ``plan`` (handed over as a file), always in xdist workers, even
    just one: a worker killed by a crashing kernel (a segfault, out of memory) then costs its item an
    error record, not the whole run and its report."""
    import pytest

    # the plug-in arrives through its pytest11 entry point unless autoloading is off
    plugin = ["-p", "isolation_suite.pytest_plugin"] if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else []
    argv = plugin + ["-p", "no:cacheprovider", "-p", "no:benchmark", "-q", "--no-header",
                     "-W", "ignore::pytest.PytestAssertRewriteWarning", "-W", "ignore:Full backward hook is firing",
                     "-o", "addopts=", "-o", "testpaths=", "--rootdir", str(run_dir),
                     "--isolation-plan", str(run_dir / PLAN_FILE), "--isolation-report", str(reports.resolve()),
                     "--isolation-run-id", run_dir.name, "--isolation-progress", "-n", str(workers)]
    # collect nothing but the gate items: point pytest at an empty folder
    with tempfile.TemporaryDirectory(prefix="isolation-fuzz-") as empty:
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            return pytest.main(argv + [empty])
        finally:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt(signum, frame):
    end_children()  # xdist would wait 10 s for each busy worker
    raise KeyboardInterrupt


def cmd_merge(args) -> int:
    reports = _writable(args.report_dir)
    run_dir = _writable(reports / run_id())
    try:
        meta, problems = merge([Path(f) for f in args.folders], run_dir)
    except MergeError:  # refused before anything was merged: no empty run folder left behind
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    summary = write_summary(run_dir, meta, complete=not problems)
    point_latest(reports, run_dir)
    failed = _failed(summary)
    _line(f"merged {len(args.folders)} report(s), shards {', '.join(meta['shards']) or 'none'}, "
          f"{', '.join(seed_text(s) for s in meta['seeds'])}: {len(summary['results'])} of "
          f"{len(meta['plan']['every'])} planned items, {len(failed)} failed -> {run_dir}/report.html "
          f"({_status(summary)}{'' if summary['complete'] else ', INCOMPLETE'})")
    for problem in problems:
        _line(f"  INCOMPLETE: {problem}")
    _fail_lines(failed)
    return EXIT_OK if summary["ok"] else EXIT_VIOLATION


def _judged_text(results: list[dict], items: int) -> str:
    """``12 of 14 items judged, 2 not applicable``: an item reported n/a judged nothing."""
    na = sum(1 for r in results if r.get("outcome") == "n/a")
    return f"{len(results) - na} of {items} items judged" + (f", {na} not applicable" if na else "")


def _failed(summary: dict) -> list[dict]:
    return [r for r in summary["results"] if not r["passed"]]


def _status(summary: dict) -> str:
    return "PASS" if summary["ok"] else "FAIL"


def _fail_lines(failed: list[dict]) -> None:
    """One line per failed item, saying why (fuzz and merge print the same)."""
    for r in failed:
        _line(f"  FAIL {r['item']}: {r.get('reason') or r.get('error') or r['outcome']}")


COMMANDS = {"list": cmd_list, "check": cmd_check, "fuzz": cmd_fuzz, "repro": cmd_repro, "merge": cmd_merge}


class _ReaderMayLeave:
    """Standard output whose reader may leave early (``isolation-suite check ... | head -1``): from
    then on what is written goes nowhere, and the command goes on to its own exit status (a violation
    piped into ``head`` still exits 1)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def _gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    saved = dict(os.environ)  # a command sets the database and profile for its workers; not for its caller
    stdout, sys.stdout = sys.stdout, _ReaderMayLeave(sys.stdout)
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, SettingError, MergeError, *runs.PLAN_ERRORS) as exc:
        print(f"isolation-suite: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("isolation-suite: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # a pipe other than standard output: the status is unknown, never a pass
        sys.stderr.close()
        return EXIT_VIOLATION
    finally:
        sys.stdout = stdout
        os.environ.clear()
        os.environ.update(saved)


if __name__ == "__main__":  # pragma: no cover - python -m isolation_suite.cli
    sys.exit(main())
