"""Tiny random configurations of real ``transformers`` model classes, named by a string.

A scenario names its model by a string; one of these configurations is named
``hf:CLASS?field=value&...``, every field optional (a missing one takes its first, smallest value):

| field     | values         | meaning                                                                   |
|-----------|----------------|---------------------------------------------------------------------------|
| CLASS     | bert gpt2 llama | ``BertForMaskedLM``, ``GPT2LMHeadModel``, ``LlamaForCausalLM``          |
| `layers`  | 1 2            | hidden layers                                                             |
| `heads`   | 1 2            | attention heads                                                           |
| `kv`      | 1 2            | key/value heads (llama only, at most `heads`: grouped-query attention below it) |
| `hidden`  | 8 16           | hidden size (the MLP is twice as wide)                                    |
| `tied`    | 0 1            | the LM head shares the token embedding's weight (``tie_word_embeddings``) |
| `attn`    | eager sdpa     | ``attn_implementation``: plain matmul/softmax, or the fused kernel        |
| `dropout` | 0 0.1          | every dropout probability of the config (transformers' default is 0.1)    |

``hf:random`` names them all: a search draws one configuration per example. ``name(config)``
writes every field in this order, so a name round-trips through ``parse``. Nothing here imports
torch or transformers (``isolation_suite.model.hf`` builds the model).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace

PREFIX = "hf:"
#: the family: a configuration drawn per example
RANDOM = "hf:random"
CLASSES = ("bert", "gpt2", "llama")
#: field -> its values, the first the smallest (what a missing field means, and where shrinking goes)
CHOICES: dict[str, tuple[str, ...]] = {
    "layers": ("1", "2"), "heads": ("1", "2"), "kv": ("1", "2"), "hidden": ("8", "16"),
    "tied": ("0", "1"), "attn": ("eager", "sdpa"), "dropout": ("0", "0.1"),
}
#: the fields only some classes have
ONLY = {"kv": ("llama",)}


class HFSpecError(ValueError):
    """A name that spells no configuration; the message says what is wrong, without the name."""


@dataclass(frozen=True)
class HFConfig:
    """One configuration, as its fields' spellings (``CHOICES``); validated when made."""

    arch: str = CLASSES[0]
    layers: str = "1"
    heads: str = "1"
    kv: str = "1"
    hidden: str = "8"
    tied: str = "0"
    attn: str = "eager"
    dropout: str = "0"

    def __post_init__(self) -> None:
        if self.arch not in CLASSES:
            raise HFSpecError(f"unknown class {self.arch!r} (choose from {', '.join(CLASSES)}, or random)")
        for name, values in CHOICES.items():
            if getattr(self, name) not in values:
                raise HFSpecError(f"{name}={getattr(self, name)!r} is not one of {', '.join(values)}")
        if self.arch not in ONLY["kv"] and self.kv != "1":
            raise HFSpecError(f"kv applies to {', '.join(ONLY['kv'])} only")
        if int(self.kv) > int(self.heads):
            raise HFSpecError(f"kv={self.kv} is more than heads={self.heads}")

    def number(self, name: str) -> int:
        return int(getattr(self, name))

    @property
    def is_tied(self) -> bool:
        return self.tied == "1"

    @property
    def dropout_p(self) -> float:
        return float(self.dropout)


def has_field(arch: str, name: str) -> bool:
    return arch in ONLY.get(name, (arch,))


def name(config: HFConfig) -> str:
    """``hf:llama?layers=1&heads=2&kv=1&hidden=8&tied=0&attn=eager&dropout=0``: every field the class has."""
    return PREFIX + config.arch + "?" + "&".join(f"{f}={getattr(config, f)}" for f in CHOICES
                                                 if has_field(config.arch, f))


def is_hf(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse(spec: str) -> HFConfig:
    """The configuration ``spec`` names; :class:`HFSpecError` says what is wrong in one line."""
    if not is_hf(spec):
        raise HFSpecError(f"does not start with {PREFIX!r}")
    if spec == RANDOM:
        raise HFSpecError("names every configuration, not one: a search draws one per example")
    arch, _, query = spec[len(PREFIX):].partition("?")
    given: dict[str, str] = {}
    for part in query.split("&") if query else ():
        key, equals, value = part.partition("=")
        if not equals or not key:
            raise HFSpecError(f"{part!r} is not field=value")
        if key not in CHOICES:
            raise HFSpecError(f"unknown field {key!r} (fields: {', '.join(CHOICES)})")
        if key in given:
            raise HFSpecError(f"field {key!r} is given twice")
        if arch in CLASSES and not has_field(arch, key):
            raise HFSpecError(f"{key} applies to {', '.join(ONLY[key])} only")
        given[key] = value
    return HFConfig(arch, **given)


def check(spec: str) -> str:
    """``spec`` itself when it is ``hf:random`` or names a configuration; else :class:`HFSpecError`."""
    if spec != RANDOM:
        parse(spec)
    return spec


def _valid(arch: str, values: tuple[str, ...]) -> HFConfig | None:
    try:
        return HFConfig(arch, **dict(zip(CHOICES, values)))
    except HFSpecError:
        return None


#: every configuration, smallest first: what ``hf:random`` draws from (finite, so a cache of every
#: configuration's tree is bounded by it)
SPACE: tuple[HFConfig, ...] = tuple(c for arch in CLASSES for values in itertools.product(*CHOICES.values())
                                    if (c := _valid(arch, values)) is not None)


def representatives() -> tuple[HFConfig, ...]:
    """Per class, one layer of the narrowest size with each kind of place an isolation can point at:
    two heads (grouped-query on llama), dropout on, tied and untied. The catalog's trigger examples
    are moved onto these, and a search over ``hf:random`` asks them which capabilities the family has
    a place for."""
    out = []
    for arch in CLASSES:
        rich = HFConfig(arch, heads="2", dropout="0.1")
        out += [rich, replace(rich, tied="1")]
    return tuple(out)


assert tuple(f.name for f in fields(HFConfig))[1:] == tuple(CHOICES), "one field per choice, in order"
