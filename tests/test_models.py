"""The catalog gate on the shipped real models, user model factories from Python, the CLI and the
plug-in, and a real library's freezing (Lightning's ``BaseFinetuning``) judged through the contract.

The gate has the semantics of ``test_catalog.py``, on ``isolation_suite.zoo``'s models instead of
generated ones: a sound row holds; a known-bad row that is caught is caught with an expected invariant
whose condition holds on the minimal scenario; a known-bad row whose trigger the model has (one of the
catalog's trigger examples moved onto it satisfies the row's condition) must be caught; a row the model
offers no place for is not applicable and judges nothing.
"""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import isolation_suite as iso
from isolation_suite.engine.check import failure_message, search, search_line
from isolation_suite.model.factory import ModelFactoryError
from isolation_suite.techniques import CATALOG, conditions, entry, model_examples
from isolation_suite.techniques import triggers as t
from isolation_suite.zoo import ZOO

sys.path.insert(0, str(Path(__file__).parent))
import user_models  # noqa: E402

NEEDS_TRANSFORMERS = {"tiny_bert", "tiny_gpt2", "bert_with_mask"}
CASES = [(name, row) for name in ZOO for row in CATALOG]


@pytest.fixture(scope="module")
def moved_triggers():
    """``(spec, capabilities) -> model_examples(spec, capabilities)``, computed once per module (per xdist
    worker): every row of a capability on one model shares the same moved trigger examples."""
    cache: dict = {}

    def get(spec, capabilities):
        key = (spec, frozenset(capabilities))
        if key not in cache:
            cache[key] = model_examples(spec, capabilities)
        return cache[key]
    return get


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name, row", CASES, ids=[f"{name}-{row.name}" for name, row in CASES])
def test_catalog_row_on_a_shipped_model(name, row, moved_triggers):
    if name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    spec = f"isolation_suite.zoo:{name}"
    caps = row.technique.capabilities
    technique = row.technique()
    moved = moved_triggers(spec, caps)
    # fewer generated examples for a sound row (the moved trigger examples are judged either way)
    result = search(technique, caps, "cpu", max_examples=5 if technique.sound else 8, model=spec)
    assert result.model == spec
    if result.not_applicable:  # the row cannot be judged on this model: nothing ran, nothing failed
        assert result.failure is None and result.judged == 0, result.not_applicable
        assert moved == (), f"{name} offers no place for {row.name}, yet triggers were moved onto it"
        return
    present = sorted({c.invariant for c in row.conditions for s in moved if c.holds(s)})
    if result.failure is None:
        assert not present, (f"{row.name} held on {name} in {result.judged} examples although its trigger "
                             f"for {present} is present in the model")
        assert result.explicit == len(moved) and result.examples == result.max_examples
        return
    message = failure_message(result.failure, caps, result)
    assert not technique.sound, f"sound row {row.name} failed on {name}\n{message}"
    headline = result.failure.first.invariant
    assert headline in technique.expected_violations, message
    assert row.explains(headline, result.failure.scenario), (
        f"{row.name} on {name}: the counterexample for {headline} lacks its trigger\n{message}")


# --- a user's factory through the Python API -------------------------------------------------

#: a user's model module: a backbone with a BatchNorm, and a head; written to an empty folder for
#: the CLI and plug-in tests, and run here for the Python API's
MYMODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.backbone(x))

    def factory():
        return Net(), (torch.randn(5, 4, generator=torch.Generator().manual_seed(0)),)

    def broken():
        raise RuntimeError("cannot build the model")
''')
_USER_MODULE: dict = {}
exec(MYMODEL, _USER_MODULE)
Net = _USER_MODULE["Net"]


def _inputs():
    return _USER_MODULE["factory"]()[1]


def test_check_technique_judges_a_local_factory():
    def factory():  # defined here, so it cannot be imported by name
        return Net(), _inputs()

    (result,) = iso.check_technique(entry("freeze_and_eval").technique(), devices="cpu", max_examples=5, model=factory)
    assert result.model.startswith("local:") and not result.not_applicable
    assert result.failure is None and result.explicit >= 1 and result.examples == 5
    bad = entry("requires_grad_false").technique()
    with pytest.raises(AssertionError) as info:
        iso.check_technique(bad, devices="cpu", max_examples=5, model=factory)
    message = str(info.value)
    invariant = re.match(r"requires_grad_false violates (\S+) on cpu", message).group(1)
    assert invariant in bad.expected_violations
    assert f"  {invariant}: " in message  # the violation itself, not only the headline
    assert f"model={result.model!r}" in message  # the minimal scenario trains the user's model


def _raises():
    raise RuntimeError("cannot build the model\nsecond line of the error")


def _module_only():
    return Net()


_SAME = Net()


def _same_module():
    return _SAME, _inputs()


@pytest.mark.parametrize("factory, needle", [
    (_raises, "raised RuntimeError: cannot build the model"),
    (_module_only, "returned Net; expected (model, example_inputs) or (model, example_inputs, loss)"),
    (_same_module, "returned a model it had returned before"),
], ids=["raises", "module-only", "same-module"])
def test_a_wrong_factory_is_one_clear_error(factory, needle):
    with pytest.raises(ModelFactoryError) as info:
        search(entry("freeze_and_eval").technique(), max_examples=3, model=factory)
    message = str(info.value)
    assert needle in message and "\n" not in message and "second line" not in message
    assert message.startswith("model factory ")


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this layer cannot be trained")


def _untrainable():
    # last: every gradient the loop asks for goes through it
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2), _Apply(_NoBackward.apply)), \
        (torch.randn(4, 3),)


class _Apply(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_scenarios_the_reference_cannot_train_the_model_in_are_left_out_and_said():
    """A recipe the user's model does not support (Rprop on sparse gradients) fails in the reference:
    such a scenario judges nothing, so it is left out and counted; the others are judged."""
    result = search(entry("freeze_and_eval").technique(), max_examples=10, model=user_models.sparse, seed=0)
    assert result.failure is None and result.unrunnable > 0 and result.examples > 0
    assert "does not support sparse gradients" in result.unrunnable_why
    assert f"{result.unrunnable} left out: the reference cannot train the model that way" in search_line(result)


def test_a_model_the_reference_can_train_in_no_scenario_is_one_clear_error():
    with pytest.raises(ModelFactoryError) as info:
        search(entry("freeze_and_eval").technique(), max_examples=5, model=_untrainable, seed=0)
    message = str(info.value)
    assert "the reference could not train it in any of the" in message and "cannot be trained" in message
    assert "\n" not in message


# --- the command line and the plug-in, in an empty folder -------------------------------------




def _cli(*args):
    # as tests/test_cli.py runs it
    return [sys.executable, "-c", "import sys; from isolation_suite.cli import main; sys.exit(main())", *args]


@pytest.mark.parametrize("technique, model, code", [
    ("freeze_and_eval", "mymodel:factory", 0),
    ("requires_grad_false", "mymodel:factory", 1),
    ("freeze_and_eval", "mymodel:missing", 2),
    ("freeze_and_eval", "mymodel:broken", 2),
], ids=["sound", "known-bad", "missing-factory", "raising-factory"])
def test_cli_check_with_a_model_in_an_empty_folder(tmp_path, technique, model, code):
    (tmp_path / "mymodel.py").write_text(MYMODEL)
    run = subprocess.run(_cli("check", technique, "--model", model, "--max-examples", "5"),
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == code, out
    assert "Traceback" not in out
    if code == 0:
        assert "model mymodel:factory: " in run.stdout
        assert re.search(r"freeze_and_eval \[FREEZE_MODULE on cpu\]: \d+ trigger examples?, (\d+) coverage examples?, "
                         r"5 generated", run.stdout)
        # the backbone, its BatchNorm, its Linear and the head: every one judged
        assert "freeze targets judged: 4 of 4" in run.stdout
    elif code == 1:
        assert re.search(r"frozen-unchanged\s+VIOLATED", run.stdout), out
        assert "model='mymodel:factory'" in run.stdout, out
    else:
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("isolation-suite: error: "), run.stderr
        assert {"mymodel:missing": "has no attribute 'missing'",
                "mymodel:broken": "raised RuntimeError: cannot build the model"}[model] in lines[0]
        assert run.stdout == ""  # rejected before any search starts


def test_fuzz_on_the_users_model_reports_what_it_cannot_judge_as_n_a(tmp_path):
    (tmp_path / "mymodel.py").write_text(MYMODEL)
    techniques = "freeze_and_eval,functional_detach,requires_grad_false"
    run = subprocess.run(_cli("fuzz", "--model", "mymodel:factory", "--budget", "60", "--workers", "1",
                              "--devices", "cpu", "--techniques", techniques, "--max-examples", "5",
                              "--report-dir", "reports"),
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "--model mymodel:factory" in run.stdout  # the replay line keeps the model
    assert "(PASS); 2 of 3 items judged, 1 not applicable, 0 failed" in run.stdout  # n/a judged nothing
    run_dir = tmp_path / "reports" / (tmp_path / "reports" / "LATEST").read_text().strip()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and summary["complete"]
    outcomes = {r["technique"]: r["outcome"] for r in summary["results"]}
    assert outcomes == {"freeze_and_eval": "held", "functional_detach": "n/a", "requires_grad_false": "caught"}
    assert all(r["model"] == "mymodel:factory" for r in summary["results"])
    # nothing was judged for the pass-through technique: no invariant "held" for it
    assert {cell["verdict"] for cell in summary["matrix"]["functional_detach"].values()} == {"n/a"}
    assert summary["matrix"]["freeze_and_eval"]["frozen-unchanged"]["verdict"] == "held"


@pytest.fixture
def model_project(pytester):
    pytester.makepyfile(mymodel=MYMODEL)
    pytester.syspathinsert()
    return pytester


def test_plugin_judges_a_technique_on_the_users_model(model_project):
    result = model_project.runpytest_subprocess("--isolation-technique", "freeze_and_eval", "--isolation-model",
                                                "mymodel:factory", "--isolation-max-examples", "5",
                                                "--isolation-devices", "cpu")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("model, needle", [("mymodel:missing", "has no attribute 'missing'"),
                                           ("mymodel:broken", "raised RuntimeError: cannot build the model")],
                         ids=["missing", "raising"])
def test_plugin_bad_model_is_a_usage_error(model_project, model, needle):
    result = model_project.runpytest_subprocess("--isolation-technique", "freeze_and_eval", "--isolation-model", model,
                                                "--isolation-devices", "cpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([f"*{needle}*"])


# --- Lightning's BaseFinetuning.freeze, judged through the contract ---------------------------

@pytest.fixture(scope="module")
def lightning_techniques():
    pytest.importorskip("lightning")
    from isolation_suite.techniques.library import LightningFreeze, LightningFreezeNoBN
    return LightningFreeze, LightningFreezeNoBN


def test_lightning_train_bn_leaves_a_frozen_batchnorm_training(lightning_techniques):
    freeze, _ = lightning_techniques
    verdict = iso.check(freeze(), t.FROZEN_BATCHNORM)
    assert verdict.first is not None and verdict.first.invariant == "frozen-unchanged", str(verdict)
    assert verdict.first.message.startswith("enc.bn.weight")  # make_trainable: the BatchNorm's weight trains
    assert set(verdict.invariants) <= freeze.expected_violations


def test_lightning_no_train_bn_moves_nothing_but_normalises_with_batch_statistics(lightning_techniques):
    _, freeze_no_bn = lightning_techniques
    verdict = iso.check(freeze_no_bn(), t.FROZEN_BATCHNORM)
    assert verdict.invariants == ("matches-reference",), str(verdict)  # nothing frozen moved
    assert "matches-reference" in freeze_no_bn.expected_violations
    assert "frozen-unchanged" not in freeze_no_bn.expected_violations


@pytest.mark.parametrize("example", ["FROZEN_LINEAR", "FROZEN_RPROP", "FROZEN_ONE_CYCLE", "FROZEN_CLIP_NORM",
                                     "NAMES_COLLIDE"])
def test_lightning_freezing_holds_where_no_batchnorm_or_dropout_is_frozen(lightning_techniques, example):
    for technique in lightning_techniques:
        verdict = iso.check(technique(), getattr(t, example))
        assert verdict.ok, str(verdict)


def test_lightning_no_train_bn_holds_once_the_frozen_module_runs_in_eval_mode(lightning_techniques):
    """What is missing is eval mode, not freezing: the same freeze with the frozen call run in eval mode
    holds where a BatchNorm or a Dropout is frozen; with train_bn=True the BatchNorm's weight still trains."""
    freeze, freeze_no_bn = lightning_techniques

    def in_eval(base):
        class InEval(base):
            name = f"{base.name}+eval"

            def call(self, module, args, role):
                if role is not iso.Role.FROZEN:
                    return module(*args)
                was = module.training
                module.eval()
                try:
                    return module(*args)
                finally:
                    module.train(was)
        return InEval()

    for example in (t.FROZEN_BATCHNORM, t.FROZEN_DROPOUT):
        verdict = iso.check(in_eval(freeze_no_bn), example)
        assert verdict.ok, str(verdict)
    verdict = iso.check(in_eval(freeze), t.FROZEN_BATCHNORM)
    assert verdict.first.invariant == "frozen-unchanged" and verdict.first.message.startswith("enc.bn.weight")


def test_lightning_freezing_on_a_resnet(lightning_techniques):
    """Every freezable part of the ResNet holds a BatchNorm: both variants are caught there, with an
    expected invariant, and the minimal scenario freezes a BatchNorm."""
    for technique in lightning_techniques:
        result = search(technique(), max_examples=5, model="isolation_suite.zoo:resnet_cnn")
        assert result.failure is not None, f"{technique.name} held on resnet_cnn"
        message = failure_message(result.failure, technique.capabilities, result)
        assert result.failure.first.invariant in technique.expected_violations, message
        assert conditions.frozen_has_batchnorm(result.failure.scenario), message


LAZY_IMPORT = textwrap.dedent('''
    import sys
    import isolation_suite as iso
    from isolation_suite.techniques import library as library_techniques
    from isolation_suite.techniques import triggers

    assert "lightning" not in sys.modules, "importing library_techniques imported lightning"

    class ImportsInSetup(library_techniques.LightningFreeze):
        name = "lightning_freeze_imported_in_setup"
        def __init__(self):
            pass  # lightning is imported for the first time inside a run, by setup

    print(iso.check(ImportsInSetup(), triggers.FROZEN_LINEAR).first)
    print(iso.check(library_techniques.LightningFreeze(), triggers.FROZEN_LINEAR).ok)
''')


def test_importing_lightning_inside_a_run_is_a_state_leak(lightning_techniques, tmp_path):
    """Importing Lightning replaces ``torch.compile`` (lightning_fabric.wrappers); a first import inside a
    run is a global change the harness reports. The techniques import it when constructed instead."""
    run = subprocess.run([sys.executable, "-c", LAZY_IMPORT], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    leak, constructed_ok = run.stdout.strip().splitlines()[-2:]
    assert leak.startswith("state-restored: torch.compile was replaced"), run.stdout
    assert constructed_ok == "True", run.stdout
