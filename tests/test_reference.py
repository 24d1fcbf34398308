"""The reference oracle against gradients derived by hand.

Every expected value here is a closed-form formula written with plain tensor
algebra (``x @ W.T + b``), never by re-running the reference's own code path.
The only autograd used is ``dL/dy`` of the scalar loss with respect to the
model's final output ``y``, which does not involve the model at all.
"""
from __future__ import annotations

import torch

from isolation_suite.model.build import loss_fn, make_inputs
from isolation_suite.execution.reference import Reference
from isolation_suite.execution.runner import run, site_seed
from isolation_suite.spec.scenario import Data, Intent, Layer, OptimizerRecipe, Scenario, chain

LOSS_SITE = 999_983  # the runner's site index for the loss target


def linear(path: str, n_in: int = 2, n_out: int = 2) -> Layer:
    return Layer(path, "linear", (("bias", True), ("in_features", n_in), ("out_features", n_out)))


def scenario(layers, program, intent=Intent(), optimizer=OptimizerRecipe(name="SGD", args=(("lr", 0.1),)),
             steps=1, micro_batches=1, data=Data(batch=3, seed=1, input_requires_grad=True, loss="mse"),
             dtype="float64") -> Scenario:
    arch = chain((2,), layers, program)
    return Scenario(arch, intent, optimizer, data, steps, micro_batches, dtype)


def dloss_dy(s: Scenario, y: torch.Tensor, step: int = 1, micro: int = 0) -> torch.Tensor:
    """dL/dy for the scenario's loss, treating ``y`` as a free leaf (independent of any model)."""
    y = y.detach().clone().requires_grad_(True)
    loss = loss_fn(s.data.loss, y, site_seed(s.data.seed, step, micro, LOSS_SITE)) / s.micro_batches
    (g,) = torch.autograd.grad(loss, y)
    return g


# --- a. pass-through: a Linear used twice, second use constant ------------------------------

def test_pass_through_second_use_gets_first_use_gradient_only():
    s = scenario([linear("fc")], ["fc", "fc"], Intent(pass_through=(("fc", 1),)))
    trace = run(s, Reference(), "cpu")
    W, b = trace.initial_params["fc.weight"], trace.initial_params["fc.bias"]
    x = make_inputs(s)[0][0]

    h = x @ W.T + b
    y = h @ W.T + b
    g = dloss_dy(s, y)
    dh = g @ W  # row i is W^T g_i
    expected_dW = dh.T @ x  # sum_i (W^T g_i) x_i^T
    expected_db = dh.sum(0)

    grads = trace.steps[0].grads
    torch.testing.assert_close(grads["fc.weight"], expected_dW, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads["fc.bias"], expected_db, rtol=1e-12, atol=1e-14)

    # the full gradient (both uses trainable) is different: the test distinguishes the two
    full_dW = expected_dW + g.T @ h
    assert not torch.allclose(grads["fc.weight"], full_dW, rtol=1e-6, atol=1e-9)

    # the input still gets gradient through both uses: dL/dx = W^T W^T g
    torch.testing.assert_close(trace.steps[0].input_grads[0], dh @ W, rtol=1e-12, atol=1e-14)

    # the loss is the loss of y; one SGD step with lr=0.1 from those gradients
    # the target is a float32 draw, upcast (so float32 and float64 twins see the same numbers)
    target = torch.randn(y.shape, generator=torch.Generator().manual_seed(site_seed(1, 1, 0, LOSS_SITE))).double()
    torch.testing.assert_close(trace.steps[0].losses[0], ((y - target) ** 2).mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(trace.steps[0].params["fc.weight"], W - 0.1 * expected_dW, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(trace.steps[0].params["fc.bias"], b - 0.1 * expected_db, rtol=1e-12, atol=1e-14)


# --- b. frozen encoder before and after a generator ----------------------------------------

def test_frozen_encoder_around_generator_is_a_constant_function():
    s = scenario([linear("enc"), linear("gen")], ["enc", "gen", "enc"], Intent(frozen_modules=("enc",)), steps=2)
    trace = run(s, Reference(), "cpu")
    E, e = trace.initial_params["enc.weight"], trace.initial_params["enc.bias"]
    G, c = trace.initial_params["gen.weight"], trace.initial_params["gen.bias"]

    for step in (1, 2):
        x = make_inputs(s)[step - 1][0]
        h1 = x @ E.T + e
        h2 = h1 @ G.T + c
        y = h2 @ E.T + e
        g = dloss_dy(s, y, step=step)
        dh2 = g @ E  # E^T g, E constant
        expected_dG = dh2.T @ h1
        expected_dc = dh2.sum(0)
        record = trace.steps[step - 1]
        torch.testing.assert_close(record.grads["gen.weight"], expected_dG, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(record.grads["gen.bias"], expected_dc, rtol=1e-12, atol=1e-14)
        # gradient crosses both frozen uses to reach the input
        torch.testing.assert_close(record.input_grads[0], dh2 @ G @ E, rtol=1e-12, atol=1e-14)
        assert record.grads["enc.weight"] is None
        assert record.grads["enc.bias"] is None
        assert torch.equal(record.params["enc.weight"], E)
        assert torch.equal(record.params["enc.bias"], e)
        # plain SGD on the generator only
        G, c = G - 0.1 * expected_dG, c - 0.1 * expected_dc
        torch.testing.assert_close(record.params["gen.weight"], G, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(record.params["gen.bias"], c, rtol=1e-12, atol=1e-14)


# --- c. frozen elements under optimizers with momentum, decay and adaptive steps -----------

FROZEN = ((0, 1), (1, 0))
FREE = ((0, 0), (1, 1))


def _elements_scenario(optimizer: OptimizerRecipe) -> Scenario:
    return scenario([linear("fc")], ["fc"], Intent(frozen_elements=(("fc.weight", FROZEN),)),
                    optimizer=optimizer, steps=3)


OPTIMIZERS = [
    OptimizerRecipe(name="SGD", args=(("lr", 0.1), ("momentum", 0.9), ("weight_decay", 0.1))),
    OptimizerRecipe(name="AdamW", args=(("lr", 0.1),)),  # torch's default weight_decay=0.01
    OptimizerRecipe(name="RMSprop", args=(("lr", 0.1),)),
]


def test_frozen_elements_hold_under_decay_momentum_and_adaptive_optimizers():
    for recipe in OPTIMIZERS:
        s = _elements_scenario(recipe)
        trace = run(s, Reference(), "cpu")
        W0 = trace.initial_params["fc.weight"]
        assert len(trace.steps) == 3
        for step, record in enumerate(trace.steps, start=1):
            W = record.params["fc.weight"]
            grad = record.grads["fc.weight"]
            for idx in FROZEN:
                assert W[idx].item() == W0[idx].item(), (recipe, step, idx)
                assert grad[idx].item() == 0.0, (recipe, step, idx)
            for idx in FREE:
                assert W[idx].item() != W0[idx].item(), (recipe, step, idx)
                assert grad[idx].item() != 0.0, (recipe, step, idx)
            assert not torch.equal(record.params["fc.bias"], trace.initial_params["fc.bias"])


def test_frozen_elements_first_step_gradient_matches_closed_form():
    """With the frozen entries constant, the free entries' gradient is the ordinary linear gradient."""
    s = _elements_scenario(OPTIMIZERS[0])
    trace = run(s, Reference(), "cpu")
    W, b = trace.initial_params["fc.weight"], trace.initial_params["fc.bias"]
    x = make_inputs(s)[0][0]
    g = dloss_dy(s, x @ W.T + b)
    expected = g.T @ x
    mask = torch.zeros(2, 2, dtype=torch.bool)
    for idx in FROZEN:
        mask[idx] = True
    expected = torch.where(mask, torch.zeros_like(expected), expected)
    torch.testing.assert_close(trace.steps[0].grads["fc.weight"], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(trace.steps[0].grads["fc.bias"], g.sum(0), rtol=1e-12, atol=1e-14)
    # SGD(momentum=0.9, weight_decay=0.1), first step: buf = grad + wd * W, W -= lr * buf
    step1 = W - 0.1 * (expected + 0.1 * W)
    effective = torch.where(mask, W, step1)
    torch.testing.assert_close(trace.steps[0].params["fc.weight"], effective, rtol=1e-12, atol=1e-14)


# --- d. a frozen module with BatchNorm runs in eval mode ------------------------------------

def test_frozen_batchnorm_runs_in_eval_mode_and_keeps_its_buffers():
    layers = [linear("enc.lin"), Layer("enc.bn", "batchnorm1d", (("num_features", 2),)), linear("head")]
    s = scenario(layers, ["enc.lin", "enc.bn", "head"], Intent(frozen_modules=("enc",)), steps=3)
    trace = run(s, Reference(), "cpu")
    names = {"enc.bn.running_mean", "enc.bn.running_var", "enc.bn.num_batches_tracked"}
    assert names <= set(trace.initial_buffers)
    for record in trace.steps:
        for name in names:
            assert torch.equal(record.buffers[name], trace.initial_buffers[name]), name
        for name in ("enc.lin.weight", "enc.lin.bias", "enc.bn.weight", "enc.bn.bias"):
            assert torch.equal(record.params[name], trace.initial_params[name]), name
            assert record.grads[name] is None, name

    # eval mode normalises with the running stats (mean 0, var 1), not the batch statistics
    p = trace.initial_params
    x = make_inputs(s)[0][0]
    h = x @ p["enc.lin.weight"].T + p["enc.lin.bias"]
    bn = (h - 0.0) / torch.sqrt(torch.tensor(1.0 + 1e-5, dtype=torch.float64)) * p["enc.bn.weight"] + p["enc.bn.bias"]
    y = bn @ p["head.weight"].T + p["head.bias"]
    # the target is a float32 draw, upcast (so float32 and float64 twins see the same numbers)
    target = torch.randn(y.shape, generator=torch.Generator().manual_seed(site_seed(1, 1, 0, LOSS_SITE))).double()
    torch.testing.assert_close(trace.steps[0].losses[0], ((y - target) ** 2).mean(), rtol=1e-12, atol=1e-14)
    g = dloss_dy(s, y)
    torch.testing.assert_close(trace.steps[0].grads["head.weight"], g.T @ bn, rtol=1e-12, atol=1e-14)


# --- e. determinism ------------------------------------------------------------------------

def _assert_same(a, b, where):
    if a is None or b is None:
        assert a is None and b is None, where
    else:
        assert torch.equal(a, b), where


def test_same_scenario_gives_identical_traces():
    layers = [linear("enc"), Layer("drop", "dropout", (("p", 0.5),)), linear("gen"),
              Layer("bn", "batchnorm1d", (("num_features", 2),))]
    s = scenario(layers, ["enc", "drop", "gen", "bn", "enc"],
                 Intent(frozen_modules=("enc",), frozen_elements=(("gen.weight", ((0, 0),)),)),
                 optimizer=OptimizerRecipe(name="Adam", args=(("lr", 0.05),)), steps=3, micro_batches=2,
                 dtype="float32")
    torch.manual_seed(0)
    first = run(s, Reference(), "cpu")
    torch.manual_seed(12345)  # the global RNG state must not leak into a run
    torch.rand(7)
    second = run(s, Reference(), "cpu")
    assert first.crash is None and second.crash is None
    assert len(first.steps) == len(second.steps) == 3
    for k in first.initial_params:
        _assert_same(first.initial_params[k], second.initial_params[k], k)
    for step, (a, b) in enumerate(zip(first.steps, second.steps), start=1):
        assert len(a.losses) == len(b.losses) == 2
        for la, lb in zip(a.losses, b.losses):
            _assert_same(la, lb, f"loss {step}")
        for ga, gb in zip(a.input_grads, b.input_grads):
            _assert_same(ga, gb, f"input grad {step}")
        assert a.grads.keys() == b.grads.keys() and a.params.keys() == b.params.keys()
        assert a.buffers.keys() == b.buffers.keys()
        for k in a.grads:
            _assert_same(a.grads[k], b.grads[k], f"grad {k} {step}")
        for k in a.params:
            _assert_same(a.params[k], b.params[k], f"param {k} {step}")
        for k in a.buffers:
            _assert_same(a.buffers[k], b.buffers[k], f"buffer {k} {step}")
    # the trainable BatchNorm did update, so the comparison above covered changing buffers
    assert not torch.equal(first.steps[-1].buffers["bn.running_mean"], first.initial_buffers["bn.running_mean"])
