"""Real ``transformers`` model classes built from a tiny configuration (``isolation_suite.spec.hf``).

``factory(config)`` is a zero-argument model factory like the zoo's: a new model on every call,
its weights drawn by transformers' own initialisation from the global torch generator (which the
harness seeds from the scenario's ``init_seed``), and a fixed batch of token ids drawn from a
private generator. The model is called as ``model(input_ids)`` and returns the logits; the loss is
token cross-entropy, as these heads are trained. ``transformers`` is imported when a model is built.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from isolation_suite.spec.hf import HFConfig

VOCAB = 16
#: two sequences of five tokens; the position tables hold a few more
BATCH, LENGTH, POSITIONS = 2, 5, 8
INPUT_SEED = 4242


class HFLogits(nn.Module):
    """Calls a Hugging Face model on ``input_ids`` and returns only its logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def token_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, L, V) logits; the argmax turns a random float target into class labels."""
    return F.cross_entropy(output.flatten(0, 1), target.flatten(0, 1).argmax(-1))


def _bert(c: HFConfig) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=VOCAB, hidden_size=c.number("hidden"), num_hidden_layers=c.number("layers"),
                        num_attention_heads=c.number("heads"), intermediate_size=2 * c.number("hidden"),
                        max_position_embeddings=POSITIONS, hidden_dropout_prob=c.dropout_p,
                        attention_probs_dropout_prob=c.dropout_p, tie_word_embeddings=c.is_tied,
                        attn_implementation=c.attn)
    return BertForMaskedLM(config)


def _gpt2(c: HFConfig) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    # bos/eos ids must lie inside the tiny vocabulary; no cache, as there is no generation
    config = GPT2Config(vocab_size=VOCAB, n_embd=c.number("hidden"), n_layer=c.number("layers"),
                        n_head=c.number("heads"), n_inner=2 * c.number("hidden"), n_positions=POSITIONS,
                        resid_pdrop=c.dropout_p, embd_pdrop=c.dropout_p, attn_pdrop=c.dropout_p,
                        bos_token_id=0, eos_token_id=0, use_cache=False, tie_word_embeddings=c.is_tied,
                        attn_implementation=c.attn)
    return GPT2LMHeadModel(config)


def _llama(c: HFConfig) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=c.number("hidden"), intermediate_size=2 * c.number("hidden"),
                         num_hidden_layers=c.number("layers"), num_attention_heads=c.number("heads"),
                         num_key_value_heads=c.number("kv"), max_position_embeddings=POSITIONS,
                         attention_dropout=c.dropout_p, bos_token_id=0, eos_token_id=0, pad_token_id=None,
                         use_cache=False, tie_word_embeddings=c.is_tied, attn_implementation=c.attn)
    return LlamaForCausalLM(config)


BUILDERS: dict[str, Callable[[HFConfig], nn.Module]] = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}


def build(config: HFConfig) -> tuple[nn.Module, tuple[torch.Tensor], Callable]:
    """A new model of ``config`` (weights from the global generator), its batch and its loss."""
    model = HFLogits(BUILDERS[config.arch](config))
    # token 0 is BERT's padding index (its embedding row never gets a gradient): every class avoids it
    input_ids = torch.randint(1, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(INPUT_SEED))
    return model, (input_ids,), token_cross_entropy


def factory(config: HFConfig) -> Callable[[], tuple]:
    """The zero-argument factory of ``config``."""
    return functools.partial(build, config)
