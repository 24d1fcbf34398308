"""Random ``transformers`` configurations (``hf:random``): their names, the strategy that draws them,
the factory that builds them, the search over them, and what the nightly profile draws."""
import importlib.util
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import strategies
from shrunk import minimal
from isolation_suite.cli import main
from isolation_suite.engine import profiles
from isolation_suite.engine.check import search, search_strategy
from isolation_suite.engine.runs import plan_for
from isolation_suite.engine.settings import CHECK, SettingError
from isolation_suite.engine.settings import settings as read_settings
from isolation_suite.engine.sweep import sweep
from isolation_suite.execution import modes
from isolation_suite.model.factory import ModelFactoryError, factory_tree, make, resolve
from isolation_suite.model.tree import check_intent, module_tree, targets_for
from isolation_suite.spec.kinds import DROPOUT_EFFECT
from isolation_suite.spec import hf
from isolation_suite.spec.scenario import Mode
from isolation_suite.technique import Capability
from isolation_suite.techniques import catalog, entry

FAST = settings(database=None, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers")


def _minimal(strategy, fails=lambda value: True):
    """What Hypothesis reports for a test failing when ``fails``: the shrunk minimum (derandomized)."""
    return minimal(strategy, fails, max_examples=100)


# --- names --------------------------------------------------------------------------------------

def test_every_configuration_has_one_name_that_parses_back_to_it():
    names = [hf.name(c) for c in hf.SPACE]
    assert len(set(names)) == len(names)
    assert all(hf.parse(n) == c for n, c in zip(names, hf.SPACE))
    assert {c.arch for c in hf.SPACE} == set(hf.CLASSES)
    # grouped-query attention exists only where the class has it
    assert all(c.kv == "1" for c in hf.SPACE if c.arch != "llama")
    assert any(c.kv < c.heads for c in hf.SPACE if c.arch == "llama")


def test_a_missing_field_takes_its_smallest_value():
    assert hf.parse("hf:gpt2") == hf.HFConfig("gpt2")
    assert hf.name(hf.parse("hf:llama?tied=1&layers=2")) == \
        "hf:llama?layers=2&heads=1&kv=1&hidden=8&tied=1&attn=eager&dropout=0"


@pytest.mark.parametrize("spec, needle", [
    ("hf:gpt3", "unknown class 'gpt3' (choose from bert, gpt2, llama, or random)"),
    ("hf:llama?layers=9", "layers='9' is not one of 1, 2"),
    ("hf:bert?kv=1", "kv applies to llama only"),
    ("hf:llama?heads=1&kv=2", "kv=2 is more than heads=1"),
    ("hf:gpt2?depth=1", "unknown field 'depth' (fields: layers, heads, kv, hidden, tied, attn, dropout)"),
    ("hf:gpt2?layers", "'layers' is not field=value"),
    ("hf:gpt2?layers=1&layers=2", "field 'layers' is given twice"),
])
def test_a_bad_spelling_is_one_clear_line_wherever_it_is_given(spec, needle):
    with pytest.raises(ModelFactoryError) as factory_error:
        resolve(spec)
    with pytest.raises(SettingError) as setting_error:
        read_settings({"model": spec}, CHECK, environ={})
    assert str(factory_error.value) == f"model {spec!r}: {needle}"
    assert str(setting_error.value) == f"--model {spec!r}: {needle}"


def test_hf_random_names_the_family_not_a_model():
    assert read_settings({"model": "hf:random"}, CHECK, environ={}).model == "hf:random"
    with pytest.raises(ModelFactoryError, match="a search draws one per example"):
        resolve("hf:random")


# --- the strategy -------------------------------------------------------------------------------

def test_configurations_shrink_toward_the_smallest():
    assert _minimal(strategies.hf_configs()) == hf.HFConfig()
    assert _minimal(strategies.hf_configs(), lambda c: c.arch == "llama") == hf.HFConfig("llama")
    # a failure that needs two layers and a tie keeps those and nothing else
    assert _minimal(strategies.hf_configs(), lambda c: c.layers == "2" and c.is_tied) == \
        hf.HFConfig(layers="2", tied="1")
    grouped = lambda c: c.arch == "llama" and c.kv < c.heads  # noqa: E731 - grouped-query attention
    assert _minimal(strategies.hf_configs(), grouped) == hf.HFConfig("llama", heads="2")


@needs_transformers
@pytest.mark.parametrize("capability", [Capability.FREEZE_MODULE, Capability.FREEZE_ELEMENTS,
                                        Capability.REPARAMETERIZE], ids=lambda c: c.value)
def test_scenarios_over_hf_random_name_a_configuration_with_a_place_for_the_intent(capability):
    seen = set()

    @settings(FAST, max_examples=15)
    @given(strategies.scenarios(capabilities=[capability], model=hf.RANDOM))
    def probe(scenario):
        config = hf.parse(scenario.model)  # a configuration, never the family
        tree = factory_tree(scenario.model)
        assert targets_for(tree, capability)
        check_intent(tree, scenario.intent)
        seen.add(config.arch)
        if capability is Capability.REPARAMETERIZE:  # a tied GPT-2 has no layer to wrap: never drawn
            assert not (config.arch == "gpt2" and config.is_tied)

    probe()
    assert seen == set(hf.CLASSES)


@needs_transformers
@pytest.mark.parametrize("arch", hf.CLASSES)
def test_each_class_builds_from_the_seed_and_trains_on_its_inputs(arch):
    name = hf.name(hf.HFConfig(arch, layers="2", heads="2", tied="1", attn="sdpa", dropout="0.1"))
    one, again, other = make(name, 7), make(name, 7), make(name, 8)
    assert all(torch.equal(a, b) for a, b in zip(one.model.parameters(), again.model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(one.model.parameters(), other.model.parameters()))
    assert torch.equal(one.inputs[0], other.inputs[0])  # the inputs come from a private generator
    logits = one.model(*one.inputs)
    assert logits.shape == (*one.inputs[0].shape, 16)
    one.loss(logits, torch.randn(logits.shape)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in one.model.parameters())
    tree = factory_tree(name)
    assert tree.ties  # tied: the LM head's weight is the token embedding's


class _Attention(torch.nn.Module):
    """Attention with its dropout inside a functional call, as LLaMA's: no ``nn.Dropout`` module."""

    def __init__(self, fused: bool, rate: float):
        super().__init__()
        self.proj, self.fused, self.rate = torch.nn.Linear(4, 4), fused, rate

    def forward(self, x):
        q = self.proj(x)
        if self.fused:
            rate = self.rate if self.training else 0.0
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=rate)
        scores = (q @ q.transpose(-1, -2)).softmax(-1)
        return torch.nn.functional.dropout(scores, self.rate, training=self.training) @ q


@pytest.mark.parametrize("fused", [False, True], ids=["F.dropout", "sdpa"])
def test_the_tree_sees_a_dropout_called_functionally(fused):
    x = torch.randn(1, 3, 4)
    dropping = module_tree(torch.nn.Sequential(_Attention(fused, 0.1), torch.nn.Linear(4, 2)), (x,))
    assert dropping.node("0").train_mode == DROPOUT_EFFECT and dropping.device_random
    assert not dropping.node("1").train_mode
    still = module_tree(torch.nn.Sequential(_Attention(fused, 0.0), torch.nn.Linear(4, 2)), (x,))
    assert not still.node("0").train_mode and not still.device_random


# --- the search, the sweep and the settings -----------------------------------------------------

@needs_transformers
def test_a_search_over_hf_random_moves_its_triggers_and_draws_configurations(monkeypatch):
    monkeypatch.setenv("ISOLATION_PROFILE", "isolation-ci")
    caps = {Capability.FREEZE_MODULE}
    held = search(catalog()["freeze_and_eval"], caps, model=hf.RANDOM, max_examples=4)
    assert held.ok and held.model == hf.RANDOM and held.explicit > 0 and held.examples == 4
    caught = search(catalog()["name_substring"], caps, model=hf.RANDOM, max_examples=4)
    first = caught.failure.first.invariant
    assert first in entry("name_substring").technique.expected_violations
    assert entry("name_substring").explains(first, caught.failure.scenario)
    assert hf.parse(caught.failure.scenario.model)  # the minimal scenario names its configuration
    none = search(catalog()["no_grad_call"], {Capability.PASS_THROUGH}, model=hf.RANDOM, max_examples=4)
    assert none.not_applicable.startswith("the model offers no place for PASS_THROUGH") and none.judged == 0


@needs_transformers
def test_a_sweep_over_hf_random_judges_each_row(monkeypatch):
    monkeypatch.setenv("ISOLATION_PROFILE", "isolation-ci")
    done = sweep([catalog()["freeze_and_eval"], catalog()["lr_zero_group_seed"]], {Capability.FREEZE_MODULE},
                 max_examples=3, model=hf.RANDOM, shrink=False)
    assert done["freeze_and_eval"].ok and done["freeze_and_eval"].examples == 3
    assert done["lr_zero_group_seed"].failure.first.invariant == "no-crash"


@needs_transformers
def test_the_plan_accepts_hf_random():
    chosen = read_settings({"model": "hf:random"}, CHECK, environ={}).but(techniques=("freeze_and_eval",))
    plan, _ = plan_for(chosen, CHECK)
    assert plan.model == hf.RANDOM and [i.capability for i in plan.items] == ["FREEZE_MODULE"]


def test_cli_bad_hf_spelling_is_one_line_and_exit_2(capsys):
    assert main(["check", "freeze_and_eval", "--model", "hf:llama?layers=3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "isolation-suite: error: --model 'hf:llama?layers=3': layers='3' is not one of 1, 2"]


@needs_transformers
def test_cli_check_over_hf_random_says_what_it_draws(capsys):
    assert main(["check", "freeze_and_eval", "--model", "hf:random", "--max-examples", "2", "--modes", "eager",
                 "--profile", "isolation-ci", "--database", "none"]) == 0
    out = capsys.readouterr().out
    assert f"model hf:random: a random configuration of bert, gpt2, llama per example ({len(hf.SPACE)} " in out


# --- what each profile draws --------------------------------------------------------------------

def test_only_the_nightly_profile_draws_inductor_and_real_models():
    assert profiles.DRAWS["isolation-dev"] == profiles.DRAWS["isolation-ci"] == profiles.Draws(("aot_eager",), False)
    assert profiles.DRAWS["isolation-nightly"] == profiles.Draws(("aot_eager", "inductor"), True)


def test_inductor_runs_with_torchs_random_numbers_and_no_compile_pool():
    """Without these its dropout draws other masks than the reference's, and a compile pool started
    in a run outlives it: 27 of 88 verdicts differed from aot_eager's."""
    assert modes.INDUCTOR_CONFIG == {"fallback_random": True, "compile_threads": 1}
    import torch._inductor.config as inductor
    before = (inductor.fallback_random, inductor.compile_threads)
    with modes.compiler_settings(Mode("compile", backend="inductor")):
        assert (inductor.fallback_random, inductor.compile_threads) == (True, 1)
    assert (inductor.fallback_random, inductor.compile_threads) == before


def test_without_a_cpp_compiler_inductor_is_not_drawn_and_the_profile_says_why(monkeypatch):
    assert profiles.draws("isolation-nightly", "cpu").backends == ("aot_eager", "inductor")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(profiles.shutil, "which", lambda name: None)
    assert profiles.draws("isolation-nightly", "cpu").backends == ("aot_eager",)
    assert "inductor not drawn: it compiles CPU kernels with a C++ compiler" in profiles.describe("isolation-nightly")


def _drawn(strategy, count: int) -> list:
    out = []

    @settings(FAST, max_examples=count)
    @given(strategy)
    def collect(scenario):
        out.append(scenario)

    collect()
    return out


@needs_transformers
@pytest.mark.skipif(not any(shutil.which(c) for c in profiles.CXX_NAMES), reason="needs a C++ compiler")
@pytest.mark.parametrize("profile", ["isolation-dev", "isolation-nightly"])
def test_the_search_draws_what_its_profile_draws(profile, monkeypatch):
    monkeypatch.setenv("ISOLATION_PROFILE", profile)
    compiled = _drawn(search_strategy(frozenset({Capability.FREEZE_MODULE}), "cpu", None, "compile"), 30)
    eager = _drawn(search_strategy(frozenset({Capability.FREEZE_MODULE}), "cpu", None, "eager"), 30)
    backends = {s.mode.backend for s in compiled}
    real = [s.model for s in eager if s.model]
    if profile == "isolation-nightly":  # both backends; generated trees, and some transformers configurations
        assert backends == {"aot_eager", "inductor"}
        assert 0 < len(real) < len(eager) and all(hf.parse(m) for m in real)
    else:
        assert backends == {"aot_eager"} and not real
