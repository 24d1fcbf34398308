"""pytest plug-in: ``--isolation-technique pkg.mod:attr`` turns any pytest run into the isolation gate.

One test item per technique x capability x device. An item passes when the
technique behaves as it declares: no violation for a sound technique, an
expected invariant for a known-bad one. Works in an empty folder.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import settings

from . import devices as devices_mod
from .profiles import PROFILE_ENV, PROFILES

_TECHNIQUES = pytest.StashKey[list]()
_DEVICES = pytest.StashKey[list]()
_REPORT = pytest.StashKey[object]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolation", "gradient isolation gate (isolation-suite)")
    group.addoption("--isolation-technique", action="append", default=[], metavar="SPEC",
                    help="technique to gate: 'pkg.module:attr' or a catalog name (repeatable)")
    group.addoption("--isolation-devices", default="auto", metavar="LIST",
                    help="comma list of cpu, cuda, cuda:N, or auto (cpu plus cuda when present; default)")
    group.addoption("--isolation-report", default=None, metavar="DIR", help="write a report into DIR")
    group.addoption("--isolation-max-examples", type=int, default=None, metavar="N",
                    help="examples per item (default: the Hypothesis profile's)")
    group.addoption("--isolation-budget", type=float, default=None, metavar="SECONDS",
                    help="time budget per item")
    group.addoption("--isolation-profile", default=None, choices=PROFILES,
                    help=f"Hypothesis profile to load (also: ${PROFILE_ENV})")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "isolation: an isolation-suite gate item")
    devices_mod.configure_worker(os.environ.get("PYTEST_XDIST_WORKER"))
    profile = config.getoption("isolation_profile") or os.environ.get(PROFILE_ENV)
    if profile:
        if profile not in PROFILES:
            raise pytest.UsageError(f"{PROFILE_ENV}={profile!r} is not one of {', '.join(PROFILES)}")
        os.environ[PROFILE_ENV] = profile
        settings.load_profile(profile)
    specs = config.getoption("isolation_technique")
    if not specs:
        return
    from .loading import TechniqueLoadError, load_technique
    try:
        config.stash[_TECHNIQUES] = [(spec, load_technique(spec)) for spec in specs]
        config.stash[_DEVICES] = devices_mod.resolve(config.getoption("isolation_devices"))
    except (TechniqueLoadError, devices_mod.DeviceError) as exc:
        raise pytest.UsageError(str(exc)) from None
    budget = config.getoption("isolation_budget")
    if budget is not None and budget <= 0:
        raise pytest.UsageError(f"--isolation-budget must be positive, got {budget}")
    report_dir = config.getoption("isolation_report")
    if report_dir:
        report_dir = Path(report_dir)
        config.stash[_REPORT] = report_dir
        if not hasattr(config, "workerinput"):  # the controller (or a run without xdist) owns the summary
            from .report import environment, write_summary
            meta = environment({"devices": config.stash[_DEVICES], "profile": os.environ.get(PROFILE_ENV)
                                or settings._current_profile, "budget": budget,
                                "max_examples": config.getoption("isolation_max_examples"),
                                "techniques": specs, "workers": config.getoption("numprocesses", None)})
            write_summary(report_dir, meta)
            items = {item_name(t, c, d): (t, c, d) for _, t in config.stash[_TECHNIQUES]
                     for d in config.stash[_DEVICES] for c in t.capabilities}
            config.pluginmanager.register(SummaryWriter(report_dir, meta, items), "isolation-summary-writer")


class IsolationGateError(Exception):
    """An item's outcome did not match the technique's declaration."""


class IsolationItem(pytest.Item):
    def __init__(self, *, spec, technique, capability, device, **kwargs):
        super().__init__(**kwargs)
        self.spec, self.technique, self.capability, self.device = spec, technique, capability, device
        self.add_marker("isolation")

    def runtest(self) -> None:
        from .check import failure_message, search
        from .report import outcome, record
        cfg = self.config
        started = time.monotonic()
        result = search(self.technique, {self.capability}, self.device,
                        cfg.getoption("isolation_max_examples"), cfg.getoption("isolation_budget"))
        record(result, self.technique, time.monotonic() - started, cfg.stash.get(_REPORT, None))
        status, passed = outcome(result, self.technique.expected_violations)
        self.user_properties.append(("examples", result.examples))
        if passed:
            return
        if status == "missed":
            raise IsolationGateError(
                f"{self.technique.name} declares expected violations {sorted(self.technique.expected_violations)} "
                f"but none was found in {result.examples} examples on {self.device}")
        message = failure_message(result.failure, {self.capability})
        if self.technique.expected_violations:
            message = (f"unexpected invariant (declared: {sorted(self.technique.expected_violations)})\n"
                       + message)
        raise IsolationGateError(message)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, IsolationGateError):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"isolation gate: {self.name}"


def item_name(technique, capability, device: str) -> str:
    return f"{technique.name}[{capability.value}-{device}]"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    for spec, technique in config.stash.get(_TECHNIQUES, []):
        for device in config.stash[_DEVICES]:
            for capability in sorted(technique.capabilities, key=lambda c: c.value):
                items.append(IsolationItem.from_parent(
                    session, name=item_name(technique, capability, device), spec=spec,
                    technique=technique, capability=capability, device=device))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if isinstance(item, IsolationItem) and item.device.startswith("cuda") and not devices_mod.cuda_available():
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

    def __init__(self, report_dir: Path, meta: dict, items: dict):
        self.report_dir, self.meta, self.items = report_dir, meta, items

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when not in ("call", "???"):
            return
        gate_item = self.items.get(report.nodeid.rpartition("::")[2])
        if report.failed and gate_item is not None:
            from .report import error_record, has_record
            technique, capability, device = gate_item
            if not has_record(self.report_dir, technique, [capability.value], device):
                error_record(self.report_dir, technique, [capability.value], device, _error_line(report))
        self._write(complete=False)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        # interrupted (Ctrl-C/SIGTERM) runs still leave a valid summary, marked incomplete
        self._write(complete=exitstatus in (0, 1))

    def _write(self, complete: bool) -> None:
        from .report import write_summary
        write_summary(self.report_dir, self.meta, complete=complete)
