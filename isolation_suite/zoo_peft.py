"""Tiny transformers models that carry PEFT LoRA adapters, built by PEFT's own code.

A LoRA adapter changes the function (``W x + B A x``), so a PEFT recipe cannot be judged as "freeze
module X" on a model without adapters: the adapters must be modules of the tree on both sides, the
technique's and the reference's. These factories build them with ``get_peft_model`` and
``add_adapter`` and put both adapters in the forward with PEFT's multi-adapter activation
(``base_model.set_adapter(["default", "other"])``), so the model is what a user holds before the
recipe under test runs: the base frozen by ``get_peft_model`` (``requires_grad=False`` on every
parameter outside the adapters), both adapters active and trainable. The recipe itself (which adapter
trains, what loading or adding another adapter does to them) runs in the technique's ``setup``; see
:mod:`isolation_suite.techniques.library_peft`.

LoRA's B matrices start random (``init_lora_weights=False``), not zero: with B = 0 the A matrices
would get no gradient at the first step, and a recipe that froze A by mistake would go unseen. The
base is the zoo's tiny BERT (``isolation_suite.zoo.tiny_bert``); weights come from the global torch
generator (the harness seeds it), the input batch from a private one. ``peft`` and ``transformers``
are imported inside the factories, so this module imports without them.
"""
from __future__ import annotations

from typing import Callable

import torch

from isolation_suite.zoo import HFLogits, _generator

#: the adapters every factory here builds, in activation order
ADAPTERS = ("default", "other")


def _lora(**extra):
    from peft import LoraConfig

    # rank 2 on the attention's query and value, as LoRA's paper does; random B (see the docstring)
    return LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False, **extra)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2, attn_implementation="eager")
    return BertForSequenceClassification(config)


def _two_adapters(first, second):
    """``get_peft_model`` with ``first`` as ``default``, ``add_adapter('other', second)``, both active."""
    from peft import get_peft_model

    peft_model = get_peft_model(_bert(), first)
    peft_model.add_adapter(ADAPTERS[1], second)
    # PEFT's multi-adapter activation: both deltas in the forward, both adapters trainable again (adding
    # `other` left it inactive and frozen)
    peft_model.base_model.set_adapter(list(ADAPTERS))
    input_ids = torch.randint(1, 32, (2, 5), generator=_generator(404))  # as tiny_bert: 0 is padding
    return HFLogits(peft_model), (input_ids,)


def lora_bert():
    """Tiny BERT with two LoRA adapters, ``default`` and ``other``, on every query and value."""
    return _two_adapters(_lora(), _lora())


def lora_bert_modules_to_save():
    """As :func:`lora_bert`, and ``default`` also trains a copy of the classifier head
    (``modules_to_save=["classifier"]``: a ``ModulesToSaveWrapper`` whose ``original_module`` is frozen
    and whose ``modules_to_save.default`` trains). A wrapper takes one active adapter, so ``other``
    has no copy."""
    return _two_adapters(_lora(modules_to_save=["classifier"]), _lora())


PEFT_ZOO: dict[str, Callable] = {
    "lora_bert": lora_bert,
    "lora_bert_modules_to_save": lora_bert_modules_to_save,
}
