"""The pytest plug-in, exercised in a throw-away user project with ``pytester``."""
import json
import sys
import textwrap
from pathlib import Path

import pytest

USER_MODULE = textwrap.dedent('''
    import torch
    import isolation_suite as iso

    class Sound(iso.Technique):
        name = "mylib.freeze"
        capabilities = frozenset({iso.Capability.FREEZE_MODULE})
        def setup(self, model, intent):
            for path in intent.frozen_modules:
                module = model.get_submodule(path)
                module.requires_grad_(False)
        def call(self, module, args, role):
            if role is iso.Role.FROZEN:
                was = module.training
                module.eval()
                try:
                    return module(*args)
                finally:
                    module.train(was)
            return module(*args)
        def make_optimizer(self, model, intent, build):
            return build([p for p in model.parameters() if p.requires_grad])

    class Broken(iso.Technique):
        name = "mylib.broken"
        capabilities = frozenset({iso.Capability.FREEZE_MODULE})
        def call(self, module, args, role):
            if role is iso.Role.FROZEN:
                with torch.no_grad():
                    return module(*args)
            return module(*args)

    def make_sound():
        return Sound()
''')


@pytest.fixture
def project(pytester):
    pytester.makepyfile(mylib=USER_MODULE)
    pytester.syspathinsert()
    return pytester


def test_sound_technique_passes_in_an_empty_folder(project):
    result = project.runpytest_subprocess("--isolation-technique", "mylib:Sound", "--isolation-max-examples", "15",
                               "--isolation-devices", "cpu")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*1 passed*"])


def test_factory_is_accepted(project):
    result = project.runpytest_subprocess("--isolation-technique", "mylib:make_sound", "--isolation-max-examples", "5",
                                          "--isolation-devices", "cpu")
    result.assert_outcomes(passed=1)


def test_broken_technique_fails_naming_the_invariant(project):
    result = project.runpytest_subprocess("--isolation-technique", "mylib:Broken", "--isolation-max-examples", "40",
                               "--isolation-devices", "cpu")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*mylib.broken violates gradient-flows on cpu*", "*minimal scenario:*",
                                 "*iso.check(technique, iso.Scenario.from_json(*"])
    assert "Traceback" not in result.stdout.str()


def test_one_item_per_technique_capability_and_device(project):
    result = project.runpytest_subprocess("--isolation-technique", "mylib:Sound",
                                          "--isolation-technique", "mylib:Broken", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*mylib.freeze[[]FREEZE_MODULE-cpu[]]*", "*mylib.broken[[]FREEZE_MODULE-cpu[]]*"])


def test_report_option_writes_a_report_into_a_run_folder(project):
    reports = project.path / "rep"
    result = project.runpytest_subprocess("--isolation-technique", "mylib:Broken", "--isolation-max-examples", "40",
                                          "--isolation-report", str(reports), "-n", "2", "--isolation-devices", "cpu")
    run_dir = reports / (reports / "LATEST").read_text().strip()
    assert run_dir.parent == reports and (reports / "latest").resolve() == run_dir.resolve()
    result.stdout.fnmatch_lines([f"isolation-suite: report {run_dir}"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] is True and summary["ok"] is False
    assert summary["matrix"]["mylib.broken"]["gradient-flows"]["verdict"] == "violated"
    assert summary["matrix"]["mylib.broken"]["device-parity"]["verdict"] == "n/a"
    (rec,) = summary["results"]
    assert rec["spec"] == "mylib:Broken" and rec["reason"].startswith("gradient-flows (not expected)")
    assert (run_dir / "report.html").exists() and list((run_dir / "repro").glob("*.py"))


def test_an_unwritable_report_folder_is_a_usage_error_before_anything_runs(project):
    (project.path / "afile").write_text("")
    result = project.runpytest_subprocess("--isolation-technique", "mylib:Sound", "--isolation-report",
                                          str(project.path / "afile" / "rep"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(["*cannot write reports into*afile/rep*"])


def test_the_seed_header_statistics_and_profile_are_what_runs(project, monkeypatch):
    monkeypatch.setenv("ISOLATION_PROFILE", "isolation-dev")
    monkeypatch.setenv("ISOLATION_DATABASE", "none")
    reports = project.path / "rep"
    result = project.runpytest_subprocess("--isolation-technique", "mylib:Sound", "--isolation-max-examples", "7",
                                          "--isolation-devices", "cpu", "--hypothesis-seed", "4242",
                                          "--hypothesis-show-statistics", "--isolation-report", str(reports))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "isolation-suite: profile isolation-dev: 60 examples, no example database, timeout 60s per run; "
        "seed 4242 (replay with --hypothesis-seed 4242)",
        "*Hypothesis Statistics*",
        "*isolation-suite: * trigger examples, 7 generated (max 7); seed 4242*",
        "*- during generate phase*"])
    (rec,) = json.loads((reports / "latest" / "summary.json").read_text())["results"]
    assert rec["seed"] == 4242 and rec["examples"] == 7 and rec["max_examples"] == 7


def test_without_a_seed_a_dev_run_draws_one_and_prints_it(project, monkeypatch):
    monkeypatch.setenv("ISOLATION_PROFILE", "isolation-dev")
    monkeypatch.setenv("ISOLATION_DATABASE", "none")
    result = project.runpytest_subprocess("--isolation-technique", "mylib:Sound", "--isolation-max-examples", "3",
                                          "--isolation-devices", "cpu")
    result.stdout.fnmatch_lines(["isolation-suite: profile isolation-dev*; seed * (replay with --hypothesis-seed *)"])


@pytest.mark.parametrize("args, needle", [
    (["--isolation-technique", "mylib:Nope"], "has no attribute 'Nope'"),
    (["--isolation-technique", "mylib:Sound", "--isolation-devices", "tpu"], "unknown device 'tpu'"),
    (["--isolation-technique", "mylib:Sound", "--isolation-budget", "0"], "--isolation-budget '0': must be positive"),
])
def test_bad_options_are_usage_errors(project, args, needle):
    result = project.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{needle}*"])


def test_profiles_are_registered():
    from hypothesis import settings
    assert settings.get_profile("isolation-nightly").max_examples >= 1000
    assert settings.get_profile("isolation-nightly").deadline is None
    assert settings.get_profile("isolation-ci").derandomize


HOSTILE = ["hostile:SysExit", "hostile:OsExit", "hostile:Sleeps", "hostile:RaisesKeyboardInterrupt",
           "hostile:PatchesLinear"]


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["in-process", "xdist"])
def test_hostile_techniques_fail_the_gate_and_never_pass(pytester, xdist):
    sys.path.insert(0, str(Path(__file__).parent))
    import hostile
    hostile.require_fork_sandbox()
    pytester.makepyfile(hostile=(Path(__file__).parent / "hostile.py").read_text())
    pytester.syspathinsert()
    args = [a for spec in HOSTILE for a in ("--isolation-technique", spec)]
    result = pytester.runpytest_subprocess(*args, "--isolation-devices", "cpu", "--isolation-timeout", "2",
                                           "--isolation-max-examples", "3", *xdist)
    result.assert_outcomes(failed=len(HOSTILE))
    result.stdout.fnmatch_lines_random([
        "hostile.sys_exit violates no-crash on cpu*", "  no-crash: SystemExit: 0 (in forward at step 1*",
        "hostile.os_exit violates no-crash on cpu*", "  no-crash: the process exited with code 0*",
        "hostile.sleeps violates timeout on cpu*", "  timeout: the run took longer than 2s*",
        "hostile.keyboard_interrupt violates no-crash on cpu*", "  no-crash: KeyboardInterrupt:*",
        "hostile.patches_linear violates state-restored on cpu*",
        "  state-restored: torch.nn.functional.linear was replaced*"])
