"""PEFT's adapter recipes, judged through the plug-in contract, each calling PEFT's own code.

**What a PEFT recipe can mean as an intent.** PEFT trains adapters and freezes the base model; it has
no call that freezes one module and trains the rest. So these techniques realise exactly the
``FREEZE_MODULE`` intents that PEFT can express: the whole base frozen, and each adapter either
frozen whole or trained whole. The intent names the base's modules and the frozen adapters' modules
(``recipe_intents``); the reference then detaches them whatever their ``requires_grad`` flags, so
PEFT's freezing of the base is judged too. Any other intent (the search's one or two modules at a
time) raises :class:`AdapterIntentError`, which names what the technique realises: these rows are
judged on their recipe examples (``recipe_examples``), not by ``isolation-suite check``'s search.

**The model** carries the adapters on both sides (``isolation_suite.zoo_peft``): a tiny BERT with LoRA
adapters ``default`` and ``other`` on every query and value, both active, built by ``get_peft_model``
and ``add_adapter``. ``setup`` runs the recipe on it: ``PeftModel.set_requires_grad`` for what the
intent freezes and trains, then (two of the rows) adding or loading a further adapter, which is not
activated and so stays outside the forward: what is judged is what that call does to the adapters
that are there. The optimizer is built over the parameters that require gradient, as a training
loop over a PEFT model does.

What PEFT 0.18.0 does (``peft/tuners/tuners_utils.py``, ``BaseTuner.inject_adapter``, its
"housekeeping" after a new adapter's layers exist): ``self.set_adapter(self.active_adapters,
inference_mode=peft_config.inference_mode)`` re-applies the *new* adapter's ``inference_mode`` to the
*active* ones, so loading an adapter with ``is_trainable=True`` (``inference_mode=False``) makes every
active adapter trainable, a frozen one included (peft#3580), and adding one with
``inference_mode=True`` freezes every active one (peft#3487); then
``_mark_only_adapters_as_trainable(model)`` switches off every parameter whose name lacks ``lora_``,
which freezes the active adapter's ``modules_to_save`` copy as well.

``peft`` is imported when a technique's ``setup`` runs (the model already holds PEFT's modules, so
the import is done by then) and never when this module is.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass

from torch import nn

from isolation_suite.model.factory import factory_tree, make
from isolation_suite.model.tree import ModelTree, feeds_region, mode_targets
from isolation_suite.spec.scenario import Data, Intent, Mode, OptimizerRecipe, Scenario
from isolation_suite.technique import Capability, Technique

FREEZE = frozenset({Capability.FREEZE_MODULE})
LORA_BERT = "isolation_suite.zoo_peft:lora_bert"
LORA_BERT_MODULES_TO_SAVE = "isolation_suite.zoo_peft:lora_bert_modules_to_save"
#: the execution modes the rows' verdicts were judged in
JUDGED_MODES = ("eager", "checkpoint", "compile", "autocast", "ddp", "fsdp")
#: a reentrant checkpoint whose region is fed only by the frozen base (the embeddings) gets no input
#: that needs gradient: the adapters inside get none (trainable-trains), and where nothing else reaches
#: the loss it has no gradient at all (gradient-flows); PEFT calls ``enable_input_require_grads`` only
#: when the model already had gradient checkpointing on when it was wrapped
STARVES_REENTRANT_CHECKPOINT = {"checkpoint": frozenset({"gradient-flows", "trainable-trains", "matches-reference"})}


class AdapterIntentError(ValueError):
    """An intent PEFT cannot express: it must freeze the whole base model and whole adapters."""


@dataclass(frozen=True)
class AdapterPlan:
    """What an intent asks of a PEFT model: the adapters to freeze and the ones to train."""

    frozen: tuple[str, ...]
    trainable: tuple[str, ...]


def peft_model_of(model: nn.Module) -> nn.Module:
    """The ``peft.PeftModel`` inside ``model`` (the harness's model may wrap it)."""
    from peft import PeftModel

    found = next((m for m in model.modules() if isinstance(m, PeftModel)), None)
    if found is None:
        raise AdapterIntentError(f"{type(model).__name__} holds no peft.PeftModel: judge the PEFT rows on a model "
                                 f"that carries adapters ({LORA_BERT})")
    return found


def adapter_modules(model: nn.Module) -> dict[str, str]:
    """Every adapter's modules in ``model``: path -> adapter name, in tree order. PEFT's own classes say
    which they are: a tuner layer's ``adapter_layer_names`` (``lora_A``, ``lora_B``, ...) and a
    ``modules_to_save`` wrapper's copies."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    out: dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            for layer_name in module.adapter_layer_names:
                holder = getattr(module, layer_name)
                if isinstance(holder, nn.ModuleDict):
                    out.update((f"{path}.{layer_name}.{name}", name) for name in holder)
    return out


def _adapter_parameters(model: nn.Module, adapters: dict[str, str]) -> set[int]:
    """The ids of the parameters the ``adapters`` modules hold."""
    return {id(p) for path in adapters for p in model.get_submodule(path).parameters()}


def base_modules(model: nn.Module, adapters: dict[str, str]) -> tuple[str, ...]:
    """The outermost modules that hold parameters and no adapter's: the base model, as few paths as
    cover it (a LoRA layer's ``base_layer``, a wrapper's ``original_module``, whole blocks elsewhere)."""
    ids = _adapter_parameters(model, adapters)
    out: list[str] = []

    def walk(path: str, module: nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(id(p) in ids for p in params):
            out.append(path)
            return
        for name, child in module.named_children():
            walk(f"{path}.{name}" if path else name, child)
    walk("", model)
    return tuple(out)


def adapter_plan(model: nn.Module, intent: Intent) -> AdapterPlan:
    """The adapters ``intent`` freezes and trains; AdapterIntentError where PEFT cannot express it."""
    adapters = adapter_modules(model)
    names = tuple(dict.fromkeys(adapters.values()))
    if not names:
        raise AdapterIntentError("the model holds no PEFT adapter")
    ids = _adapter_parameters(model, adapters)
    trainable_base = [n for n, p in model.named_parameters() if id(p) not in ids and not intent.is_frozen_param(n)]
    if trainable_base:
        raise AdapterIntentError(f"the intent leaves {trainable_base[0]} ({len(trainable_base)} base parameters in "
                                 "all) trainable, but PEFT trains adapters only: realisable intents freeze the whole "
                                 "base model and whole adapters")
    frozen = []
    for name in names:
        mine = [path for path, owner in adapters.items() if owner == name]
        count = sum(intent.is_frozen_module(path) for path in mine)
        if 0 < count < len(mine):
            raise AdapterIntentError(f"the intent freezes part of adapter {name!r} ({count} of its {len(mine)} "
                                     "modules); PEFT freezes or trains an adapter whole")
        if count:
            frozen.append(name)
    return AdapterPlan(tuple(frozen), tuple(n for n in names if n not in frozen))


def recipe_intents(model: nn.Module) -> tuple[Intent, ...]:
    """Intents PEFT can express on ``model``: the base frozen, with no adapter frozen, then with each
    adapter frozen alone (all frozen would leave nothing to train)."""
    adapters = adapter_modules(model)
    base = base_modules(model, adapters)
    names = tuple(dict.fromkeys(adapters.values()))
    subsets = [()] + ([(name,) for name in names] if len(names) > 1 else [])
    return tuple(Intent(frozen_modules=base + tuple(p for p, n in adapters.items() if n in subset))
                 for subset in subsets)


#: the recipes the examples train with, in turn: plain SGD, Adam with gradient-norm clipping (a frozen
#: adapter's gradient must not count), AdamW's weight decay (a frozen adapter must not decay)
RECIPES = (OptimizerRecipe("SGD", (("lr", 0.1),)),
           OptimizerRecipe("Adam", (("lr", 0.05),), clip="norm", clip_value=0.05),
           OptimizerRecipe("AdamW", (("lr", 0.05), ("weight_decay", 0.1))))


def recipe_modes(tree: ModelTree, adapters: dict[str, str], kind: str) -> tuple[Mode, ...]:
    """Where a recipe example runs mode ``kind`` on a model with this ``tree`` and these ``adapters``:
    over the whole model, and for ``checkpoint`` also as a reentrant checkpoint of the outermost
    region that holds adapters and is fed by base modules only (the encoder, fed by the embeddings:
    a library's gradient checkpointing of its layers)."""
    if kind != "checkpoint":
        return (Mode(kind),)
    region = next(t for t in mode_targets(tree)
                  if t and _holds_adapters(t, adapters) and _fed_by_base(tree, t, adapters))
    return (Mode(kind), Mode(kind, region, reentrant=True))


def _holds_adapters(target: str, adapters: dict[str, str]) -> bool:
    return any(path.startswith(target + ".") for path in adapters)


def _fed_by_base(tree: ModelTree, target: str, adapters: dict[str, str]) -> bool:
    """Something feeds region ``target``, and none of it is an adapter's."""
    feeding = feeds_region(tree, target)
    return bool(feeding) and not any(path == a or path.startswith(a + ".") for path in feeding for a in adapters)


def recipe_examples(model: str, kind: str = "eager") -> tuple[Scenario, ...]:
    """The scenarios a PEFT row is judged on, on factory ``model`` in mode ``kind``: every intent of
    :func:`recipe_intents`, each with the next of :data:`RECIPES`, two steps (two micro-batches on
    odd ones), float64 (float32 under ``autocast``, which casts float32 only), in every placement of
    :func:`recipe_modes`."""
    built = make(model, 0).model
    intents = recipe_intents(built)
    dtype = "float32" if kind == "autocast" else "float64"
    out = []
    for mode in recipe_modes(factory_tree(model), adapter_modules(built), kind):
        for i, intent in enumerate(intents):
            out.append(Scenario(None, intent, RECIPES[i % len(RECIPES)], Data(1, i, False, "mse"), 2, 1 + i % 2,
                                dtype, 0, model, mode))
    return tuple(out)


class PeftSetRequiresGrad(Technique):
    """``PeftModel.set_requires_grad(frozen, False)`` and ``(trained, True)`` (PEFT >= 0.18), on the
    LoRA model ``get_peft_model`` built, optimizer over the parameters that require gradient.

    Sound in eager, compile and autocast: ``set_requires_grad`` switches exactly the named adapters'
    layers (``lora_A``, ``lora_B``) and their ``modules_to_save`` copies, and leaves the base as
    ``get_peft_model`` froze it. Under ``checkpoint`` it starves a reentrant checkpoint of the encoder
    like every ``requires_grad = False`` recipe: the frozen embeddings feed it nothing that needs
    gradient, so the adapters inside get none."""

    name = "peft_set_requires_grad"
    capabilities = FREEZE
    mode_violations = STARVES_REENTRANT_CHECKPOINT
    summary = ("PeftModel.set_requires_grad(frozen adapters, False), (the others, True) on a get_peft_model LoRA "
               "model; optimizer over requires_grad params")
    library = "peft"
    judged_on = "0.18.0"
    judged_models = (LORA_BERT, LORA_BERT_MODULES_TO_SAVE)
    judged_modes = JUDGED_MODES

    def setup(self, model, intent):
        peft_model = peft_model_of(model)
        plan = adapter_plan(model, intent)
        if plan.frozen:
            peft_model.set_requires_grad(list(plan.frozen), requires_grad=False)
        if plan.trainable:
            peft_model.set_requires_grad(list(plan.trainable), requires_grad=True)
        self.after_freezing(peft_model, plan)

    def after_freezing(self, peft_model: nn.Module, plan: AdapterPlan) -> None:
        """What the recipe does next (nothing here)."""

    def make_optimizer(self, model, intent, build):
        return build(filter(lambda p: p.requires_grad, model.parameters()))


class PeftLoadAdapterTrainable(PeftSetRequiresGrad):
    """:class:`PeftSetRequiresGrad`, then ``load_adapter(path, "loaded", is_trainable=True)`` of a saved
    copy of the model's last adapter (``other``, which has no ``modules_to_save``; the loaded one is not
    activated, so it stays outside the forward), as peft#3580 loads a second adapter to train.

    Known-bad on PEFT 0.18.0: ``inject_adapter`` re-applies ``set_adapter(active_adapters,
    inference_mode=False)``, which makes every active adapter trainable again: a frozen one moves
    (``frozen-unchanged``; the first reported is its ``lora_A``). Where no adapter is frozen it holds,
    except that ``_mark_only_adapters_as_trainable`` also freezes the active adapter's
    ``modules_to_save`` copy: the classifier head the intent trains gets no gradient
    (``trainable-trains``). The loaded adapter itself is left frozen (peft#3580's other half: it is
    not active, so that is a matter of flags, shown in ``tests/test_library.py``)."""

    name = "peft_load_adapter_trainable"
    expected_violations = frozenset({"frozen-unchanged", "trainable-trains", "matches-reference"})
    summary = ("peft_set_requires_grad, then load_adapter(saved, 'loaded', is_trainable=True): the active adapters "
               "are all made trainable (peft#3580)")
    seed = "peft#3580"

    def after_freezing(self, peft_model, plan):
        name = list(peft_model.peft_config)[-1]  # a saved copy of the model's last adapter
        with tempfile.TemporaryDirectory(prefix="isolation-peft-") as folder:
            peft_model.save_pretrained(folder, selected_adapters=[name])
            # save_pretrained puts every adapter but `default` in a subfolder named after it
            path = folder if name == "default" else f"{folder}/{name}"
            peft_model.load_adapter(path, adapter_name="loaded", is_trainable=True)


class PeftAddAdapterInference(PeftSetRequiresGrad):
    """:class:`PeftSetRequiresGrad`, then ``add_adapter("added", config)`` of an adapter with
    ``inference_mode=True`` (not activated), as peft#3487 adds one for inference next to the one in
    training.

    Known-bad on PEFT 0.18.0: ``inject_adapter`` re-applies ``set_adapter(active_adapters,
    inference_mode=True)``, which freezes every active adapter, and the ``modules_to_save`` copy with
    them. On these models nothing is left that requires gradient, so the optimizer over the trainable
    parameters is empty and torch refuses it: ``ValueError: optimizer got an empty parameter list``
    (``no-crash``, in every mode, before any step)."""

    name = "peft_add_adapter_inference"
    expected_violations = frozenset({"no-crash"})
    mode_violations = {}
    summary = ("peft_set_requires_grad, then add_adapter('added', LoraConfig(inference_mode=True)): the active "
               "adapters are all frozen (peft#3487)")
    seed = "peft#3487"

    def after_freezing(self, peft_model, plan):
        config = copy.deepcopy(peft_model.peft_config[list(peft_model.peft_config)[-1]])
        config.inference_mode = True
        peft_model.add_adapter("added", config)


PEFT_TECHNIQUES = (PeftSetRequiresGrad, PeftLoadAdapterTrainable, PeftAddAdapterInference)
