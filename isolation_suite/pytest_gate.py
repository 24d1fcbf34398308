"""The gate behind the pytest plug-in: registered by ``pytest_plugin`` only when an ``--isolation-*``
option (or ``ISOLATION_PROFILE``) asks for it, so a pytest session that does not pays nothing.

One test item per item of the plan (technique x capability x device x mode), or one per sweep
group with ``--isolation-sweep``. An item passes when the technique behaves as it declares: no
violation for a sound technique, an expected invariant for a known-bad one.

The run's seed is Hypothesis's own ``--hypothesis-seed`` when given; otherwise a derandomized
profile (``isolation-ci``) keeps its fixed seed per item and any other profile draws one seed for the
run, printed in the header. Under xdist the controller hands the whole plan and the report folder
to every worker as data.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from isolation_suite.engine import runs
from isolation_suite.engine.check import search_line, seed_text
from isolation_suite.engine.plan import Item, Plan
from isolation_suite.engine.profiles import describe
from isolation_suite.engine.settings import PYTEST, Settings, SettingError, settings
from isolation_suite.execution import devices as devices_mod
from isolation_suite.execution.lifetime import exit_with_parent
from isolation_suite.judging.coverage import coverage_line
from isolation_suite.reporting.live import LiveView
from isolation_suite.reporting.report import (ReportDirError, ensure_writable, error_record, has_record,
                                              point_latest, run_id, write_summary)

#: keys of xdist's ``workerinput``: what the controller decided, so every worker agrees
_WORKER_PLAN, _WORKER_REPORT = "isolation_plan", "isolation_report_dir"


def configure(config: pytest.Config, given: dict) -> None:
    """Validate the options, build (or receive) the plan, and register the gate's hooks."""
    try:
        chosen = settings(given, PYTEST)
    except SettingError as exc:
        raise pytest.UsageError(str(exc)) from None
    if not chosen.techniques and not chosen.plan:  # the project's own tests choose a profile only
        os.environ[runs.profiles.PROFILE_ENV] = chosen.chosen_profile
        hypothesis_settings.load_profile(chosen.chosen_profile)
        return
    worker = getattr(config, "workerinput", None)
    devices_mod.configure_worker(os.environ.get("PYTEST_XDIST_WORKER"))
    if worker is not None:
        exit_with_parent()  # a worker whose controller was killed stops now, not after its item
    try:
        runs.use_settings(chosen)
        hypothesis_settings.load_profile(chosen.chosen_profile)  # Hypothesis's header names the real profile
        if worker is not None:
            plan = Plan.from_json(worker[_WORKER_PLAN])
            techniques = runs.load_techniques(plan.specs)
        elif chosen.plan:
            plan, techniques = runs.read_plan(chosen.plan)
        else:
            plan, techniques = runs.plan_for(chosen.but(seed=_hypothesis_seed(config)), PYTEST)
    except runs.PLAN_ERRORS as exc:
        raise pytest.UsageError(str(exc)) from None
    run_dir = Path(worker[_WORKER_REPORT]) if worker is not None and worker.get(_WORKER_REPORT) else None
    gate = Gate(config, chosen, plan, techniques, run_dir)
    config.pluginmanager.register(gate, "isolation-gate")
    if worker is None:
        config.pluginmanager.register(DatabaseWarning(config), "isolation-database-warning")
        if chosen.report_dir:
            gate.start_report(Path(chosen.report_dir))


def _hypothesis_seed(config: pytest.Config) -> int | None:
    given = config.getoption("hypothesis_seed", None)
    if given is None:
        return None
    try:
        return int(given)
    except ValueError:
        raise pytest.UsageError(f"--hypothesis-seed takes an integer here, got {given!r}") from None


def _write_line(config: pytest.Config, text: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        print(text)
        return
    reporter.ensure_newline()  # after the item's progress dot
    reporter.write_line(text)


class DatabaseWarning:
    """On the controller: says once per run, in one line, that the shared example database was lost.
    The searches (in xdist workers or here) go on without it; their reports carry the reason."""

    def __init__(self, config: pytest.Config):
        self.config, self.said = config, False

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        warning = dict(report.user_properties).get("database_warning")
        if warning and not self.said:
            self.said = True
            _write_line(self.config, f"isolation-suite: warning: {warning}")


class Gate:
    """The gate's hooks over one plan."""

    def __init__(self, config: pytest.Config, chosen: Settings, plan: Plan, techniques: dict, run_dir: Path | None):
        self.config, self.settings, self.plan, self.techniques, self.run_dir = config, chosen, plan, techniques, run_dir

    def start_report(self, reports: Path) -> None:
        """The controller (or a run without xdist) owns the run folder and its summary."""
        try:
            ensure_writable(reports)
            self.run_dir = ensure_writable(reports / (self.settings.run_id or run_id()))
            point_latest(reports, self.run_dir)
        except ReportDirError as exc:
            raise pytest.UsageError(str(exc)) from None
        meta = runs.run_meta(self.plan, {"workers": self.config.getoption("numprocesses", None)})
        live = None
        if self.settings.progress:
            live = LiveView(len(self.plan.items), self.plan.deadline, lambda text: _write_line(self.config, text))
        writer = SummaryWriter(self.run_dir, meta, self.plan, self.techniques, live)
        self.config.pluginmanager.register(writer, "isolation-summary-writer")
        writer.write(complete=False)  # a valid report from the first moment, even for a plan with no items

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        """xdist: every worker runs the controller's plan into the controller's run folder."""
        node.workerinput[_WORKER_PLAN] = self.plan.to_json()
        if self.run_dir is not None:
            node.workerinput[_WORKER_REPORT] = str(self.run_dir)

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        seed = self.plan.seed
        lines = [f"isolation-suite: profile {describe(self.plan.profile, self.plan.timeout)}; {seed_text(seed)}"
                 + (f" (replay with --hypothesis-seed {seed})" if seed is not None else "")]
        if self.run_dir is not None:
            lines.append(f"isolation-suite: report {self.run_dir}")
        return lines

    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config, items: list) -> None:
        common = dict(plan=self.plan, techniques=self.techniques, run_dir=self.run_dir)
        if self.plan.sweep:
            for name, members in self.plan.groups().items():
                items.append(SweepItem.from_parent(session, name=name, members=members, **common))
            return
        for item in self.plan.items:
            items.append(IsolationItem.from_parent(session, name=item.name, members=[item], **common))

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if isinstance(item, _GateItem) and item.device.startswith("cuda") and not devices_mod.cuda_available():
            pytest.skip("CUDA is not available on this machine")


class IsolationGateError(Exception):
    """An item's outcome did not match the technique's declaration."""


class _GateItem(pytest.Item):
    """Items of one capability, device and mode, judged together (a search: one; a sweep: many)."""

    def __init__(self, *, plan: Plan, members: list[Item], techniques: dict, run_dir: Path | None, **kwargs):
        super().__init__(**kwargs)
        self.plan, self.members, self.techniques, self.run_dir = plan, members, techniques, run_dir
        self.device, self.mode = members[0].device, members[0].mode
        self.add_marker("isolation")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, IsolationGateError):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"isolation gate: {self.name}"


class IsolationItem(_GateItem):
    def runtest(self) -> None:
        try:
            judged = runs.run_item(self.plan, self.members[0], self.techniques, self.run_dir)
        except runs.NotRun as exc:
            raise IsolationGateError(str(exc)) from None
        result = judged.result
        # shown by Hypothesis's own plug-in under --hypothesis-show-statistics
        self.hypothesis_statistics = (f"{self.nodeid}:\n  - isolation-suite: {search_line(result)}\n"
                                      + (result.statistics or "  - no example was generated (a trigger example "
                                         "decided the item)"))
        if judged.status == "n/a":
            pytest.skip(f"not applicable: {result.not_applicable}")
        self.user_properties += [("examples", result.examples), ("explicit_examples", result.explicit),
                                 ("shrink_examples", result.shrink_examples), ("seed", result.seed)]
        if result.coverage:  # a user's model: what the judged examples reached
            self.user_properties += [("coverage_examples", result.coverage_examples),
                                     ("coverage", coverage_line(result.coverage))]
        if result.database_warning:
            self.user_properties.append(("database_warning", result.database_warning))
        if judged.failure is not None:
            raise IsolationGateError(judged.failure)


class SweepItem(_GateItem):
    """The gate items of one capability, device and mode, judged by one sweep; one record per item."""

    def runtest(self) -> None:
        try:
            done, judged = runs.run_sweep(self.plan, self.members, self.techniques, self.run_dir)
        except runs.NotRun as exc:
            raise IsolationGateError(str(exc)) from None
        self.user_properties += [("scenarios", done.scenarios), ("references", done.references),
                                 ("checks", done.checks), ("seed", done.seed)]
        # shown by Hypothesis's own plug-in under --hypothesis-show-statistics
        self.hypothesis_statistics = (f"{self.nodeid}:\n  - isolation-suite sweep: {done.scenarios} scenarios, "
                                      f"{done.references} references, {done.checks} checks\n"
                                      + "\n".join(f"  - {r.technique}: {search_line(r)}" for r in done.results))
        failures = [f"{j.item.name}: {j.failure}" for j in judged if j.failure is not None]
        if failures:
            raise IsolationGateError("\n\n".join(failures))
        if all(j.status == "n/a" for j in judged):
            pytest.skip("not applicable: " + "; ".join(r.not_applicable for r in done.results))

    def reportinfo(self):
        return self.path, None, f"isolation sweep: {self.name}"


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

    def __init__(self, run_dir: Path, meta: dict, plan: Plan, techniques: dict, live: LiveView | None = None):
        self.run_dir, self.meta, self.plan, self.techniques, self.live = run_dir, meta, plan, techniques, live
        self.by_name = {item.name: [item] for item in plan.items}
        if plan.sweep:
            self.by_name.update(plan.groups())
        self.started: set[str] = set()
        self.finished: set[str] = set()

    def _items(self, nodeid: str) -> list[Item]:
        return self.by_name.get(nodeid.rpartition("::")[2], [])

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        self.started.update(i.name for i in self._items(nodeid))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        items = self._items(report.nodeid)
        if report.when == "teardown" or report.when == "???" or (report.when == "setup" and report.skipped):
            self.finished.update(i.name for i in items)
        if report.when not in ("call", "???"):
            return
        if report.failed:
            for item in items:
                technique = self.techniques[item.spec]
                if not has_record(self.run_dir, technique, [item.capability], item.device, item.mode):
                    error_record(self.run_dir, technique, [item.capability], item.device, _error_line(report),
                                 item.spec, mode=item.mode, plan=self.plan.fingerprint)
        self.write(complete=False)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        # interrupted (Ctrl-C/SIGTERM) runs still leave a valid summary, marked incomplete
        self.write(complete=exitstatus in (0, 1, pytest.ExitCode.NO_TESTS_COLLECTED) and
                   len(self.finished) == len(self.plan.items),
                   interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)
        if self.live is not None:
            self.live.close()

    def write(self, complete: bool, interrupted: bool = False) -> None:
        names = sorted(item.name for item in self.plan.items)
        progress = {"finished": [n for n in names if n in self.finished],
                    "running": [n for n in names if n in self.started and n not in self.finished],
                    "not_started": [n for n in names if n not in self.started and n not in self.finished]}
        summary = write_summary(self.run_dir, self.meta, complete=complete, progress=progress, interrupted=interrupted)
        if self.live is not None:
            self.live.update(summary["results"])
