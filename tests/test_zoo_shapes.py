"""The zoo's models have the shapes their docstrings claim: a parameter read outside its module's call,
a container called twice, lists and dicts of modules iterated rather than called, a dict output, and
keyword arguments reaching the submodules. A model that lost its shape would let the gate pass on a
harness that cannot handle it."""
import pytest
import torch
from torch import nn

from isolation_suite.model.factory import make, scenario_loss
from isolation_suite.model.tree import module_tree

SHAPES = ["tied_head_lm", "siamese", "multi_head_dict", "bert_with_mask", "transformer_encoder_kw"]
NEEDS_TRANSFORMERS = {"bert_with_mask"}


def built(name, seed=0):
    if name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    return make(f"isolation_suite.zoo:{name}", seed)


def tree_of(name):
    made = built(name)
    return module_tree(made.model, made.inputs)


def backward(made):
    made.model.train()
    out = made.model(*made.inputs)
    scenario_loss("mse", out, 1, made.loss).backward()
    return out


@pytest.mark.parametrize("name", SHAPES)
def test_trains_on_its_inputs_and_follows_the_factory_contract(name):
    made, again, other = built(name, seed=3), built(name, seed=3), built(name, seed=4)
    assert again.model is not made.model
    assert all(torch.equal(a, b) for a, b in zip(made.inputs, again.inputs))
    state = lambda m: list(m.model.state_dict().values())  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(state(made), state(again)))
    # the caller's seed draws the weights, not the factory
    assert any(not torch.equal(a, b) for a, b in zip(state(made), state(other)))
    backward(made)
    starved = [n for n, p in made.model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not starved, f"{name}: no gradient for {starved}"
    tree = tree_of(name)
    assert tree.order and {n.path for n in tree.nodes} == {p for p, _ in made.model.named_modules()}
    assert all(p.dtype == torch.float32 for p in made.model.parameters())


# --- tied_head_lm: parameters read outside their module's call --------------------------------

def test_tied_head_lm_reads_the_embedding_weight_in_the_head():
    tree = tree_of("tied_head_lm")
    assert tree.node("wte").calls == 1 and tree.ties == ()  # one call, one name: the head is F.linear
    assert not any(n.kind == "linear" and dict(n.params).get("weight") == (20, 8) for n in tree.nodes)
    made = built("tied_head_lm")
    backward(made)
    unseen = sorted(set(range(20)) - set(made.inputs[0].flatten().tolist()))
    assert unseen, "every token occurs in the input: the head's path cannot be told apart"
    # rows of tokens the embedding never looked up get gradient from the head alone
    assert made.model.wte.weight.grad[unseen].abs().sum(dim=1).min() > 0


def test_tied_head_lm_reads_the_projection_weight_after_its_call():
    assert tree_of("tied_head_lm").node("enc.proj").calls == 1
    made = built("tied_head_lm")
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["x"], seen["out"] = args[0], out
    made.model.enc.proj.register_forward_hook(keep)
    backward(made)
    x, out = seen["x"].flatten(0, -2), seen["out"].grad.flatten(0, -2)
    through_call = out.T @ x  # what the one call of enc.proj contributes to its weight's gradient
    grad = made.model.enc.proj.weight.grad
    assert not torch.allclose(grad, through_call, atol=1e-6), "the functional read adds nothing"


# --- siamese: a container called twice ---------------------------------------------------------

def test_siamese_calls_its_encoder_on_both_inputs():
    made = built("siamese")
    assert len(made.inputs) == 2 and all(x.is_floating_point() for x in made.inputs)
    tree = module_tree(made.model, made.inputs)
    assert tree.node("encoder").calls == 2 and tree.node("encoder").kind == "Sequential"
    assert all(n.calls == 2 for n in tree.inside("encoder"))
    assert tree.node("head").calls == 1
    assert [use for path, use in tree.order if path == "encoder"] == [0, 1]


# --- multi_head_dict: iterated containers and a dict output -----------------------------------

def test_multi_head_dict_iterates_its_module_list_and_dict():
    tree = tree_of("multi_head_dict")
    assert tree.node("blocks").kind == "ModuleList" and tree.node("blocks").calls == 0
    assert tree.node("heads").kind == "ModuleDict" and tree.node("heads").calls == 0
    assert tree.routed("blocks") == ["blocks.0", "blocks.1"]
    assert tree.routed("heads") == ["heads.label", "heads.box"]
    assert all(tree.node(p).calls == 1 for p in ("blocks.0", "blocks.1", "heads.label", "heads.box"))
    assert any(n.kind == "batchnorm1d" for n in tree.inside("blocks.0"))
    dropouts = [n.path for n in tree.nodes if n.kind == "dropout" and n.train_mode and n.calls]
    assert dropouts == ["blocks.1.2"] and tree.device_random


def test_multi_head_dict_returns_a_dict_the_default_loss_walks():
    made = built("multi_head_dict")
    out = backward(made)
    assert isinstance(out, dict) and list(out) == ["label", "box"]
    assert made.loss is None  # the default loss sums over every tensor of the dict
    assert all(made.model.heads[k].weight.grad.abs().sum() > 0 for k in out)


# --- keyword arguments reaching the submodules ------------------------------------------------

def _calls(model, inputs, modules):
    """(args, kwargs) of every call of ``modules`` during one training forward of ``model`` on ``inputs``."""
    seen = {m: [] for m in modules}
    handles = [m.register_forward_pre_hook(lambda mod, args, kwargs: seen[mod].append((args, kwargs)),
                                           with_kwargs=True) for m in modules]
    try:
        model.train()
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_bert_with_mask_passes_the_attention_mask_by_keyword():
    made = built("bert_with_mask")
    input_ids, mask = made.inputs
    assert (mask == 0).any() and (mask == 1).any()
    bert = made.model.model
    config = bert.config
    assert config.hidden_dropout_prob > 0 and config.attention_probs_dropout_prob > 0
    layers = list(bert.bert.encoder.layer)
    attentions = [layer.attention.self for layer in layers]
    seen = _calls(made.model, made.inputs, [bert, bert.bert.encoder, *layers, *attentions])
    (args, kwargs), = seen[bert]
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"}  # keyword arguments only
    assert kwargs["attention_mask"] is mask
    (args, kwargs), = seen[bert.bert.encoder]
    assert isinstance(kwargs.get("attention_mask"), torch.Tensor)
    for layer in layers:  # each layer: the (expanded) mask positionally, next to keyword arguments
        (args, kwargs), = seen[layer]
        assert isinstance(args[1], torch.Tensor) and kwargs
    for attention in attentions:
        (args, kwargs), = seen[attention]
        assert isinstance(kwargs.get("attention_mask"), torch.Tensor)


def test_bert_with_mask_masks_and_drops():
    made = built("bert_with_mask")
    model, (input_ids, mask) = made.model, made.inputs
    model.eval()
    with torch.no_grad():
        masked = model(input_ids, mask)
        unmasked = model(input_ids, torch.ones_like(mask))
        assert torch.equal(masked[0], unmasked[0]) and not torch.allclose(masked[1], unmasked[1])
        model.train()
        torch.manual_seed(0)
        first = model(input_ids, mask)
        assert not torch.equal(first, model(input_ids, mask))  # dropout is active


def test_transformer_encoder_kw_calls_its_layers_with_keywords():
    made = built("transformer_encoder_kw")
    tokens, padding = made.inputs
    assert padding.dtype == torch.bool and padding.any()
    model = made.model
    layers = list(model.layers)
    assert all(m.p > 0 for layer in layers for m in layer.modules() if isinstance(m, nn.Dropout))
    seen = _calls(model, made.inputs, [*layers, model.pool])
    for layer in layers:
        (args, kwargs), = seen[layer]
        assert len(args) == 1 and kwargs["src_key_padding_mask"] is padding
    (args, kwargs), = seen[model.pool]
    assert len(args) == 3 and kwargs["need_weights"] is False and kwargs["key_padding_mask"] is padding
    tree = tree_of("transformer_encoder_kw")
    assert tree.node("layers").calls == 0 and tree.routed("layers") == ["layers.0", "layers.1"]
    # nn.MultiheadAttention reads out_proj's weight itself: the projection is never called
    assert tree.node("pool.out_proj").calls == 0 and tree.node("pool").calls == 1
    assert dict(tree.node("").params) == {"query": (1, 1, 8)}  # a parameter of the model itself
