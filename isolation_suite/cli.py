"""``isolation-suite``: list, check, fuzz, repro.

Bad input (unknown technique, bad device, unreadable file, bad number) prints
one line on stderr and exits 2; a violation exits 1; success exits 0.
"""
from __future__ import annotations

import argparse
import json
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


def _workers(text: str) -> str:
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"--workers takes a positive integer or 'auto', got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="isolation-suite", description="Property-based testing of gradient isolation in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="the catalog: capabilities and expected verdicts")
    c = sub.add_parser("check", help="search one technique; exit 1 on a violation")
    c.add_argument("spec", help="'pkg.module:attr' or a catalog name")
    c.add_argument("--devices", default="cpu", help="cpu, cuda, cuda:N, auto, or a comma list (default cpu)")
    c.add_argument("--max-examples", type=_positive(int), default=None)
    c.add_argument("--budget", type=_positive(float), default=None, help="seconds per capability x device")
    c.add_argument("--report-dir", default=None, help="also write a report (and repro scripts) here")
    f = sub.add_parser("fuzz", help="the main job: the whole catalog, in parallel, with a report")
    f.add_argument("--budget", type=_positive(float), default=120.0, help="total seconds (default 120)")
    f.add_argument("--max-examples", type=_positive(int), default=None, help="cap per technique x device")
    f.add_argument("--devices", default="auto")
    f.add_argument("--workers", type=_workers, default="auto", help="xdist workers: N or auto (default)")
    f.add_argument("--report-dir", default="reports", help="runs go to DIR/<run-id>/ (default reports)")
    f.add_argument("--techniques", default=None, help="comma list of catalog names or specs (default: all)")
    f.add_argument("--profile", default=None, help="Hypothesis profile (default isolation-dev)")
    r = sub.add_parser("repro", help="re-run a stored scenario")
    r.add_argument("file", help="a scenario JSON, or a result record from a report's results/ folder")
    r.add_argument("--technique", default=None, help="spec; required when FILE is a bare scenario")
    r.add_argument("--device", default="cpu")
    return p


def _line(text: str) -> None:
    print(text, flush=True)


# --- list ---------------------------------------------------------------------------------

def cmd_list(args) -> int:
    from .techniques import CATALOG
    _line(f"{'technique':28s} {'seed':8s} {'capability':16s} expected verdict")
    for entry in CATALOG:
        t = entry.technique
        caps = ",".join(sorted(c.value for c in t.capabilities))
        verdict = ", ".join(sorted(t.expected_violations)) or "sound"
        _line(f"{t.name:28s} {t.seed or '-':8s} {caps:16s} {verdict}")
    return EXIT_OK


# --- check --------------------------------------------------------------------------------

def cmd_check(args) -> int:
    from . import devices as devices_mod
    from .check import failure_message, search
    from .invariants import INVARIANTS
    from .loading import load_technique
    from .report import environment, record, write_summary

    technique = load_technique(args.spec)
    devices = devices_mod.resolve(args.devices)
    run_dir = Path(args.report_dir) if args.report_dir else None
    failures = []
    for device in devices:
        for capability in sorted(technique.capabilities, key=lambda c: c.value):
            started = time.monotonic()
            result = search(technique, {capability}, device, args.max_examples, args.budget)
            record(result, technique, time.monotonic() - started, run_dir)
            fired = set(result.failure.invariants) if result.failure else set()
            _line(f"{technique.name} [{capability.value} on {device}]: {result.examples} examples")
            for inv in INVARIANTS:
                if inv == "device-parity" and not device.startswith("cuda"):
                    state = "n/a (needs cuda)"
                else:
                    state = "VIOLATED" if inv in fired else "held"
                _line(f"  {inv:18s} {state}")
            if result.failure:
                failures.append((result, capability))
    for result, capability in failures:
        _line("")
        _line(failure_message(result.failure, {capability}))
    if run_dir is not None:
        write_summary(run_dir, environment({"devices": devices, "technique": args.spec}), complete=True)
        _line(f"report: {run_dir}")
    if failures and technique.expected_violations:
        _line(f"note: {technique.name} is known-bad (expected: {', '.join(sorted(technique.expected_violations))})")
    return EXIT_VIOLATION if failures else EXIT_OK


# --- repro --------------------------------------------------------------------------------

def cmd_repro(args) -> int:
    from .check import check
    from .loading import load_technique
    from .scenario import Scenario

    try:
        data = json.loads(Path(args.file).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{args.file} is not JSON: {exc}") from None
    spec = args.technique
    if isinstance(data, dict) and "scenario" in data and "technique" in data:
        spec = spec or data["technique"]
        data = data["scenario"]
    if spec is None:
        raise UsageError(f"{args.file} holds a bare scenario: name the technique with --technique SPEC")
    try:
        scenario = Scenario.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{args.file} is not a scenario: missing or bad field {exc}") from None
    verdict = check(load_technique(spec), scenario, args.device)
    _line(repr(scenario))
    _line(str(verdict))
    return EXIT_OK if verdict.ok else EXIT_VIOLATION


# --- fuzz ---------------------------------------------------------------------------------

def _fuzz_techniques(text: str | None) -> dict:
    """spec -> technique; loading fails fast, in one line, before any worker starts."""
    from .loading import load_technique
    from .techniques import CATALOG
    specs = [s.strip() for s in text.split(",") if s.strip()] if text else [e.name for e in CATALOG]
    if not specs:
        raise UsageError("--techniques is empty")
    return {spec: load_technique(spec) for spec in specs}


def item_budget(budget: float, workers: int, items: int) -> float:
    """Seconds per item: each worker runs its share of the items one after another, with a
    fifth of the budget kept for start-up, shrinking and the report."""
    return max(1.0, budget * min(workers, items) / max(items, 1) * 0.8)


def cmd_fuzz(args) -> int:
    import pytest

    from . import devices as devices_mod
    from .profiles import PROFILE_ENV, PROFILES
    from .report import point_latest, run_id

    techniques = _fuzz_techniques(args.techniques)
    specs = list(techniques)
    devices = devices_mod.resolve(args.devices)
    if args.profile and args.profile not in PROFILES:
        raise UsageError(f"--profile {args.profile!r} is not one of {', '.join(PROFILES)}")
    workers = (os.cpu_count() or 1) if args.workers == "auto" else int(args.workers)
    items = sum(len(t.capabilities) for t in techniques.values()) * len(devices)
    per_item = item_budget(args.budget, workers, items)
    reports = Path(args.report_dir)
    try:
        run_dir = reports / run_id()
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write reports into {reports}: {exc.strerror or exc}") from None
    point_latest(reports, run_dir)
    _line(f"isolation-suite fuzz: {len(specs)} techniques, {items} items on {','.join(devices)}, "
          f"{workers} worker(s), budget {args.budget:g}s ({per_item:.1f}s per item); report: {run_dir}")
    # the plug-in arrives through its pytest11 entry point unless autoloading is off
    plugin = ["-p", "isolation_suite.pytest_plugin"] if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else []
    argv = plugin + ["-p", "no:cacheprovider", "-p", "no:benchmark", "-q", "--no-header",
            "-o", "addopts=", "-o", "testpaths=", "--rootdir", str(run_dir),
            "--isolation-devices", ",".join(devices), "--isolation-report", str(run_dir.resolve()),
            "--isolation-budget", f"{per_item:.3f}"]
    for spec in specs:
        argv += ["--isolation-technique", spec]
    if args.max_examples:
        argv += ["--isolation-max-examples", str(args.max_examples)]
    # always in xdist workers, even just one: a worker killed by a crashing kernel (a segfault, out of
    # memory) then costs its item an error record, not the whole run and its report
    argv += ["-n", str(max(1, min(workers, items)))]
    os.environ[PROFILE_ENV] = args.profile or os.environ.get(PROFILE_ENV) or "isolation-dev"
    # collect nothing but the gate items: point pytest at an empty folder
    with tempfile.TemporaryDirectory(prefix="isolation-fuzz-") as empty:
        argv.append(empty)
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            code = pytest.main(argv)
        finally:
            signal.signal(signal.SIGTERM, previous)
    summary = json.loads((run_dir / "summary.json").read_text())
    _line(f"report: {run_dir}/report.html ({'PASS' if summary['ok'] else 'FAIL'}"
          f"{'' if summary['complete'] else ', incomplete'})")
    if code == pytest.ExitCode.INTERRUPTED:
        return 130
    return EXIT_OK if code == pytest.ExitCode.OK else EXIT_VIOLATION


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


COMMANDS = {"list": cmd_list, "check": cmd_check, "fuzz": cmd_fuzz, "repro": cmd_repro}


def main(argv: Sequence[str] | None = None) -> int:
    from .devices import DeviceError
    from .loading import TechniqueLoadError

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, TechniqueLoadError, DeviceError) as exc:
        print(f"isolation-suite: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("isolation-suite: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover - python -m isolation_suite.cli
    sys.exit(main())
