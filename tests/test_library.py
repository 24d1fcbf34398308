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
from isolation_suite.spec.scenario import Change, Data, Intent, Layer, Mode, OptimizerRecipe, Scenario, chain
from isolation_suite.techniques import in_mode, movable
from isolation_suite.techniques import triggers as t
from isolation_suite.techniques.library import (LIBRARY_TECHNIQUES, LIGHTNING_TECHNIQUES, LibraryRow,
                                                LightningBackboneFinetuning, installed_version, library_modes,
                                                library_rows)
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
    for row in (r for r in LIGHTNING_TECHNIQUES if mode in r.judged_modes):
        caught = iso.check(row(), in_mode(t.FROZEN_BATCHNORM, mode))
        assert not caught.ok and caught.first.invariant in row().expected_in(mode), str(caught)
        assert iso.check(row(), in_mode(t.FROZEN_LINEAR, mode)).ok
    if mode == "checkpoint":
        starved = iso.check(LIGHTNING_TECHNIQUES[0](), t.CHECKPOINT_STARVED)
        assert starved.first.invariant == "trainable-trains", str(starved)


# --- Lightning's BackboneFinetuning: a freeze schedule -----------------------------------------

def _layernorm(path: str, features: int) -> Layer:
    return Layer(path, "layernorm", (("normalized_shape", features),))


#: a module that trained with momentum, frozen at step 2 and thawed again at step 3 (``set_to_none=True``:
#: nothing moves it while it is frozen)
RETHAW = dataclasses.replace(
    t.scenario([t.linear("pre"), t.linear("enc"), t.linear("fc")], ["pre", "enc", "fc"], Intent(),
               OptimizerRecipe("SGD", (("lr", 0.1), ("momentum", 0.9))), steps=4),
    schedule=(Change(2, ("enc",)), Change(3, ())))
#: the same with plain SGD: no state to carry over
RETHAW_PLAIN = dataclasses.replace(RETHAW, optimizer=t.SGD)
#: REFREEZE_MOMENTUM with ``zero_grad(set_to_none=True)``: the frozen module's gradient is None
REFREEZE_TO_NONE = dataclasses.replace(t.REFREEZE_MOMENTUM, optimizer=OptimizerRecipe(
    "SGD", (("lr", 0.1), ("momentum", 0.9))))
_TIED_LAYERS = [t.linear("pre"), t.linear("bb.enc"), t.linear("bb.dec"), t.linear("fc")]
#: a backbone holding both ends of a tie (an embedding and its tied decoder, say), thawed at step 2
TIED_BACKBONE = dataclasses.replace(
    t.THAW, intent=Intent(frozen_modules=("bb",)),
    architecture=chain((2,), _TIED_LAYERS, ["pre", "bb.enc", "bb.dec", "fc"], ties=(("bb.dec.weight", "bb.enc.weight"),)))
#: a thawed LayerNorm whose ones and zeros equal a trainable LayerNorm's, which has not moved: with one
#: feature a LayerNorm's output is its bias whatever its input, so nothing upstream of it gets gradient
EQUAL_VALUES = dataclasses.replace(
    t.scenario([_layernorm("norm", 1), _layernorm("enc", 1), t.linear("fc", 1, 1)], ["norm", "enc", "fc"],
               Intent(frozen_modules=("enc",)), steps=3, input_shape=(1,)),
    schedule=(Change(2, ()),))

BACKBONE_TRIGGERS = {"THAW": t.THAW, "THAW_BATCHNORM": t.THAW_BATCHNORM, "REFREEZE_MOMENTUM": t.REFREEZE_MOMENTUM,
                     "REFREEZE_TO_NONE": REFREEZE_TO_NONE, "RETHAW": RETHAW, "RETHAW_PLAIN": RETHAW_PLAIN,
                     "TIED_BACKBONE": TIED_BACKBONE, "EQUAL_VALUES": EQUAL_VALUES, "DDP_THAW": t.DDP_THAW,
                     "CHECKPOINT_STARVED": t.CHECKPOINT_STARVED}
#: where the row trains as the reference does: a thaw at the recipe's lr with fresh state, a refreeze whose
#: gradient is None, a module thawed again with no optimizer state to carry over
BACKBONE_SOUND = ("THAW", "REFREEZE_TO_NONE", "RETHAW_PLAIN")


@pytest.fixture(scope="module")
def backbone_verdicts():
    """``(trigger name, mode, technique name) -> (scenario, verdict)``: the trigger moved into the mode
    (``movable``: None where the mode cannot judge it), judged once per module."""
    pytest.importorskip("lightning")
    cache: dict = {}

    def get(name: str, mode: str, technique: str = LightningBackboneFinetuning.name):
        key = (name, mode, technique)
        if key not in cache:
            scenario = movable(BACKBONE_TRIGGERS[name], mode)
            row = LightningBackboneFinetuning() if technique == LightningBackboneFinetuning.name \
                else iso.catalog()[technique]
            cache[key] = (scenario, None if scenario is None else iso.check(row, scenario))
        return cache[key]
    return get


@pytest.mark.parametrize("mode", LightningBackboneFinetuning.judged_modes)
def test_backbone_finetuning_breaks_only_what_it_declares(backbone_verdicts, mode):
    """On every trigger, in every mode it is judged in: a verdict that fails, fails with declared
    invariants only; the plain thaw and the refreeze without stale state hold (outside ddp)."""
    judged = 0
    for name in BACKBONE_TRIGGERS:
        scenario, verdict = backbone_verdicts(name, mode)
        if verdict is None:  # a trained BatchNorm is not judged under ddp
            continue
        judged += 1
        _assert_declared(LightningBackboneFinetuning(), verdict, mode)
        if name in BACKBONE_SOUND and mode != "ddp":
            assert verdict.ok, f"{name} in {mode}\n{verdict}"
    assert judged >= len(BACKBONE_TRIGGERS) - 1


@pytest.mark.parametrize("mode", ("eager", "checkpoint", "autocast"))
def test_backbone_finetuning_train_bn_and_refreezing(backbone_verdicts, mode):
    """train_bn=True keeps a frozen BatchNorm training (its weight moves at step 1); a module frozen at a
    boundary stays in the optimizer, where zero_grad(set_to_none=False) leaves it a zero gradient that
    momentum moves at step 2 (pytorch#83769's mechanism)."""
    _, bn = backbone_verdicts("THAW_BATCHNORM", mode)
    assert bn.first.invariant == "frozen-unchanged" and bn.first.step == 1, str(bn)
    assert bn.first.message.startswith("enc.bn.weight"), str(bn)
    _, refrozen = backbone_verdicts("REFREEZE_MOMENTUM", mode)
    assert refrozen.first.invariant == "frozen-unchanged" and refrozen.first.step == 2, str(refrozen)
    assert refrozen.first.message.startswith("enc.weight"), str(refrozen)


@pytest.mark.parametrize("name, invariant, needle", [
    ("RETHAW", "matches-reference", "enc.weight"),  # the old momentum buffer, not fresh state
    ("TIED_BACKBONE", "matches-reference", "bb.enc.weight"),  # the tie stepped twice
    ("EQUAL_VALUES", "trainable-trains", "enc.bias never moved at step 2"),  # skipped by torch.equal
])
@pytest.mark.parametrize("mode", ("eager", "autocast"))
def test_backbone_finetuning_add_param_group_faults(backbone_verdicts, name, invariant, needle, mode):
    """What unfreeze_and_add_param_group adds, caught on its trigger with the declared invariant, where
    unfreeze_add_param_group (the same schedule with identity-based groups and fresh state) holds."""
    _, verdict = backbone_verdicts(name, mode)
    assert verdict.first.invariant == invariant and needle in verdict.first.message, str(verdict)
    assert verdict.first.step == (3 if name == "RETHAW" else 2), str(verdict)
    _, sound = backbone_verdicts(name, mode, "unfreeze_add_param_group")
    assert sound.ok, str(sound)


def test_backbone_finetuning_under_checkpoint_and_ddp(backbone_verdicts):
    """A reentrant checkpoint fed only by the frozen module starves. Under ddp a module thawed after
    DDP wrapped the model trains unaveraged (Lightning#20340): its first step differs, whatever DDP's
    options; a module frozen after the wrap leaves DDP waiting for its gradient (DDP's defaults or
    static_graph: no-crash), and with find_unused_parameters=True the same refreeze holds."""
    _, starved = backbone_verdicts("CHECKPOINT_STARVED", "checkpoint")
    assert starved.first.invariant == "trainable-trains" and "blk.lin.weight" in starved.first.message, str(starved)
    row = LightningBackboneFinetuning()
    scenario, thawed = backbone_verdicts("DDP_THAW", "ddp")
    assert thawed.first.invariant == "matches-reference" and thawed.first.step == 2, str(thawed)
    assert thawed.first.message.startswith("enc.weight"), str(thawed)
    for options in ({"find_unused": True}, {"static_graph": True}):
        verdict = iso.check(row, dataclasses.replace(scenario, mode=Mode("ddp", **options)))
        assert verdict.first.invariant == "matches-reference" and verdict.first.step == 2, str(verdict)
    refreeze, crashed = backbone_verdicts("REFREEZE_TO_NONE", "ddp")
    assert crashed.invariants == ("no-crash",), str(crashed)
    assert "Expected to have finished reduction in the prior iteration" in crashed.first.message
    assert iso.check(row, dataclasses.replace(refreeze, mode=Mode("ddp", find_unused=True))).ok
    _assert_declared(row, crashed, "ddp")


def test_backbone_finetuning_search_is_caught_in_every_mode():
    """The search (trigger examples first) catches the row with a declared invariant in every mode."""
    pytest.importorskip("lightning")
    from isolation_suite.reporting.report import outcome

    row = LightningBackboneFinetuning()
    for mode in row.judged_modes:
        result = search(row, max_examples=2, mode=mode, seed=0)
        assert outcome(result, row.expected_in(mode)) == ("caught", True), failure_message(
            result.failure, row.capabilities, result) if result.failure else f"held in {mode}"


def test_unfreeze_and_add_param_group_behind_the_verdicts():
    """Lightning's own calls, outside the harness: the thawed group's lr is the first group's over
    initial_denom_lr (1.0: the recipe's; Lightning's default 10); a parameter equal in value to one in the
    optimizer is skipped; a tie between two thawed modules lands in the group twice."""
    pytest.importorskip("lightning")
    import torch
    from lightning.pytorch.callbacks import BaseFinetuning

    def thaw(trainable, thawed, **kwargs):
        BaseFinetuning.freeze(thawed)
        optimizer = torch.optim.SGD([p for m in trainable for p in m.parameters()], lr=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            BaseFinetuning.unfreeze_and_add_param_group(thawed, optimizer, **kwargs)
        return optimizer.param_groups[1:], [str(w.message) for w in caught]

    torch.manual_seed(0)
    head, backbone = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    (group,), _ = thaw([head], [backbone], initial_denom_lr=1.0)
    assert group["lr"] == 0.1 and len(group["params"]) == 2
    (group,), _ = thaw([torch.nn.Linear(2, 2)], [torch.nn.Linear(2, 2)])
    assert group["lr"] == pytest.approx(0.01)  # Lightning's default initial_denom_lr=10
    groups, messages = thaw([torch.nn.LayerNorm(2)], [torch.nn.LayerNorm(2)], initial_denom_lr=1.0)
    assert groups == [], "filter_on_optimizer no longer compares by value: update lightning_backbone_finetuning"
    assert any("already exist within another group" in m for m in messages), messages
    enc, dec = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    dec.weight = enc.weight
    (group,), messages = thaw([torch.nn.Linear(2, 2)], [enc, dec], initial_denom_lr=1.0)
    assert sum(p is enc.weight for p in group["params"]) == 2, "a tie is no longer added twice: update the row"
    assert any("duplicate parameters" in m for m in messages), messages


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


# --- modes of several ranks: the user's model split between two processes ----------------------

def _bert_frozen_embeddings(mode: Mode) -> Scenario:
    return Scenario(None, Intent(frozen_modules=("model.bert.embeddings",)), OptimizerRecipe("SGD", (("lr", 0.1),)),
                    Data(1, 0, False, "mse"), 2, 1, "float32", 0, "isolation_suite.zoo:tiny_bert", mode)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("mode, sound, starved", [
    (Mode("ddp"), (), ("no-crash",)),
    (Mode("ddp", static_graph=True), (), ("trainable-trains", "matches-reference")),
    (Mode("ddp", find_unused=True), ("no-crash",), ("trainable-trains", "matches-reference")),
    (Mode("fsdp", nested=True), (), ("trainable-trains", "matches-reference")),
], ids=repr)
def test_gradient_checkpointing_under_ddp_and_fsdp(hf, mode, sound, starved):
    """BERT with frozen embeddings, its batch split between two processes. The model's own reentrant
    checkpoints meet DDP's reducer: with find_unused_parameters=True it marks a layer's parameters
    ready twice and raises; without input gradients the layers get none, and with DDP's defaults
    their bucket is never reduced (the next forward raises)."""
    scenario = _bert_frozen_embeddings(mode)
    for row, expected in ((HFGradientCheckpointing, sound), (HFGradientCheckpointingNoInputGrads, starved)):
        verdict = iso.check(row(), scenario)
        assert verdict.invariants == expected, f"{row.name} in {mode}:\n{verdict}"
        _assert_declared(row(), verdict, mode.kind)


@pytest.mark.parametrize("row", PEFT_TECHNIQUES, ids=lambda r: r.name)
@pytest.mark.parametrize("mode", ("ddp", "fsdp"))
def test_peft_rows_keep_their_verdicts_with_the_batch_split(peft_verdicts, row, mode):
    verdicts = peft_verdicts(row, LORA_BERT, mode)
    for scenario, verdict in verdicts:
        _assert_declared(row(), verdict, mode)
    assert any(not v.ok for _, v in verdicts) == bool(row().expected_in(mode)), row.name
