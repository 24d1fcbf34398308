"""pytest plug-in: ``--isolation-technique pkg.mod:attr`` turns any pytest run into the isolation gate.

One test item per technique x capability x device. An item passes when the
technique behaves as it declares: no violation for a sound technique, an
expected invariant for a known-bad one. Works in an empty folder.

The run's seed is Hypothesis's own ``--hypothesis-seed`` when given; otherwise a
derandomized profile (``isolation-ci``) keeps its fixed seed per item and any other
profile draws one seed for the run, printed in the header. Under xdist the controller
hands the seed and the report folder to every worker.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from isolation_suite.execution import devices as devices_mod
from isolation_suite.engine.profiles import PROFILE_ENV, PROFILES

_TECHNIQUES = pytest.StashKey[list]()
_DEVICES = pytest.StashKey[list]()
_MODES = pytest.StashKey[tuple]()
_REPORT = pytest.StashKey[object]()
_SHARD = pytest.StashKey[object]()
_SEED = pytest.StashKey[object]()
_PROFILE = pytest.StashKey[str]()
#: keys of xdist's ``workerinput``: what the controller decided, so every worker agrees
_WORKER_SEED, _WORKER_REPORT = "isolation_seed", "isolation_report_dir"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolation", "gradient isolation gate (isolation-suite)")
    group.addoption("--isolation-technique", action="append", default=[], metavar="SPEC",
                    help="technique to gate: 'pkg.module:attr' or a catalog name (repeatable)")
    group.addoption("--isolation-model", default=None, metavar="PKG.MOD:FACTORY",
                    help="judge the techniques on your own model: a zero-argument factory returning "
                         "(model, example_inputs[, loss])")
    group.addoption("--isolation-shard", default=None, metavar="I/N",
                    help="run only shard I of N of the items (deterministic, balanced; see isolation-suite merge)")
    group.addoption("--isolation-sweep", action="store_true", default=False,
                    help="judge the items of each capability and device with one sweep (shared scenarios and "
                         "references) instead of one search per item; the report still has one record per item")
    group.addoption("--isolation-progress", action="store_true", default=False,
                    help="show the run's progress after every item (a bar on a terminal, plain lines otherwise)")
    group.addoption("--isolation-devices", default="auto", metavar="LIST",
                    help="comma list of cpu, cuda, cuda:N, or auto (cpu plus cuda when present; default)")
    group.addoption("--isolation-modes", default=None, metavar="LIST",
                    help="comma list of execution modes: eager, checkpoint, compile, autocast, ddp, or all "
                         "(every mode the devices run; default: $ISOLATION_MODES, else all)")
    group.addoption("--isolation-report", default=None, metavar="DIR",
                    help="write a report into DIR/<run-id>/ (DIR/latest points at it)")
    group.addoption("--isolation-run-id", default=None, metavar="ID",
                    help="the report's run id (default: date, time and process id)")
    group.addoption("--isolation-max-examples", type=int, default=None, metavar="N",
                    help="generated examples per item, at most (default: the Hypothesis profile's)")
    group.addoption("--isolation-budget", type=float, default=None, metavar="SECONDS",
                    help="time budget per item, shrinking included, times its mode's weight (compile 4, ddp 2)")
    group.addoption("--isolation-deadline", type=float, default=None, metavar="EPOCH",
                    help="no item runs past this time (seconds since the epoch); items not started by then "
                         "are recorded as not run")
    group.addoption("--isolation-timeout", type=float, default=None, metavar="SECONDS",
                    help="seconds one training run of the technique may take before it is stopped "
                         "(default: the profile's)")
    group.addoption("--isolation-profile", default=None, choices=PROFILES,
                    help=f"Hypothesis profile to load (also: ${PROFILE_ENV})")
    group.addoption("--isolation-database", default=None, metavar="SPEC",
                    help="where failing examples are kept and replayed from: a directory, 'none', or "
                         "redis://HOST:PORT/DB shared by many machines (also: $ISOLATION_DATABASE)")
    group.addoption("--isolation-database-readonly", action="store_true", default=False,
                    help="replay the database's failures but never write to it (with a Redis URL the local "
                         "directory stays writable; also: ISOLATION_DATABASE_READONLY=1)")


def _modes(config: pytest.Config) -> tuple[str, ...]:
    from isolation_suite.engine.check import modes_for
    try:
        return modes_for(config.getoption("isolation_modes"), config.stash[_DEVICES])
    except ValueError as exc:
        raise pytest.UsageError(f"--isolation-modes: {exc}") from None


def _gate_seed(config: pytest.Config) -> int | None:
    """The controller's choice: ``--hypothesis-seed``, else None (derandomized) or a drawn seed."""
    given = config.getoption("hypothesis_seed", None)
    if given is not None:
        try:
            return int(given)
        except ValueError:
            raise pytest.UsageError(f"--hypothesis-seed takes an integer here, got {given!r}") from None
    from isolation_suite.engine.check import run_seed
    return run_seed(config.getoption("isolation_max_examples"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "isolation: an isolation-suite gate item")
    devices_mod.configure_worker(os.environ.get("PYTEST_XDIST_WORKER"))
    specs = config.getoption("isolation_technique")
    profile = config.getoption("isolation_profile") or os.environ.get(PROFILE_ENV)
    if profile and profile not in PROFILES:
        raise pytest.UsageError(f"{PROFILE_ENV}={profile!r} is not one of {', '.join(PROFILES)}")
    if not specs:
        if profile:  # the project's own tests choose a profile without gating anything
            os.environ[PROFILE_ENV] = profile
            settings.load_profile(profile)
        return
    profile = profile or "isolation-dev"
    os.environ[PROFILE_ENV] = profile
    _use_database(config)
    settings.load_profile(profile)  # so Hypothesis's own header and statistics name the real profile
    config.stash[_PROFILE] = profile
    from isolation_suite.engine.loading import TechniqueLoadError, load_technique
    from isolation_suite.model.factory import ModelFactoryError, factory_tree
    from isolation_suite.reporting.shards import Shard, ShardError
    try:
        config.stash[_TECHNIQUES] = [(spec, load_technique(spec)) for spec in specs]
        config.stash[_DEVICES] = devices_mod.resolve(config.getoption("isolation_devices"))
        config.stash[_MODES] = _modes(config)
        if config.getoption("isolation_model"):
            factory_tree(config.getoption("isolation_model"))
        shard = config.getoption("isolation_shard")
        config.stash[_SHARD] = Shard.parse(shard) if shard else None
    except (TechniqueLoadError, devices_mod.DeviceError, ModelFactoryError, ShardError) as exc:
        raise pytest.UsageError(str(exc)) from None
    budget = config.getoption("isolation_budget")
    if budget is not None and budget <= 0:
        raise pytest.UsageError(f"--isolation-budget must be positive, got {budget}")
    max_examples = config.getoption("isolation_max_examples")
    if max_examples is not None and max_examples <= 0:
        raise pytest.UsageError(f"--isolation-max-examples must be positive, got {max_examples}")
    timeout = config.getoption("isolation_timeout")
    if timeout is not None and timeout <= 0:
        raise pytest.UsageError(f"--isolation-timeout must be positive, got {timeout}")
    worker = getattr(config, "workerinput", None)
    if worker is not None:  # an xdist worker: the controller has decided
        config.stash[_SEED] = worker.get(_WORKER_SEED)
        report = worker.get(_WORKER_REPORT)
        if report:
            config.stash[_REPORT] = Path(report)
        return
    config.stash[_SEED] = _gate_seed(config)
    config.pluginmanager.register(DatabaseWarning(config), "isolation-database-warning")
    report_dir = config.getoption("isolation_report")
    if report_dir:
        _start_report(config, Path(report_dir), budget, max_examples, specs)


def _use_database(config: pytest.Config) -> None:
    """``--isolation-database`` / ``--isolation-database-readonly`` (else the environment) become the
    profiles' database; a malformed spec is a usage error before anything runs."""
    from isolation_suite.engine.database import DatabaseSpecError
    from isolation_suite.engine.profiles import DATABASE_ENV, READONLY_ENV, register_profiles
    if config.getoption("isolation_database") is not None:
        os.environ[DATABASE_ENV] = config.getoption("isolation_database")
    if config.getoption("isolation_database_readonly"):
        os.environ[READONLY_ENV] = "1"
    try:
        register_profiles()
    except DatabaseSpecError as exc:
        raise pytest.UsageError(str(exc)) from None


class DatabaseWarning:
    """On the controller: says once per run, in one line, that the shared example database was lost.
    The searches (in xdist workers or here) go on without it; their reports carry the reason."""

    def __init__(self, config: pytest.Config):
        self.config, self.said = config, False

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        warning = dict(report.user_properties).get("database_warning")
        if warning and not self.said:
            self.said = True
            line = f"isolation-suite: warning: {warning}"
            reporter = self.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is None:
                print(line)
                return
            reporter.ensure_newline()
            reporter.write_line(line)


def _start_report(config: pytest.Config, reports: Path, budget, max_examples, specs) -> None:
    """The controller (or a run without xdist) owns the run folder and its summary."""
    from isolation_suite.engine.check import seed_text
    from isolation_suite.reporting.report import ReportDirError, ensure_writable, environment, point_latest, run_id
    try:
        ensure_writable(reports)
        run_dir = ensure_writable(reports / (config.getoption("isolation_run_id") or run_id()))
        point_latest(reports, run_dir)
    except ReportDirError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_REPORT] = run_dir
    from isolation_suite.engine.check import search_settings
    from isolation_suite.engine.profiles import describe_database
    seed = config.stash[_SEED]
    meta = environment({"devices": config.stash[_DEVICES], "profile": config.stash[_PROFILE], "seed": seed,
                        "database": describe_database(config.stash[_PROFILE]),
                        "seed_text": seed_text(seed), "budget": budget,
                        "max_examples": search_settings(max_examples).max_examples,
                        "techniques": specs, "model": config.getoption("isolation_model"),
                        "shard": str(config.stash[_SHARD]) if config.stash.get(_SHARD, None) else None,
                        "sweep": bool(config.getoption("isolation_sweep")),
                        "workers": config.getoption("numprocesses", None)})
    items = _items(config)
    live = None
    if config.getoption("isolation_progress"):
        from isolation_suite.reporting.live import LiveView
        reporter = config.pluginmanager.get_plugin("terminalreporter")

        def write_line(text: str) -> None:
            if reporter is None:
                print(text)
                return
            reporter.ensure_newline()  # after the item's progress dot
            reporter.write_line(text)
        live = LiveView(len(items), config.getoption("isolation_deadline"), write_line)
    groups = _sweep_groups(items) if config.getoption("isolation_sweep") else {}
    config.pluginmanager.register(SummaryWriter(run_dir, meta, items, live, groups), "isolation-summary-writer")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist: every worker uses the controller's seed and run folder."""
    config = node.config
    if _SEED in config.stash:
        node.workerinput[_WORKER_SEED] = config.stash[_SEED]
    if _REPORT in config.stash:
        node.workerinput[_WORKER_REPORT] = str(config.stash[_REPORT])


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    if _TECHNIQUES not in config.stash:
        return None
    from isolation_suite.engine.check import seed_text
    from isolation_suite.engine.profiles import describe
    seed = config.stash.get(_SEED, None)
    lines = [f"isolation-suite: profile {describe(config.stash[_PROFILE], config.getoption('isolation_timeout'))}; "
             f"{seed_text(seed)}"
             + (f" (replay with --hypothesis-seed {seed})" if seed is not None else "")]
    if _REPORT in config.stash:
        lines.append(f"isolation-suite: report {config.stash[_REPORT]}")
    return lines


class IsolationGateError(Exception):
    """An item's outcome did not match the technique's declaration."""


class _GateItem(pytest.Item):
    """What the search item and the sweep item share: a capability, a device, a mode, and how a
    search's result against a technique's declaration becomes the item's failure text."""

    capability: Any
    device: str
    mode: str

    def gate_failure(self, technique, result) -> str | None:
        """None when ``result`` is what ``technique`` declares for this item's mode (``n/a`` too),
        else why not: an expected violation missed, or an invariant it does not declare."""
        from isolation_suite.engine.check import failure_message
        from isolation_suite.reporting.report import outcome, reason
        expected = technique.expected_in(self.mode)
        status, passed = outcome(result, expected)
        if passed:
            return None
        where = f" on {self.device}" + ("" if self.mode == "eager" else f" in {self.mode} mode")
        if status == "missed":
            return (f"{technique.name} declares expected violations {sorted(expected)} but "
                    + reason(status, result, expected) + where)
        message = failure_message(result.failure, {self.capability}, result)
        return f"unexpected invariant (declared{where}: {sorted(expected)})\n" + message if expected else message

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, IsolationGateError):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)


class IsolationItem(_GateItem):
    def __init__(self, *, spec, technique, capability, device, mode="eager", **kwargs):
        super().__init__(**kwargs)
        self.spec, self.technique, self.capability, self.device = spec, technique, capability, device
        self.mode = mode
        self.add_marker("isolation")

    def runtest(self) -> None:
        from isolation_suite.engine.check import search, search_line
        from isolation_suite.judging.coverage import coverage_line
        from isolation_suite.reporting.report import outcome, reason, record
        cfg = self.config
        report_dir = cfg.stash.get(_REPORT, None)
        budget = _budget_or_not_run(self, [(self.spec, self.technique)])
        started = time.monotonic()
        result = search(self.technique, {self.capability}, self.device, cfg.getoption("isolation_max_examples"),
                        budget, seed=cfg.stash.get(_SEED, None), timeout=cfg.getoption("isolation_timeout"),
                        model=cfg.getoption("isolation_model"), mode=self.mode)
        record(result, self.technique, time.monotonic() - started, report_dir, spec=self.spec)
        # shown by Hypothesis's own plug-in under --hypothesis-show-statistics
        self.hypothesis_statistics = (f"{self.nodeid}:\n  - isolation-suite: {search_line(result)}\n"
                                      + (result.statistics or "  - no example was generated (a trigger example "
                                         "decided the item)"))
        expected = self.technique.expected_in(self.mode)
        status, passed = outcome(result, expected)
        if status == "n/a":
            pytest.skip(reason(status, result, expected))
        self.user_properties += [("examples", result.examples), ("explicit_examples", result.explicit),
                                 ("shrink_examples", result.shrink_examples), ("seed", result.seed)]
        if result.coverage:  # a user's model: what the judged examples reached
            self.user_properties += [("coverage_examples", result.coverage_examples),
                                     ("coverage", coverage_line(result.coverage))]
        if result.database_warning:
            self.user_properties.append(("database_warning", result.database_warning))
        if not passed:
            raise IsolationGateError(self.gate_failure(self.technique, result))

    def reportinfo(self):
        return self.path, None, f"isolation gate: {self.name}"


def _budget_or_not_run(item, members: list[tuple[str, object]]) -> float | None:
    """Seconds for ``item`` (judging ``members``, ``(spec, technique)`` pairs, one after another):
    ``--isolation-budget`` per member times the mode's weight (``ModeInfo.budget_weight``), and never
    past the run's deadline. Once the deadline has passed, each member gets a ``not-run`` record
    and the item fails: an item that never ran never passes."""
    from isolation_suite.execution.modes import MODE_BY_KIND
    from isolation_suite.reporting.report import error_record
    cfg = item.config
    budget, deadline = cfg.getoption("isolation_budget"), cfg.getoption("isolation_deadline")
    if budget is not None:
        budget *= MODE_BY_KIND[item.mode].budget_weight * len(members)
    if deadline is None:
        return budget
    left = deadline - time.time()
    if left <= 0:
        message = f"not run: the run's time budget was spent before {item.name} started"
        report_dir = cfg.stash.get(_REPORT, None)
        if report_dir is not None:
            for spec, technique in members:
                error_record(report_dir, technique, [item.capability.value], item.device, message, spec,
                             outcome="not-run", mode=item.mode)
        raise IsolationGateError(message)
    return left if budget is None else min(budget, left)


def item_name(technique, capability, device: str, mode: str = "eager") -> str:
    return f"{technique.name}[{capability.value}-{device}" + ("" if mode == "eager" else f"-{mode}") + "]"


def sweep_name(capability, device: str, mode: str = "eager") -> str:
    return f"sweep[{capability.value}-{device}" + ("" if mode == "eager" else f"-{mode}") + "]"


def _sweep_groups(items: dict[str, tuple]) -> dict[str, list[str]]:
    """Sweep item name -> the gate items it judges (one sweep per capability, device and mode), the
    largest groups first (xdist hands items out in this order)."""
    groups: dict[str, list[str]] = {}
    for name, (spec, technique, capability, device, mode) in sorted(items.items()):
        groups.setdefault(sweep_name(capability, device, mode), []).append(name)
    return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))


class SweepItem(_GateItem):
    """The gate items of one capability, device and mode, judged by one sweep; one record per item."""

    def __init__(self, *, members, capability, device, mode="eager", **kwargs):
        super().__init__(**kwargs)
        self.members, self.capability, self.device = members, capability, device  # [(name, spec, technique)]
        self.mode = mode
        self.add_marker("isolation")

    def runtest(self) -> None:
        from isolation_suite.engine.check import search_line
        from isolation_suite.reporting.report import outcome, record
        from isolation_suite.engine.sweep import sweep
        cfg = self.config
        report_dir = cfg.stash.get(_REPORT, None)
        budget = _budget_or_not_run(self, [(spec, technique) for _, spec, technique in self.members])
        done = sweep([t for _, _, t in self.members], {self.capability}, self.device,
                     cfg.getoption("isolation_max_examples"), budget, seed=cfg.stash.get(_SEED, None),
                     timeout=cfg.getoption("isolation_timeout"), model=cfg.getoption("isolation_model"),
                     mode=self.mode)
        failures, judged = [], 0
        for (name, spec, technique), result in zip(self.members, done.results):
            record(result, technique, done.seconds, report_dir, spec=spec, sweep=self.name)
            judged += outcome(result, technique.expected_in(self.mode))[0] != "n/a"
            failure = self.gate_failure(technique, result)
            if failure is not None:
                failures.append(f"{name}: {failure}")
        self.user_properties += [("scenarios", done.scenarios), ("references", done.references),
                                 ("checks", done.checks), ("seed", done.seed)]
        # shown by Hypothesis's own plug-in under --hypothesis-show-statistics
        self.hypothesis_statistics = (f"{self.nodeid}:\n  - isolation-suite sweep: {done.scenarios} scenarios, "
                                      f"{done.references} references, {done.checks} checks\n"
                                      + "\n".join(f"  - {r.technique}: {search_line(r)}" for r in done.results))
        if failures:
            raise IsolationGateError("\n\n".join(failures))
        if not judged:
            pytest.skip("not applicable: " + "; ".join(r.not_applicable for r in done.results))

    def reportinfo(self):
        return self.path, None, f"isolation sweep: {self.name}"


def _items(config: pytest.Config) -> dict[str, tuple]:
    """The gate items of this run (of this shard, with ``--isolation-shard``), by name."""
    every = {item_name(t, c, d, m): (spec, t, c, d, m) for spec, t in config.stash.get(_TECHNIQUES, [])
             for d in config.stash[_DEVICES] for m in config.stash[_MODES]
             for c in sorted(t.capabilities, key=lambda c: c.value)}
    shard = config.stash.get(_SHARD, None)
    return every if shard is None else {name: every[name] for name in shard.select(every)}


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    gate = _items(config)
    if config.getoption("isolation_sweep", False):
        for name, members in _sweep_groups(gate).items():
            _, _, capability, device, mode = gate[members[0]]
            items.append(SweepItem.from_parent(session, name=name, capability=capability, device=device, mode=mode,
                                               members=[(m, gate[m][0], gate[m][1]) for m in members]))
        return
    for name, (spec, technique, capability, device, mode) in gate.items():
        items.append(IsolationItem.from_parent(session, name=name, spec=spec, technique=technique,
                                               capability=capability, device=device, mode=mode))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if isinstance(item, (IsolationItem, SweepItem)) and item.device.startswith("cuda") \
            and not devices_mod.cuda_available():
        pytest.skip("CUDA is not available on this machine")


def _error_line(report: pytest.TestReport) -> str:
    """The exception line of a failed report (``E   ...``), or its last line (a crashed worker's)."""
    lines = [line for line in str(report.longrepr).strip().splitlines() if line.strip()]
    raised = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (raised or lines or ["failed without a verdict"])[-1]


class SummaryWriter:
    """Rebuilds the report summary on the controller after every finished item, and at the end.

    An item that failed without leaving its record (its xdist worker crashed: ``when == "???"``;
    or the harness raised) gets an error record, so the report can never pass without it.
    """

    def __init__(self, report_dir: Path, meta: dict, items: dict, live=None, groups: dict | None = None):
        self.report_dir, self.meta, self.items, self.live = report_dir, meta, items, live
        self.groups = groups or {}  # a sweep item's name -> the gate items it judges
        self.started: set[str] = set()
        self.finished: set[str] = set()

    def _names(self, nodeid: str) -> list[str]:
        name = nodeid.rpartition("::")[2]
        return [n for n in self.groups.get(name, [name]) if n in self.items]

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        self.started.update(self._names(nodeid))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        names = self._names(report.nodeid)
        if report.when == "teardown" or report.when == "???" or (report.when == "setup" and report.skipped):
            self.finished.update(names)
        if report.when not in ("call", "???"):
            return
        if report.failed:
            from isolation_suite.reporting.report import error_record, has_record
            for name in names:
                spec, technique, capability, device, mode = self.items[name]
                if not has_record(self.report_dir, technique, [capability.value], device, mode):
                    error_record(self.report_dir, technique, [capability.value], device, _error_line(report), spec,
                                 mode=mode)
        self._write(complete=False)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        # interrupted (Ctrl-C/SIGTERM) runs still leave a valid summary, marked incomplete
        self._write(complete=exitstatus in (0, 1), interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)
        if self.live is not None:
            self.live.close()

    def _write(self, complete: bool, interrupted: bool = False) -> None:
        from isolation_suite.reporting.report import write_summary
        every = sorted(self.items)
        progress = {"finished": [n for n in every if n in self.finished],
                    "running": [n for n in every if n in self.started and n not in self.finished],
                    "not_started": [n for n in every if n not in self.started and n not in self.finished]}
        summary = write_summary(self.report_dir, self.meta, complete=complete, progress=progress,
                                interrupted=interrupted)
        if self.live is not None:
            self.live.update(summary["results"])
