"""transformers' gradient checkpointing on a partly frozen model, judged through the plug-in contract.

``PreTrainedModel.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})``
wraps every layer's call in a reentrant ``torch.utils.checkpoint``. A reentrant checkpoint records
its region only where one of its inputs needs gradient, so with frozen embeddings feeding the layers
(``requires_grad = False``, as fine-tuning freezes them) the layers' parameters get no gradient
(transformers#21381); ``enable_input_require_grads()`` is the fix: a forward hook that makes the input
embeddings' output need gradient.

What transformers 5.25.0 does (``modeling_utils.py``, ``_activation_checkpointing_enable``, reached
through the deprecated alias ``gradient_checkpointing_enable``): it calls ``enable_input_require_grads()``
itself wherever ``main_input_name == "input_ids"`` (or an adapter was loaded through transformers'
own PEFT integration, ``_hf_peft_config_loaded``, the only case 4.x covered). So on a text model the
report no longer reproduces, with or without the explicit call: both rows are sound. The third row
builds the state 4.x left behind, with transformers' own ``disable_input_require_grads()`` after
enabling, and is caught where the embeddings feeding the checkpointed layers are all frozen.

The freezing is ``freeze_and_eval``'s (``requires_grad = False`` and the frozen modules kept in eval
mode), so that the verdict is about the checkpointing: plain ``requires_grad = False`` leaves a frozen
Dropout dropping, which ``requires_grad_false`` already shows. The rows need a ``PreTrainedModel`` in
the model (``isolation_suite.zoo:tiny_bert``, ``tiny_gpt2``; on a generated model ``setup`` raises).
``transformers`` is imported when ``setup`` runs, never when this module is.
"""
from __future__ import annotations

import warnings

from torch import nn

from isolation_suite.techniques.freeze_module import FreezeAndEval

#: the execution modes the rows' verdicts were judged in
JUDGED_MODES = ("eager", "checkpoint", "compile", "autocast", "ddp", "fsdp")
#: DistributedDataParallel with ``find_unused_parameters=True`` over the model's own reentrant
#: checkpoints: each checkpointed layer's backward runs as a backward of its own, and DDP's reducer,
#: searching the graph for unused parameters, marks a layer's parameters ready a second time
#: ("Expected to mark a variable ready only once"); with DDP's defaults or ``static_graph=True`` it runs
REENTRANT_UNDER_DDP = {"ddp": frozenset({"no-crash"})}
#: dropout-free models: on ``bert_with_mask`` the harness's per-call dropout seeding draws other masks
#: when the model's own checkpoint recomputes a layer in backward (see docs/compatibility.md)
JUDGED_MODELS = ("isolation_suite.zoo:tiny_bert", "isolation_suite.zoo:tiny_gpt2")


def pretrained_model_of(model: nn.Module) -> nn.Module:
    """The outermost ``transformers.PreTrainedModel`` inside ``model`` (the harness's model may wrap it)."""
    from transformers import PreTrainedModel

    found = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if found is None:
        raise TypeError(f"{type(model).__name__} holds no transformers PreTrainedModel: gradient_checkpointing_enable "
                        "needs one (isolation_suite.zoo:tiny_bert, tiny_gpt2)")
    return found


class HFGradientCheckpointing(FreezeAndEval):
    """``freeze_and_eval``, then ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=
    {"use_reentrant": True})`` on the model's ``PreTrainedModel``.

    Sound on transformers 5.25.0: the call enables input gradients on the embeddings itself, so a
    layer fed only by frozen embeddings still gets gradient (transformers#21381 does not reproduce)."""

    name = "hf_gradient_checkpointing"
    summary = ("freeze_and_eval, then the model's gradient_checkpointing_enable(use_reentrant=True); transformers "
               "5.25 enables input gradients itself")
    seed = "transformers#21381"
    #: the checkpointing is the model's own, and its input gradients reach a region the mode checkpoints too;
    #: under ddp with find_unused_parameters=True the reentrant checkpoints crash DDP's reducer
    mode_violations = REENTRANT_UNDER_DDP
    library = "transformers"
    judged_on = "5.25.0"
    judged_models = JUDGED_MODELS
    judged_modes = JUDGED_MODES

    def setup(self, model, intent):
        super().setup(model, intent)
        pretrained = pretrained_model_of(model)
        with warnings.catch_warnings():  # 5.25 deprecates the name in favour of activation_checkpointing_enable
            warnings.simplefilter("ignore", FutureWarning)
            pretrained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        self.after_enabling(pretrained)

    def after_enabling(self, pretrained: nn.Module) -> None:
        """What the recipe does next (nothing here)."""


class HFGradientCheckpointingInputGrads(HFGradientCheckpointing):
    """:class:`HFGradientCheckpointing` plus an explicit ``enable_input_require_grads()``: the documented
    fix, sound (a second hook on the same embeddings changes nothing)."""

    name = "hf_gradient_checkpointing_input_grads"
    summary = "hf_gradient_checkpointing plus model.enable_input_require_grads() (the documented fix)"

    def after_enabling(self, pretrained):
        pretrained.enable_input_require_grads()


class HFGradientCheckpointingNoInputGrads(HFGradientCheckpointing):
    """:class:`HFGradientCheckpointing`, then ``disable_input_require_grads()``: the state transformers 4.x's
    ``gradient_checkpointing_enable`` left a model without adapters it loaded itself.

    Known-bad: where every embedding feeding the checkpointed layers is frozen (BERT's
    ``embeddings``; GPT-2's ``wte`` and ``wpe`` both), the reentrant checkpoints get no input that needs
    gradient and the layers' parameters get none (``trainable-trains``), so they train unlike the
    reference's (``matches-reference``). Under ddp with DDP's defaults the parameters that get no
    gradient leave their bucket unreduced and the next forward raises ("Expected to have finished
    reduction in the prior iteration": ``no-crash``), as for every row that leaves a parameter DDP
    reduces without gradient."""

    name = "hf_gradient_checkpointing_no_input_grads"
    expected_violations = frozenset({"trainable-trains", "matches-reference"})
    summary = "hf_gradient_checkpointing, then model.disable_input_require_grads(): what 4.x left (transformers#21381)"

    def after_enabling(self, pretrained):
        pretrained.disable_input_require_grads()


HF_TECHNIQUES = (HFGradientCheckpointing, HFGradientCheckpointingInputGrads, HFGradientCheckpointingNoInputGrads)
