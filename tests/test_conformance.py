"""The shared conformance table: every registered optimizer through the same checks (STYLE.md, "Tests").

The table is the registry itself, so a new optimizer module is checked the moment it exists.
``TEST_HYPERPARAMETERS`` only raises learning rates where a default would be too small to show progress
in a handful of steps; it never changes what is being tested.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import RUNNABLE_EXAMPLES, load_example, measured_state_bytes
from torch import nn

import precondtune.optim as po
from precondtune.errors import UnknownNameError

OPTIMIZERS_UNDER_TEST = po.available()
TEST_HYPERPARAMETERS: dict[str, dict] = {
    "adadiag-pp": {"lr": 3e-3},  # two-sided rotation: 40 steps at Adam's 1e-3 fall just short of -10%
    "sophia": {"lr": 1e-2},  # no Hessian estimate in this plain loop: clipped sign steps of size lr
    "iso-adam": {"lr": 3e-3},  # Adam-normalised isometric gradient: 40 steps at 1e-3 fall short of -10%
}


def _build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    return po.build(name, model, **TEST_HYPERPARAMETERS.get(name, {}))


def _regression_model(dtype=torch.float32) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).to(dtype)
    x = torch.randn(64, 8, dtype=dtype)
    teacher = torch.randn(8, 4, dtype=dtype)
    return model, x, x @ teacher


def _train(model, opt, loss_of, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", OPTIMIZERS_UNDER_TEST)
def test_decreases_least_squares(name):
    model, x, y = _regression_model()
    opt = _build(name, model)
    losses = _train(model, opt, lambda: (model(x) - y).pow(2).mean(), 40)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", OPTIMIZERS_UNDER_TEST)
def test_decreases_tiny_network_eval_loss(name):
    mf = load_example("mlp")
    torch.manual_seed(0)
    model = mf.build()
    evals = mf.eval_batches(256)
    before = sum(float(mf.loss(model, b)) for b in evals)
    opt = _build(name, model)
    torch.manual_seed(1)
    _train(model, opt, lambda: mf.loss(model, mf.sample_batch(64)), 40)
    with torch.no_grad():
        after = sum(float(mf.loss(model, b)) for b in evals)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", OPTIMIZERS_UNDER_TEST)
def test_preserves_dtype_and_stays_finite(name, dtype):
    model, x, y = _regression_model(dtype)
    opt = _build(name, model)
    _train(model, opt, lambda: (model(x) - y).pow(2).mean(), 5)
    for p in model.parameters():
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.isfinite(v).all()


@pytest.mark.parametrize("name", OPTIMIZERS_UNDER_TEST)
def test_state_dict_round_trip_resumes_identically(name):
    mf = load_example("chargpt")
    torch.manual_seed(0)
    model = mf.build()
    opt = _build(name, model)
    batches = [mf.sample_batch(4) for _ in range(6)]
    for b in batches[:3]:
        opt.zero_grad(set_to_none=True)
        mf.loss(model, b).backward()
        opt.step()
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    fresh = mf.build()
    fresh.load_state_dict(saved_model)
    fresh_opt = _build(name, fresh)
    fresh_opt.load_state_dict(saved_opt)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        for b in batches[3:]:
            o.zero_grad(set_to_none=True)
            mf.loss(m, b).backward()
            o.step()
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}: {n} differs after resuming")


@pytest.mark.parametrize("example_name", RUNNABLE_EXAMPLES)
@pytest.mark.parametrize("name", OPTIMIZERS_UNDER_TEST)
def test_state_bytes_equals_measured(name, example_name):
    mf = load_example(example_name)
    torch.manual_seed(0)
    model = mf.build()
    opt = _build(name, model)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        mf.loss(model, mf.sample_batch(4)).backward()
        opt.step()
    estimated = po.state_bytes(name, model, **TEST_HYPERPARAMETERS.get(name, {}))
    assert estimated == measured_state_bytes(opt)


@pytest.mark.parametrize("name", OPTIMIZERS_UNDER_TEST)
def test_skips_parameters_without_gradients(name):
    model, x, y = _regression_model()
    frozen_before = model[0].bias.detach().clone()
    opt = _build(name, model)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        (model(x) - y).pow(2).mean().backward()
        model[0].bias.grad = None
        opt.step()
    assert torch.equal(model[0].bias, frozen_before)


@pytest.mark.parametrize("name", OPTIMIZERS_UNDER_TEST)
def test_names_are_forgiving_and_unknown_ones_list_the_valid(name):
    spec = po.get_spec(name.upper().replace("-", "_"))
    assert spec.name == name
    with pytest.raises(UnknownNameError, match="valid"):
        po.get_spec(name + "-nope")


@pytest.mark.parametrize("name", OPTIMIZERS_UNDER_TEST)
def test_a_scheduler_may_warm_up_from_lr_zero(name):
    model, x, y = _regression_model()
    opt = _build(name, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 4)  # lr = 0 on the first step
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    (model(x) - y).pow(2).mean().backward()
    opt.step()
    sched.step()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    _train(model, opt, lambda: (model(x) - y).pow(2).mean(), 3)
