"""The command line: exit codes, one-line errors, check/list/repro, and a small fuzz run with its report."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import isolation_suite as iso
from isolation_suite.cli import main

sys.path.insert(0, str(Path(__file__).parent))
import hostile as hostile_mod  # noqa: E402

PLUGIN = textwrap.dedent('''
    import torch
    import isolation_suite as iso

    class Sound(iso.Technique):
        name = "mine.sound"
        capabilities = frozenset({iso.Capability.PASS_THROUGH})
        def call(self, module, args, role):
            if role is iso.Role.PASS_THROUGH:
                return torch.func.functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, args)
            return module(*args)

    class Broken(iso.Technique):
        name = "mine.broken"
        capabilities = frozenset({iso.Capability.PASS_THROUGH})
        def call(self, module, args, role):
            if role is iso.Role.PASS_THROUGH:
                with torch.no_grad():
                    return module(*args)
            return module(*args)

    NotATechnique = 42

    class StringCapabilities(iso.Technique):
        name = "mine.strings"
        capabilities = frozenset({"FREEZE_MODULE"})

    class CatalogName(Sound):
        name = "functional_detach"

    class Misspelt(Broken):
        name = "mine.misspelt"
        expected_violations = frozenset({"gradient-flow"})
''')


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "mytech.py").write_text(PLUGIN)
    (tmp_path / "brokenplugin.py").write_text("raise ImportError('missing dependency foo')\n")
    (tmp_path / "afile").write_text("")  # a report folder below a file can never be created
    (tmp_path / "summary.json").write_text('{"meta": {}, "results": []}')  # a run's summary, not a record
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_list_shows_every_row(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "backward_hook_zero_grad" in out and "FREEZE_ELEMENTS" in out and "sound" in out


def test_check_sound_exits_0_and_broken_exits_1(plugin_dir, capsys):
    assert main(["check", "mytech:Sound", "--max-examples", "10"]) == 0
    out = capsys.readouterr().out
    assert "gradient-flows     held" in out
    assert main(["check", "mytech:Broken", "--max-examples", "30", "--report-dir", "rep"]) == 1
    out = capsys.readouterr().out
    assert "gradient-flows     VIOLATED" in out and "minimal scenario:" in out
    summary = json.loads((plugin_dir / "rep" / "summary.json").read_text())
    assert summary["ok"] is False and summary["results"][0]["repro"].startswith("repro/")


@pytest.mark.parametrize("argv, needle", [
    (["check", "nope"], "unknown technique 'nope'"),
    (["check", "no.such.module:X"], "cannot import module 'no.such.module'"),
    (["check", "mytech:Missing"], "has no attribute 'Missing'"),
    (["check", "mytech:NotATechnique"], "not a Technique"),
    (["check", "brokenplugin:X"], "ImportError: missing dependency foo"),
    (["check", "mytech:StringCapabilities"], "use isolation_suite.Capability members"),
    (["check", "mytech:Sound", "--devices", "tpu"], "unknown device 'tpu'"),
    (["check", "mytech:Sound", "--max-examples", "-1"], "must be positive"),
    (["fuzz", "--budget", "-5"], "must be positive"),
    (["fuzz", "--workers", "zero"], "--workers"),
    (["fuzz", "--techniques", "bogus"], "unknown technique 'bogus'"),
    (["fuzz", "--techniques", "mytech:CatalogName,functional_detach"],
     "mytech:CatalogName and functional_detach are both named 'functional_detach'"),
    (["check", "mytech:Misspelt"], "expects violations of 'gradient-flow', which are not invariant ids"),
    (["repro", "does-not-exist.json", "--technique", "mytech:Sound"], "cannot read does-not-exist.json"),
    (["repro", "summary.json"], "summary.json is a run's summary: give one of its records (results/*.json)"),
    (["check", "mytech:Sound", "--report-dir", "afile/rep"], "cannot write reports into afile/rep"),
    (["fuzz", "--report-dir", "afile/rep"], "cannot write reports into afile/rep"),
    (["check", "mytech:Sound", "--seed", "x"], "--seed 'x': is not a non-negative integer"),
    (["fuzz", "--seed", "-3"], "--seed '-3': is not a non-negative integer"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(plugin_dir, capsys, argv, needle, monkeypatch):
    def no_search(*args, **kwargs):
        raise AssertionError("bad input must be rejected before any search")
    monkeypatch.setattr(sys.modules["isolation_suite.engine.check"], "search", no_search)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out


def test_repro_rejects_bad_files(plugin_dir, capsys):
    (plugin_dir / "bad.json").write_text("{not json")
    (plugin_dir / "bare.json").write_text("{}")
    assert main(["repro", "bad.json", "--technique", "mytech:Sound"]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert main(["repro", "bare.json", "--technique", "mytech:Sound"]) == 2
    assert "is not a valid scenario: scenario misses field(s) ['architecture']" in capsys.readouterr().err


def test_check_says_what_it_runs_and_how_to_replay_it(plugin_dir, capsys, monkeypatch):
    monkeypatch.setenv("ISOLATION_PROFILE", "isolation-dev")
    monkeypatch.setenv("ISOLATION_DATABASE", "none")
    assert main(["check", "mytech:Sound", "--max-examples", "4", "--seed", "77"]) == 0
    out = capsys.readouterr().out
    assert "profile isolation-dev: 60 examples, no example database, timeout 60s per run; seed 77" in out
    assert "1 trigger example, 4 generated (max 4); seed 77" in out
    assert ("replay: ISOLATION_PROFILE=isolation-dev isolation-suite check mytech:Sound --devices cpu --modes eager "
            "--seed 77 --max-examples 4") in out
    # a search replays its database's failures first: the replay names the same database
    assert main(["check", "mytech:Sound", "--max-examples", "1", "--seed", "77", "--database", "kept"]) == 0
    assert "--seed 77 --max-examples 1 --database kept\n" in capsys.readouterr().out


def test_repro_of_a_plugin_record_needs_no_technique_option(plugin_dir, capsys):
    assert main(["check", "mytech:Broken", "--max-examples", "5", "--report-dir", "rep"]) == 1
    record = next((plugin_dir / "rep" / "results").glob("*.json"))
    assert json.loads(record.read_text())["spec"] == "mytech:Broken"
    capsys.readouterr()
    assert main(["repro", str(record)]) == 1
    assert "gradient-flows" in capsys.readouterr().out


def test_repro_replays_a_stored_counterexample(plugin_dir, capsys):
    assert main(["check", "mytech:Broken", "--max-examples", "30", "--report-dir", "rep"]) == 1
    record = next((plugin_dir / "rep" / "results").glob("*.json"))
    scenario = json.loads(record.read_text())["scenario"]
    (plugin_dir / "scenario.json").write_text(json.dumps(scenario))
    capsys.readouterr()
    assert main(["repro", "scenario.json", "--technique", "mytech:Broken"]) == 1
    assert "gradient-flows" in capsys.readouterr().out
    assert main(["repro", "scenario.json", "--technique", "mytech:Sound"]) == 0


def _cli(*args, **kwargs):
    return [sys.executable, "-c", "import sys; from isolation_suite.cli import main; sys.exit(main())", *args]


def test_fuzz_writes_a_complete_report(tmp_path):
    # the budget only bounds the run: --max-examples ends every item long before it, on any machine
    run = subprocess.run(_cli("fuzz", "--budget", "240", "--workers", "2", "--devices", "cpu",
                              "--report-dir", str(tmp_path),
                              "--techniques", "no_grad_call,functional_detach,weight_dropout_data",
                              "--max-examples", "25"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    latest = (tmp_path / "LATEST").read_text().strip()
    run_dir = tmp_path / latest
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["ok"]
    assert {r["technique"]: r["outcome"] for r in summary["results"]} == {
        "no_grad_call": "caught", "functional_detach": "held", "weight_dropout_data": "caught"}
    assert summary["meta"]["torch"] and summary["examples_per_technique"]["functional_detach"] > 0
    html = (run_dir / "report.html").read_text()
    assert "<table>" in html and "gradient-flows" in html and "caught" in html
    assert "| no_grad_call | cpu | eager | gradient-flows | caught |" in (run_dir / "summary.md").read_text()
    assert len(list((run_dir / "repro").glob("*.py"))) == 2


SEGFAULTING = textwrap.dedent('''
    import os, signal
    import isolation_suite as iso

    class Segfaulting(iso.Technique):
        """Dies the way a crashing kernel does: the worker process is gone, no verdict."""
        name = "segfaulting"
        capabilities = frozenset({iso.Capability.PASS_THROUGH})
        def setup(self, model, intent):
            os.kill(os.getpid(), signal.SIGSEGV)
''')


def _fuzz_with(tmp_path, module: str, spec: str, *extra, env=None):
    (tmp_path / "crashtech.py").write_text(module)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
           "PYTHONFAULTHANDLER": "", **(env or {})}
    run = subprocess.run(_cli("fuzz", "--budget", "60", "--report-dir", str(tmp_path / "reports"),
                              "--techniques", f"{spec},functional_detach", "--max-examples", "10", *extra),
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    run_dir = tmp_path / "reports" / (tmp_path / "reports" / "LATEST").read_text().strip()
    return run, json.loads((run_dir / "summary.json").read_text()), run_dir


def test_fuzz_reports_a_technique_that_kills_its_process_as_a_violation(tmp_path):
    hostile_mod.require_fork_sandbox()
    run, summary, _ = _fuzz_with(tmp_path, SEGFAULTING, "crashtech:Segfaulting", "--workers", "2")
    assert run.returncode == 1, run.stdout + run.stderr
    assert summary["complete"] and not summary["ok"]
    outcomes = {r["technique"]: r for r in summary["results"]}
    assert outcomes["functional_detach"]["outcome"] == "held"
    crashed = outcomes["segfaulting"]
    assert crashed["outcome"] == "violated" and not crashed["passed"]
    assert crashed["violations"][0] == {"invariant": "no-crash", "message": (
        "the process was killed by signal SIGSEGV (during setup; SGD)")}
    assert "FAIL segfaulting-PASS_THROUGH-cpu: no-crash (not expected)" in run.stdout


def test_fuzz_reports_a_crashed_worker_as_an_error_never_a_pass(tmp_path):
    # without the sandbox the technique's segfault takes its xdist worker down with it, here the only one
    run, summary, run_dir = _fuzz_with(tmp_path, SEGFAULTING, "crashtech:Segfaulting", "--workers", "1",
                                       env={"ISOLATION_SANDBOX": "off"})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "(FAIL)" in next(line for line in run.stdout.splitlines() if line.startswith("report: "))
    assert "FAIL segfaulting-PASS_THROUGH-cpu: " in run.stdout
    assert summary["complete"] and not summary["ok"]
    outcomes = {r["technique"]: r for r in summary["results"]}
    assert outcomes["functional_detach"]["outcome"] == "held"
    crashed = outcomes["segfaulting"]
    assert crashed["outcome"] == "error" and not crashed["passed"] and "crashed" in crashed["error"]
    assert "segfaulting-PASS_THROUGH-cpu (error: no verdict)" in (run_dir / "summary.md").read_text()
    assert "error, no verdict" in (run_dir / "report.html").read_text()


def test_interrupted_fuzz_leaves_a_valid_report(tmp_path):
    proc = subprocess.Popen(_cli("fuzz", "--budget", "600", "--workers", "1", "--devices", "cpu",
                                 "--report-dir", str(tmp_path),
                                 "--techniques", "no_grad_call,functional_detach,toggle_requires_grad",
                                 "--max-examples", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    results = None
    while time.monotonic() < deadline:
        latest = tmp_path / "LATEST"
        if latest.exists():
            results = tmp_path / latest.read_text().strip() / "results"
            if results.exists() and any(results.glob("*.json")):
                break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    summary = json.loads((results.parent / "summary.json").read_text())
    assert summary["complete"] is False and summary["ok"] is False and summary["interrupted"] is True
    assert any(r["technique"] == "no_grad_call" for r in summary["results"]), out
    items = summary["items"]
    assert sorted(items["finished"] + items["running"] + items["not_started"]) == sorted(
        ["no_grad_call[PASS_THROUGH-cpu]", "functional_detach[PASS_THROUGH-cpu]",
         "toggle_requires_grad[PASS_THROUGH-cpu]"])
    assert items["running"], out  # the search that was stopped is named
    report_line = next(line for line in out.splitlines() if line.startswith("report: "))
    assert "(FAIL, incomplete)" in report_line
    assert "interrupted: the run did not finish, so it cannot pass" in (results.parent / "summary.md").read_text()


def test_check_reports_a_technique_that_exits_as_a_violation(plugin_dir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["check", "hostile:SysExit", "--max-examples", "3"]) == 1
    out = capsys.readouterr().out
    assert "no-crash           VIOLATED" in out and "SystemExit: 0" in out


def test_fuzz_survives_hostile_techniques_each_costing_only_its_own_item(tmp_path):
    hostile_mod.require_fork_sandbox()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    hostile = "hostile:OsExit,hostile:Sleeps,hostile:RaisesKeyboardInterrupt,hostile:PatchesLinear"
    run = subprocess.run(_cli("fuzz", "--budget", "120", "--workers", "2", "--report-dir", str(tmp_path),
                              "--techniques", f"{hostile},name_substring,functional_detach", "--max-examples", "5",
                              "--timeout", "2"),
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert run.returncode == 1, run.stdout + run.stderr
    summary = json.loads((tmp_path / "latest" / "summary.json").read_text())
    assert summary["complete"] and not summary["ok"] and len(summary["results"]) == 6
    outcome = {r["technique"]: (r["outcome"], r["violations"][0]["invariant"] if r["violations"] else None)
               for r in summary["results"]}
    assert outcome == {"hostile.os_exit": ("violated", "no-crash"), "hostile.sleeps": ("violated", "timeout"),
                       "hostile.keyboard_interrupt": ("violated", "no-crash"),
                       "hostile.patches_linear": ("violated", "state-restored"),
                       "name_substring": ("caught", outcome["name_substring"][1]),
                       "functional_detach": ("held", None)}
    # the monkeypatch did not reach name_substring: caught as without it, with one of its own invariants
    assert outcome["name_substring"][1] in iso.catalog()["name_substring"].expected_violations


def test_a_reader_that_leaves_early_does_not_change_the_exit_status(plugin_dir):
    """``isolation-suite check ... | head -1`` in CI: the violation still exits 1 (it used to exit 0)."""
    child = subprocess.Popen(_cli("check", "mytech:Broken", "--max-examples", "3", "--database", "none"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=plugin_dir,
                             env={**os.environ, "PYTHONPATH": str(plugin_dir)})
    child.stdout.readline()
    child.stdout.close()  # the reader leaves after one line
    _, err = child.communicate(timeout=300)
    assert child.returncode == 1, err.decode()
    assert b"Traceback" not in err


def test_a_check_report_folder_counts_that_checks_items_only(plugin_dir, capsys):
    """``check --report-dir rep`` writes into ``rep`` itself; another technique's records left there by
    an earlier check are not this check's: its summary neither lists them nor fails on them."""
    assert main(["check", "mytech:Broken", "--max-examples", "3", "--report-dir", "rep"]) == 1
    assert main(["check", "mytech:Sound", "--max-examples", "3", "--report-dir", "rep"]) == 0
    summary = json.loads((plugin_dir / "rep" / "summary.json").read_text())
    assert summary["ok"] and {r["technique"] for r in summary["results"]} == {"mine.sound"}
