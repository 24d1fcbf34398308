"""Hand-written model zoo: small, realistic architectures next to the generated ones.

Each entry is a zero-argument factory returning ``(model, example_inputs)`` or
``(model, example_inputs, loss)``. ``model`` is a float32 ``nn.Module`` on the CPU whose
weights are drawn from the global torch RNG at call time, so the caller's seed decides
them; ``example_inputs`` is a tuple of tensors for one small batch (token ids, masks and
float features alike), used as ``model(*example_inputs)``, and is drawn from a private
fixed-seed generator so it is the same on every call. ``loss(output, target)``, when given,
maps the output and a float target of the output's shape to a scalar; without it a mean
squared error over every floating-point tensor of the output is meant. The output is a float
tensor, a tuple whose first element is one, or a dict of them. Sizes are tiny so one forward
and backward costs milliseconds.

Besides the plain architectures, the zoo holds the shapes user code takes that a harness
must survive: a parameter read functionally outside its module's call (``tied_head_lm``), a
container called twice (``siamese``), a ``ModuleList`` and a ``ModuleDict`` iterated rather
than called, with a dict output (``multi_head_dict``), submodules called with keyword
arguments (``bert_with_mask``, ``transformer_encoder_kw``), and dropout active in many places
(those two), not only in one. The Hugging Face models import ``transformers`` inside their
factories, so this module imports without it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from isolation_suite.model.hf import HFLogits


def _generator(seed: int) -> torch.Generator:
    # private, so drawing inputs neither reads nor advances the global RNG that draws the weights
    return torch.Generator().manual_seed(seed)


# --- transformer encoder classifier -------------------------------------------------------


class TransformerClassifier(nn.Module):
    """Token embedding, a two-layer ``nn.TransformerEncoder``, mean pooling and a linear head."""

    def __init__(self, vocab: int = 16, d_model: int = 8, n_classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model=d_model, nhead=2, dim_feedforward=16, dropout=0.0,
                                           batch_first=True)
        # nested tensors would take a fused path that skips the per-module calls
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def transformer_classifier():
    model = TransformerClassifier()
    tokens = torch.randint(0, 16, (2, 5), generator=_generator(101))
    return model, (tokens,)


# --- ResNet-style CNN ---------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut, as in torchvision's ResNet-18 block."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        # no conv bias: the BatchNorm that follows subtracts it again, so its gradient would be ~0
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        # one parameter-free ReLU used twice per block, as torchvision does (not in place, so hooks stay legal)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetCNN(nn.Module):
    def __init__(self, n_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def resnet_cnn():
    model = ResNetCNN()
    # batch 4: BatchNorm in training mode needs more than one value per channel
    images = torch.randn(4, 3, 8, 8, generator=_generator(202))
    return model, (images,)


# --- LSTM language model with tied embedding/decoder weights ------------------------------


class LSTMLanguageModel(nn.Module):
    """Embedding -> LSTM -> dropout -> decoder, with the decoder sharing the embedding's weight."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, batch_first=True)
        self.drop = nn.Dropout(0.25)
        self.decoder = nn.Linear(dim, vocab)
        # weight tying: one Parameter reachable under two names
        self.decoder.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(tokens))
        return self.decoder(self.drop(hidden))


def token_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, L, V) logits; the argmax turns a random float target into class labels."""
    return F.cross_entropy(output.flatten(0, 1), target.flatten(0, 1).argmax(-1))


def lstm_language_model():
    model = LSTMLanguageModel()
    tokens = torch.randint(0, 20, (2, 6), generator=_generator(303))
    # a module-level function rather than a lambda, so the factory's result pickles
    return model, (tokens,), token_cross_entropy


# --- Hugging Face models, built from a config (random weights, no download) ---------------


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    # eager attention: plain matmul/softmax, no dispatch to a fused kernel that may differ by backend
    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2, attn_implementation="eager")
    model = HFLogits(BertForSequenceClassification(config))
    # token 0 is the padding index (its embedding row never gets a gradient), so inputs avoid it
    input_ids = torch.randint(1, 32, (2, 5), generator=_generator(404))
    return model, (input_ids,)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    # bos/eos ids must lie inside the tiny vocabulary; no cache, as there is no generation
    config = GPT2Config(vocab_size=32, n_embd=8, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False,
                        attn_implementation="eager")
    model = HFLogits(GPT2LMHeadModel(config))  # lm_head.weight is tied to transformer.wte.weight
    input_ids = torch.randint(0, 32, (2, 5), generator=_generator(505))
    return model, (input_ids,)


class HFMaskedLogits(nn.Module):
    """Calls a Hugging Face model with keyword arguments only (``input_ids=``, ``attention_mask=``), as
    a tokenizer's output is passed, and returns its logits. The mask is an input, not a buffer, so a
    split of the batch splits it too."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def bert_with_mask():
    """A BERT classifier called with ``attention_mask=`` as a keyword on a padded batch, with
    transformers' default dropout (0.1 on hidden states and attention probabilities). The mask
    reaches the encoder and each self-attention as a keyword, each layer positionally next to
    keyword arguments; the attention-probability dropout is functional, inside the attention."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, num_labels=2,
                        attn_implementation="eager")
    model = HFMaskedLogits(BertForSequenceClassification(config))
    input_ids = torch.randint(1, 32, (2, 5), generator=_generator(606))
    # the second sequence is two tokens shorter: padding id 0, masked out
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    input_ids[1, 3:] = 0
    return model, (input_ids, mask)


# --- shapes user code takes ---------------------------------------------------------------


class TiedEncoder(nn.Module):
    """An input projection and an MLP trunk; the model reads ``proj.weight`` a second time itself."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.trunk = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.proj(x))


class TiedHeadLM(nn.Module):
    """GPT-style weight tying without a head module: the logits are ``F.linear(h, wte.weight)``, so
    ``wte.weight`` gets gradient from a use outside ``wte``'s one call and no second name holds it
    (no tie in the tree). ``enc.proj.weight`` is read the same way once more, after ``enc`` ran."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.enc = TiedEncoder(dim)
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.wte(tokens))
        # the projection's weight applied again without calling the projection
        h = h + torch.tanh(F.linear(h, self.enc.proj.weight))
        return F.linear(self.ln_f(h), self.wte.weight)


def tied_head_lm():
    model = TiedHeadLM()
    tokens = torch.randint(0, 20, (2, 6), generator=_generator(707))
    return model, (tokens,), token_cross_entropy


class Siamese(nn.Module):
    """One encoder container called on both inputs; the head compares the two codes."""

    def __init__(self, features: int = 6, dim: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(features, dim), nn.LayerNorm(dim), nn.ReLU(),
                                     nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.head = nn.Linear(2 * dim, 1)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        a, b = self.encoder(left), self.encoder(right)
        return self.head(torch.cat([(a - b).abs(), a * b], dim=-1))


def siamese():
    model = Siamese()
    generator = _generator(808)
    left, right = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    return model, (left, right)


class MultiHeadDict(nn.Module):
    """A trunk of ``nn.Sequential`` blocks in an ``nn.ModuleList`` the forward iterates (the list itself
    is never called), then an ``nn.ModuleDict`` of heads iterated into a dict output."""

    def __init__(self, features: int = 6, dim: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Linear(features, dim), nn.BatchNorm1d(dim), nn.ReLU()),
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(0.2)),
        ])
        self.heads = nn.ModuleDict({"label": nn.Linear(dim, 3), "box": nn.Linear(dim, 4)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for block in self.blocks:
            x = block(x)
        return {name: head(x) for name, head in self.heads.items()}


def multi_head_dict():
    model = MultiHeadDict()
    # batch 4: BatchNorm in training mode needs more than one value per channel
    features = torch.randn(4, 6, generator=_generator(909))
    return model, (features,)


class KeywordEncoderClassifier(nn.Module):
    """Transformer encoder layers called from an ``nn.ModuleList`` with ``src_key_padding_mask=``, then
    attention pooling by a learned query through ``nn.MultiheadAttention`` called with
    ``key_padding_mask=`` and ``need_weights=False``; dropout 0.1 in every layer."""

    def __init__(self, vocab: int = 16, d_model: int = 8, n_classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=16, dropout=0.1,
                                                                batch_first=True) for _ in range(2)])
        self.query = nn.Parameter(torch.randn(1, 1, d_model))
        self.pool = nn.MultiheadAttention(d_model, num_heads=2, batch_first=True)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        pooled, _ = self.pool(self.query.expand(len(x), -1, -1), x, x, key_padding_mask=padding,
                              need_weights=False)
        return self.head(pooled.squeeze(1))


def transformer_encoder_kw():
    model = KeywordEncoderClassifier()
    tokens = torch.randint(0, 16, (2, 5), generator=_generator(111))
    # True marks padding: the second sequence's last two positions
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    return model, (tokens, padding)


ZOO: dict[str, Callable] = {
    "transformer_classifier": transformer_classifier,
    "resnet_cnn": resnet_cnn,
    "lstm_language_model": lstm_language_model,
    "tiny_bert": tiny_bert,
    "tiny_gpt2": tiny_gpt2,
    "tied_head_lm": tied_head_lm,
    "siamese": siamese,
    "multi_head_dict": multi_head_dict,
    "bert_with_mask": bert_with_mask,
    "transformer_encoder_kw": transformer_encoder_kw,
}
