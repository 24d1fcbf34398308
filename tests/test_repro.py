"""Repro scripts are standalone (torch only) and reproduce the minimal counterexample."""
import subprocess
import sys
import textwrap

import pytest

import isolation_suite as iso
from isolation_suite.engine.check import search
from isolation_suite.reporting.report import _run_line, record

# Runs a script with hypothesis, strategies and the installed isolation_suite made unimportable.
# The script's own embedded finder goes in front of this blocker, so only what it embeds loads.
RUN_WITHOUT_HARNESS = textwrap.dedent('''
    import runpy, sys

    class Block:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "isolation_suite" or name.startswith("isolation_suite."):
                raise ImportError(f"blocked: {name}")
            return None

    sys.modules["hypothesis"] = None
    sys.modules["strategies"] = None
    sys.meta_path.insert(0, Block())
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
''')


@pytest.mark.parametrize("name", ["no_grad_call", "backward_hook_zero_grad", "weight_dropout_data"])
def test_repro_script_reproduces_with_torch_only(tmp_path, name):
    technique = iso.catalog()[name]
    result = search(technique, max_examples=30)
    assert result.failure is not None
    rec = record(result, technique, 1.0, tmp_path)
    script = tmp_path / rec["repro"]
    run = subprocess.run([sys.executable, "-c", RUN_WITHOUT_HARNESS, str(script)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert result.failure.first.invariant in run.stdout and "reproduced" in run.stdout


def test_repro_script_exits_0_when_the_technique_is_fixed(tmp_path):
    broken = iso.catalog()["no_grad_call"]
    result = search(broken, max_examples=30)
    rec = record(result, broken, 1.0, tmp_path)
    script = (tmp_path / rec["repro"]).read_text()
    fixed = script.replace("from isolation_suite.techniques.pass_through import NoGradCall\n"
                           "    technique = NoGradCall()",
                           "from isolation_suite.techniques.pass_through import FunctionalDetach\n"
                           "    technique = FunctionalDetach()")
    assert fixed != script
    path = tmp_path / "fixed.py"
    path.write_text(fixed)
    run = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "not reproduced" in run.stdout


PLUGIN_WITH_A_DEPENDENCY = textwrap.dedent('''
    import torch
    import helper_dep  # importable when the report was written, missing where the script runs
    import isolation_suite as iso

    class Broken(iso.Technique):
        name = "dep.broken"
        capabilities = frozenset({iso.Capability.PASS_THROUGH})
        def call(self, module, args, role):
            with torch.no_grad():
                return module(*args)
''')


def test_a_repro_that_cannot_run_exits_2_not_1(tmp_path, monkeypatch):
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "helper_dep.py").write_text("")
    (plugin_dir / "deptech.py").write_text(PLUGIN_WITH_A_DEPENDENCY)
    monkeypatch.syspath_prepend(str(plugin_dir))
    from deptech import Broken
    result = search(Broken(), max_examples=5)
    rec = record(result, Broken(), 1.0, tmp_path / "rep")
    run = subprocess.run([sys.executable, "-c", RUN_WITHOUT_HARNESS, str(tmp_path / "rep" / rec["repro"])],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == ["could not run: ModuleNotFoundError: No module named 'helper_dep'"]


@pytest.mark.skipif(iso.devices.cuda_available(), reason="needs a machine without CUDA")
def test_a_cuda_repro_on_a_machine_without_cuda_exits_2(tmp_path):
    from isolation_suite.reporting.repro import write_repro
    from isolation_suite.techniques.triggers import PASS_UPSTREAM
    script = write_repro(tmp_path / "parity.py", iso.catalog()["no_grad_call"], PASS_UPSTREAM, "cuda",
                         "device-parity: ...")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "could not run: DeviceError" in run.stderr and "CUDA is not available" in run.stderr


def test_the_reports_run_line_says_whose_budget_it_gives():
    """fuzz's budget is the whole run's, shared out among its items; check's and the plug-in's is each
    item's: the report's header says which (it used to call a run's 90 s "per search")."""
    assert "budget 90s for the run (up to 8s per item)" in _run_line({"budget": 90.0, "item_budget": 8.0})
    assert "budget 30s per item" in _run_line({"budget": 30.0, "item_budget": 30.0})
    assert "no time budget" in _run_line({"budget": None})


def test_repro_and_its_script_keep_the_runs_limit_per_training_run(tmp_path, monkeypatch):
    """A timeout found under ``--timeout 2`` is replayed under 2 s, not the profile's 60 (it used to
    come back "ok"); an explicit ``--timeout`` still wins."""
    import json
    from isolation_suite import cli
    from isolation_suite.reporting.repro import repro_script
    from isolation_suite.techniques.freeze_module import FreezeAndEval
    from isolation_suite.techniques.triggers import FROZEN_LINEAR
    assert "\nTIMEOUT = 2.0 " in repro_script(FreezeAndEval(), FROZEN_LINEAR, "cpu", "timeout", timeout=2.0)
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"technique": "freeze_and_eval", "spec": "freeze_and_eval", "timeout": 2.0,
                                  "scenario": FROZEN_LINEAR.to_dict()}))
    limits = []
    monkeypatch.setattr(cli, "check", lambda technique, scenario, device, timeout: limits.append(timeout)
                        or iso.check(technique, scenario, device))
    assert cli.main(["repro", str(record)]) == 0
    assert cli.main(["repro", str(record), "--timeout", "30"]) == 0
    assert limits == [2.0, 30.0]
