"""The pytest plug-in, exercised in a throw-away user project with ``pytester``."""
import json
import textwrap

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
    result = project.runpytest_subprocess("--isolation-technique", "mylib:make_sound", "--isolation-max-examples", "5")
    result.assert_outcomes(passed=1)


def test_broken_technique_fails_naming_the_invariant(project):
    result = project.runpytest_subprocess("--isolation-technique", "mylib:Broken", "--isolation-max-examples", "40",
                               "--isolation-devices", "cpu")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*mylib.broken violates gradient-flows on cpu*", "*minimal scenario:*",
                                 "*iso.check(technique, iso.Scenario.from_json(*"])
    assert "Traceback" not in result.stdout.str()


def test_one_item_per_technique_capability_and_device(project):
    result = project.runpytest_subprocess("--isolation-technique", "mylib:Sound", "--isolation-technique", "mylib:Broken",
                               "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*mylib.freeze[[]FREEZE_MODULE-cpu[]]*", "*mylib.broken[[]FREEZE_MODULE-cpu[]]*"])


def test_report_option_writes_a_report(project):
    report = project.path / "rep"
    project.runpytest_subprocess("--isolation-technique", "mylib:Broken", "--isolation-max-examples", "40",
                      "--isolation-report", str(report))
    summary = json.loads((report / "summary.json").read_text())
    assert summary["complete"] is True and summary["ok"] is False
    assert summary["matrix"]["mylib.broken"]["gradient-flows"]["verdict"] == "violated"
    assert (report / "report.html").exists() and list((report / "repro").glob("*.py"))


@pytest.mark.parametrize("args, needle", [
    (["--isolation-technique", "mylib:Nope"], "has no attribute 'Nope'"),
    (["--isolation-technique", "mylib:Sound", "--isolation-devices", "tpu"], "unknown device 'tpu'"),
    (["--isolation-technique", "mylib:Sound", "--isolation-budget", "0"], "--isolation-budget must be positive"),
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
