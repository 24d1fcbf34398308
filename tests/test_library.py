"""Real libraries' recipes judged through the contract: PEFT's adapters, transformers' gradient
checkpointing and Lightning's freezing, each calling the library's own code, with the verdict each
row declares per execution mode; the reported bugs they reproduce (or no longer do) on the installed
versions; and the compatibility table in ``isolation-suite list``, docs/compatibility.md and the
HTML report.

Every known-bad row is shown caught with a declared invariant, under the condition the row names;
every sound row is shown to hold. The expensive runs are shared through module-scoped caches.
"""
import dataclasses
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest

import isolation_suite as iso
from isolation_suite.engine.check import failure_message, search
from isolation_suite.spec.mode_kinds import MODE_KINDS
from isolation_suite.spec.scenario import Data, Intent, Mode, OptimizerRecipe, Scenario
from isolation_suite.techniques import in_mode
from isolation_suite.techniques import triggers as t
from isolation_suite.techniques.library import (LIBRARY_TECHNIQUES, LIGHTNING_TECHNIQUES, LibraryRow,
                                                installed_version, library_modes, library_rows)
from isolation_suite.techniques.library_peft import (LORA_BERT, LORA_BERT_MODULES_TO_SAVE, PEFT_TECHNIQUES,
                                                     AdapterIntentError, PeftAddAdapterInference,
                                                     PeftLoadAdapterTrainable, PeftSetRequiresGrad, recipe_examples)
from isolation_suite.techniques.library_transformers import (HFGradientCheckpointing,
                                                             HFGradientCheckpointingInputGrads,
                                                             HFGradientCheckpointingNoInputGrads)
from isolation_suite.zoo_peft import PEFT_ZOO

#: the modes every library row is gated in here (compile: one scenario per row below)
GATED_MODES = ("eager", "checkpoint", "autocast")
#: the libraries' own deprecation notices (transformers 5.25 renames gradient checkpointing; PEFT still asks for
#: the old name) and PEFT's note on saving a model without a vocabulary file
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")]


def _frozen_adapters(scenario: Scenario) -> set[str]:
    """The adapters a recipe example freezes (``...lora_A.NAME``, ``...modules_to_save.NAME``)."""
    return {path.rpartition(".")[2] for path in scenario.intent.frozen_modules
            if ".lora_" in path or ".modules_to_save." in path}


def _reentrant(scenario: Scenario) -> bool:
    return scenario.mode.kind == "checkpoint" and scenario.mode.reentrant


def _assert_declared(technique, verdict, mode: str) -> None:
    """A verdict that fails, fails only with invariants the row declares in ``mode``."""
    assert set(verdict.invariants) <= technique.expected_in(mode), (
        f"{technique.name} broke undeclared invariants in {mode}:\n{verdict}")


# --- PEFT --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_verdicts():
    """``(row, model, mode) -> [(scenario, verdict), ...]`` over the row's recipe examples, judged once
    per module (per xdist worker)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    cache: dict = {}

    def get(row, model, mode):
        key = (row, model, mode)
        if key not in cache:
            cache[key] = [(s, iso.check(row(), s)) for s in recipe_examples(model, mode)]
        return cache[key]
    return get


PEFT_CASES = [(row, model, mode) for row in PEFT_TECHNIQUES for model in (LORA_BERT, LORA_BERT_MODULES_TO_SAVE)
              for mode in GATED_MODES]


@pytest.mark.parametrize("row, model, mode", PEFT_CASES,
                         ids=[f"{r.name}-{m.rpartition(':')[2]}-{k}" for r, m, k in PEFT_CASES])
def test_a_peft_row_breaks_only_what_it_declares(peft_verdicts, row, model, mode):
    judged = peft_verdicts(row, model, mode)
    assert judged, "no recipe example"
    for scenario, verdict in judged:
        _assert_declared(row(), verdict, mode)


@pytest.mark.parametrize("model", [LORA_BERT, LORA_BERT_MODULES_TO_SAVE], ids=lambda m: m.rpartition(":")[2])
@pytest.mark.parametrize("mode", GATED_MODES)
def test_set_requires_grad_holds_except_in_a_starved_reentrant_checkpoint(peft_verdicts, model, mode):
    """Sound: the base stays as get_peft_model froze it and exactly the named adapters switch. A
    reentrant checkpoint of the encoder is fed only by the frozen embeddings: the adapters in it get
    no gradient (transformers#21381's mechanism, on a PEFT model)."""
    for scenario, verdict in peft_verdicts(PeftSetRequiresGrad, model, mode):
        if _reentrant(scenario):
            assert "trainable-trains" in verdict.invariants, str(verdict)
            assert ".lora_" in next(v.message for v in verdict.violations if v.invariant == "trainable-trains")
        else:
            assert verdict.ok, f"{scenario.intent!r} in {scenario.mode!r}\n{verdict}"


@pytest.mark.parametrize("model", [LORA_BERT, LORA_BERT_MODULES_TO_SAVE], ids=lambda m: m.rpartition(":")[2])
@pytest.mark.parametrize("mode", ("eager", "autocast"))
def test_loading_a_trainable_adapter_thaws_the_frozen_active_one(peft_verdicts, model, mode):
    """peft#3580 on PEFT 0.18.0: load_adapter(..., is_trainable=True) re-applies set_adapter(active,
    inference_mode=False): the frozen adapter moves. And it freezes the modules_to_save copy of the
    adapter in training."""
    for scenario, verdict in peft_verdicts(PeftLoadAdapterTrainable, model, mode):
        frozen = _frozen_adapters(scenario)
        head_trains = model == LORA_BERT_MODULES_TO_SAVE and "default" not in frozen
        if frozen:
            assert verdict.first.invariant == "frozen-unchanged", str(verdict)
            (name,) = frozen
            assert f".lora_A.{name}.weight" in verdict.first.message, str(verdict)
        if head_trains:
            message = next(v.message for v in verdict.violations if v.invariant == "trainable-trains")
            assert message.startswith("model.base_model.model.classifier.modules_to_save.default.weight"), message
        if not frozen and not head_trains:
            assert verdict.ok, str(verdict)


@pytest.mark.parametrize("model", [LORA_BERT, LORA_BERT_MODULES_TO_SAVE], ids=lambda m: m.rpartition(":")[2])
@pytest.mark.parametrize("mode", GATED_MODES)
def test_adding_an_inference_adapter_freezes_every_active_one(peft_verdicts, model, mode):
    """peft#3487 on PEFT 0.18.0: add_adapter with inference_mode=True re-applies set_adapter(active,
    inference_mode=True): nothing is left to train, and torch refuses the empty optimizer."""
    for scenario, verdict in peft_verdicts(PeftAddAdapterInference, model, mode):
        assert verdict.invariants == ("no-crash",), str(verdict)
        assert "optimizer got an empty parameter list" in verdict.first.message


def test_peft_rows_under_compile():
    """One recipe example per verdict under compile: what eager gives (a frozen adapter thawed by
    load_adapter moves; set_requires_grad holds), in one step, compiling the first encoder layer (where
    both adapters sit): compiling the whole model costs about 12 s a check, for the same verdicts."""
    pytest.importorskip("peft")
    scenario = next(s for s in recipe_examples(LORA_BERT, "compile") if _frozen_adapters(s) == {"default"})
    scenario = dataclasses.replace(scenario, steps=1, micro_batches=1,
                                   mode=Mode("compile", "model.base_model.model.bert.encoder.layer.0"))
    bad = iso.check(PeftLoadAdapterTrainable(), scenario)
    assert bad.first.invariant == "frozen-unchanged" and ".lora_A.default." in bad.first.message, str(bad)
    _assert_declared(PeftLoadAdapterTrainable(), bad, "compile")
    assert iso.check(PeftSetRequiresGrad(), scenario).ok


def _peft_model(**config):
    from peft import LoraConfig, get_peft_model
    from isolation_suite.zoo_peft import _bert

    return get_peft_model(_bert(), LoraConfig(r=2, target_modules=["query"], init_lora_weights=False, **config))


def _flags(model, adapter: str) -> set[bool]:
    return {p.requires_grad for n, p in model.named_parameters() if f".{adapter}." in n}


def test_peft_flags_behind_the_verdicts():
    """What PEFT 0.18.0 leaves, read off the flags: peft#3580's loaded adapter stays frozen (and the
    frozen one is thawed); PR #2765's fix holds (a modules_to_save copy loaded with is_trainable=False
    is frozen)."""
    pytest.importorskip("peft")
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as folder:
        _peft_model(modules_to_save=["classifier"]).save_pretrained(folder)
        from isolation_suite.zoo_peft import _bert
        loaded = PeftModel.from_pretrained(_bert(), folder, is_trainable=False)
        assert _flags(loaded, "default") == {False}  # PR #2765: the classifier copy included
        loaded.load_adapter(folder, adapter_name="other", is_trainable=True)
        assert _flags(loaded, "default") == {True}, "peft#3580 no longer reproduces: update the row"
        assert _flags(loaded, "other") == {False}


def test_peft_untied_modules_to_save_copies():
    """peft#2879's report on PEFT 0.18.0, shown on the harness's tree of a tied model (a tie is
    structure, the same on both sides, so the oracle cannot judge it): with modules_to_save naming both
    the embedding and the LM head, their copies are two parameters, even with ensure_weight_tying=True;
    naming the embedding alone with ensure_weight_tying=True keeps one."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from isolation_suite.model.tree import module_tree

    def copies_tied(modules_to_save, ensure):
        config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                             tie_word_embeddings=True, attn_implementation="eager")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
                r=2, target_modules=["q_proj"], modules_to_save=modules_to_save, ensure_weight_tying=ensure))
        tree = module_tree(model, (torch.randint(0, 32, (1, 4)),))
        copy = "base_model.model.model.embed_tokens.modules_to_save.default.weight"
        return any(copy in tie for tie in tree.ties)

    assert not copies_tied(["embed_tokens", "lm_head"], False)
    assert not copies_tied(["embed_tokens", "lm_head"], True), "peft#2879 no longer reproduces: update the docs"
    assert copies_tied(["embed_tokens"], True)


def test_an_intent_peft_cannot_express_is_one_clear_error():
    """PEFT freezes the whole base and whole adapters: a search's single module is refused with what
    the row realises, as a no-crash verdict; the recipe intents are accepted."""
    pytest.importorskip("peft")
    from isolation_suite.model.factory import make
    from isolation_suite.techniques.library_peft import adapter_plan, recipe_intents

    model = make(LORA_BERT, 0).model
    plans = [adapter_plan(model, intent) for intent in recipe_intents(model)]
    assert [p.frozen for p in plans] == [(), ("default",), ("other",)]
    with pytest.raises(AdapterIntentError, match="base parameters in all\\) trainable"):
        adapter_plan(model, Intent(frozen_modules=("model.base_model.model.bert.embeddings",)))
    partial = recipe_intents(model)[1].frozen_modules[:-1]  # one lora_B.default left out
    with pytest.raises(AdapterIntentError, match="freezes part of adapter 'default'"):
        adapter_plan(model, Intent(frozen_modules=partial))
    drawn = Scenario(None, Intent(frozen_modules=("model.base_model.model.classifier",)),
                     OptimizerRecipe("SGD", (("lr", 0.1),)), Data(1, 0, False, "mse"), 1, 1, "float32", 0, LORA_BERT)
    verdict = iso.check(PeftSetRequiresGrad(), drawn)
    assert verdict.invariants == ("no-crash",) and "AdapterIntentError" in verdict.first.message


@pytest.mark.parametrize("name", sorted(PEFT_ZOO))
def test_the_peft_factories_hold_both_adapters_active_over_a_frozen_base(name):
    pytest.importorskip("peft")
    model, (input_ids,) = PEFT_ZOO[name]()
    assert model.model.active_adapters == ["default", "other"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".modules_to_save.default." in n for n in trainable), trainable
    assert {n.split(".lora_")[1].split(".")[1] for n in trainable if ".lora_" in n} == {"default", "other"}
    assert any(".lora_B." in n for n in trainable) and model(input_ids).shape == (2, 2)


# --- transformers' gradient checkpointing ------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


#: every gated mode on BERT, eager on GPT-2 (the modes are gated on BERT's embeddings, the harder case)
GC_MODELS = (("isolation_suite.zoo:tiny_bert", GATED_MODES), ("isolation_suite.zoo:tiny_gpt2", ("eager",)))
GC_SOUND = [(row, model, mode) for row in (HFGradientCheckpointing, HFGradientCheckpointingInputGrads)
            for model, modes in GC_MODELS for mode in modes]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row, model, mode", GC_SOUND,
                         ids=[f"{r.name}-{m.rpartition(':')[2]}-{k}" for r, m, k in GC_SOUND])
def test_gradient_checkpointing_holds_on_transformers_5(hf, row, model, mode):
    """transformers#21381 does not reproduce on 5.25: gradient_checkpointing_enable enables input
    gradients itself, so every module frozen in turn (the coverage examples) leaves the checkpointed
    layers training, with or without the explicit enable_input_require_grads()."""
    result = search(row(), max_examples=3, model=model, mode=mode)
    assert result.failure is None, failure_message(result.failure, row.capabilities, result)
    assert result.coverage_examples > 0 or mode != "eager"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("mode", GATED_MODES)
def test_without_input_gradients_frozen_embeddings_starve_the_checkpointed_layers(hf, mode):
    """The state 4.x's gradient_checkpointing_enable left (disable_input_require_grads after it): with
    BERT's embeddings frozen the layers get no gradient."""
    row = HFGradientCheckpointingNoInputGrads
    result = search(row(), max_examples=3, model="isolation_suite.zoo:tiny_bert", mode=mode)
    assert result.failure is not None, f"{row.name} held on tiny_bert in {mode}"
    message = failure_message(result.failure, row.capabilities, result)
    assert result.failure.first.invariant == "trainable-trains", message
    assert "model.bert.encoder.layer.0." in result.failure.first.message, message
    assert result.failure.scenario.intent.frozen_modules == ("model.bert.embeddings",), message
    _assert_declared(row(), result.failure, mode)


def _gpt2_scenario(frozen: tuple[str, ...], kind: str = "eager") -> Scenario:
    """Two steps, one under compile (compiling costs more than training)."""
    steps, dtype = (1 if kind == "compile" else 2), ("float32" if kind == "autocast" else "float64")
    return Scenario(None, Intent(frozen_modules=frozen), OptimizerRecipe("SGD", (("lr", 0.1),)),
                    Data(1, 0, False, "mse"), steps, 1, dtype, 0, "isolation_suite.zoo:tiny_gpt2", Mode(kind))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ("eager", "compile"))
def test_gpt2_starves_only_where_both_of_its_embeddings_are_frozen(hf, kind):
    both = _gpt2_scenario(("model.transformer.wte", "model.transformer.wpe"), kind)
    verdict = iso.check(HFGradientCheckpointingNoInputGrads(), both)
    assert verdict.first.invariant == "trainable-trains", str(verdict)
    assert verdict.first.message.startswith("model.transformer.h.0."), str(verdict)
    _assert_declared(HFGradientCheckpointingNoInputGrads(), verdict, kind)
    for sound in (HFGradientCheckpointing, HFGradientCheckpointingInputGrads):
        assert iso.check(sound(), both).ok
    if kind == "eager":  # the position embedding still trains and feeds the layers
        assert iso.check(HFGradientCheckpointingNoInputGrads(), _gpt2_scenario(("model.transformer.wte",))).ok


def test_gradient_checkpointing_enable_hooks_the_embeddings_itself(hf):
    """The mechanism behind the sound verdicts, on the installed transformers."""
    from isolation_suite.zoo import tiny_bert

    model = tiny_bert()[0].model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert model._require_grads_hooks, "gradient_checkpointing_enable no longer enables input gradients"


# --- Lightning, per mode -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", LIGHTNING_TECHNIQUES[0].judged_modes)
def test_lightning_freezing_per_mode(mode):
    """In every mode the rows are judged in: caught where a BatchNorm is frozen, with a declared
    invariant; sound on a plain frozen Linear; under checkpoint, starved by a reentrant checkpoint."""
    pytest.importorskip("lightning")
    for row in LIGHTNING_TECHNIQUES:
        caught = iso.check(row(), in_mode(t.FROZEN_BATCHNORM, mode))
        assert not caught.ok and caught.first.invariant in row().expected_in(mode), str(caught)
        assert iso.check(row(), in_mode(t.FROZEN_LINEAR, mode)).ok
    if mode == "checkpoint":
        starved = iso.check(LIGHTNING_TECHNIQUES[0](), t.CHECKPOINT_STARVED)
        assert starved.first.invariant == "trainable-trains", str(starved)


# --- the compatibility table -------------------------------------------------------------------

def test_every_library_row_says_what_it_was_judged_on():
    for row in library_rows():
        assert row.library in ("lightning", "peft", "transformers"), row.name
        assert row.judged_on and row.modes and set(row.modes) <= set(MODE_KINDS), row.name
        assert "eager" in row.modes and row.verdict("eager") is not None
        assert row.spec.startswith("isolation_suite.techniques.library")
        assert iso.load_technique(row.spec).name == row.name
    assert len({row.name for row in library_rows()}) == len(LIBRARY_TECHNIQUES)
    assert library_modes()[0] == "eager"


class _Declared(iso.Technique):
    """A library row's declarations, as a row of the table reads them."""

    name = "declared"
    expected_violations = frozenset({"trainable-trains"})
    mode_violations = {"checkpoint": frozenset({"no-crash", "gradient-flows"}), "compile": frozenset()}
    library, judged_on, judged_models, judged_modes = "somelib", "1.2.3", (), ("eager", "checkpoint", "autocast")


def test_a_rows_cells_follow_its_declarations():
    row = LibraryRow(_Declared)
    assert row.verdict("eager") == row.verdict("autocast") == "trainable-trains"
    assert row.verdict("checkpoint") == "gradient-flows, no-crash, trainable-trains"  # the mode's own included
    assert row.verdict("compile") is None and row.verdict("ddp") is None  # not judged there
    assert row.verdict_line() == "trainable-trains; under checkpoint: gradient-flows, no-crash"
    assert row.installed() is None and row.spec == f"{__name__}:_Declared"
    assert library_modes((row,)) == ("eager", "checkpoint", "autocast")


LIST_AND_IMPORTS = textwrap.dedent('''
    import sys
    from isolation_suite.cli import main
    main(["list"])
    print("imported:", sorted(m for m in ("peft", "transformers", "lightning") if m in sys.modules))
''')


def test_list_shows_the_library_rows_with_installed_versions_and_imports_no_library(tmp_path):
    run = subprocess.run([sys.executable, "-c", LIST_AND_IMPORTS], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.strip().splitlines()[-1] == "imported: []"
    for row in library_rows():
        line = next(l for l in out.splitlines() if l.startswith(row.name + " "))
        assert f"{row.library} {installed_version(row.library) or '(not installed)'}" in line, line
        assert row.judged_on in line and row.verdict_line() in line, line
        assert f"  {row.spec}" in out


def test_the_html_report_carries_the_compatibility_table():
    from isolation_suite.reporting.report import html_report

    page = html_report({"run_id": "r", "complete": True, "ok": True, "meta": {}, "results": [], "matrix": {},
                        "modes": {"hf_gradient_checkpointing": {"eager": "held"}}, "items": None})
    section = page[page.index("<h2>Library compatibility</h2>"):page.index("<h2>Counterexamples</h2>")]
    for row in library_rows():
        assert f"<td>{row.name}</td>" in section
        assert f"<td>{row.library} {installed_version(row.library) or '(not installed)'}</td>" in section
    assert "<td>eager: held</td>" in section
    assert section.count("<td class='na'>—</td>") == sum(row.verdict(m) is None for row in library_rows()
                                                         for m in library_modes())
