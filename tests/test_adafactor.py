"""Adafactor against ``torch.optim.Adafactor`` and a float64 transcription of the paper (arXiv 1804.04235)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import measured_state_bytes
from torch.utils.flop_counter import FlopCounterMode

import precondtune.optim as po
from precondtune.errors import ConfigError
from precondtune.optim import adafactor
from precondtune.optim.kernels import factored

SHAPES = [(12, 7), (9,), (3, 5, 4), (2, 3, 4, 5), ()]


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def _grads(params: list[torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


@pytest.mark.parametrize("hp", [
    {"lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0, "weight_decay": 0.0},
    {"lr": 3e-2, "beta2_decay": -0.6, "eps": (1e-5, 1e-2), "d": 1.5, "weight_decay": 0.1},
], ids=["defaults", "tuned"])
def test_matches_torch_adafactor_step_for_step(hp):
    a = _params()
    b = [p.detach().clone().requires_grad_() for p in a]
    eps1, eps2 = hp["eps"]
    ours = po.build("adafactor", a, lr=hp["lr"], beta2_decay=hp["beta2_decay"], eps1=eps1, eps2=eps2, d=hp["d"],
                    weight_decay=hp["weight_decay"])
    ref = torch.optim.Adafactor(b, **hp)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        for x, y, grad in zip(a, b, _grads(a, g)):
            x.grad, y.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    for x, x0 in zip(a, _params()):
        assert not torch.equal(x, x0)


def _algorithm2(x: torch.Tensor, grads: list[torch.Tensor], *, lr: float, beta1: float | None, beta2: float,
                eps: float) -> torch.Tensor:
    """Algorithm 2 of 1804.04235 for one matrix in float64 (sums, not means), plus the paper's momentum on
    the update when ``beta1`` is set; written from the paper, independently of the implementation."""
    n, m = x.shape
    r, c, mom = torch.zeros(n, 1, dtype=x.dtype), torch.zeros(1, m, dtype=x.dtype), torch.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        r = beta2 * r + (1 - beta2) * (g * g).sum(1, keepdim=True)
        c = beta2 * c + (1 - beta2) * (g * g).sum(0, keepdim=True)
        v = (r @ c / r.sum()) / (1 - beta2 ** t)
        u = g / (v.sqrt() + eps)
        if beta1 is None:
            x = x - lr * u
        else:
            mom = beta1 * mom + (1 - beta1) * u
            x = x - lr * mom
    return x


@pytest.mark.parametrize("beta1", [None, 0.9], ids=["no-momentum", "momentum"])
def test_matches_a_float64_transcription_of_algorithm_2(beta1):
    torch.manual_seed(0)
    x0 = torch.randn(6, 4, dtype=torch.float64)
    grads = [torch.randn(6, 4, dtype=torch.float64) for _ in range(5)]
    p = x0.clone().requires_grad_()
    # absolute step, constant beta2 with bias correction, clipping out of reach: Algorithm 2 exactly
    opt = po.build("adafactor", [p], lr=1e-2, beta1=beta1, beta2=0.99, relative_step=False, d=1e6, eps1=1e-30)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    expected = _algorithm2(x0, grads, lr=1e-2, beta1=beta1, beta2=0.99, eps=1e-30)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


def test_update_clipping_bounds_the_step_rms():
    torch.manual_seed(0)
    p = torch.randn(8, 8).requires_grad_()
    opt = po.build("adafactor", [p], lr=1e-2, relative_step=False, d=0.5)
    for _ in range(4):
        before = p.detach().clone()
        p.grad = torch.randn(8, 8) * torch.logspace(-3, 3, 8)  # badly scaled rows: unclipped RMS(U) > 0.5
        opt.step()
        step_rms = factored.rms(p.detach() - before)
        assert step_rms <= 0.5 * 1e-2 * (1 + 1e-5)
    assert step_rms == pytest.approx(0.5 * 1e-2, rel=1e-4)  # the clip is active, not vacuous


def test_rank_one_second_moment_is_reconstructed_exactly():
    a, b = torch.rand(5, 1, dtype=torch.float64) + 0.1, torch.rand(1, 7, dtype=torch.float64) + 0.1
    g = a * b  # G² is rank 1, so Adafactor's V̂ after one step is G² itself and U = sign(G)
    row, col = factored.zeros(g.shape, dtype=g.dtype)
    factored.update_(row, col, g, 1.0)
    torch.testing.assert_close(factored.reconstruct(row, col), g * g, rtol=1e-12, atol=0)
    torch.testing.assert_close(factored.precondition(g, row, col, eps=1e-30), torch.ones_like(g))


@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_bytes_is_exact(dtype, beta1):
    params = _params(dtype)
    opt = po.build("adafactor", params, beta1=beta1)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p, grad in zip(params, _grads(params, g)):
            p.grad = grad
        opt.step()
    config = adafactor.Config(beta1=beta1)
    assert sum(adafactor.state_bytes(p.shape, dtype, config) for p in params) == measured_state_bytes(opt)
    # factored: a 12x7 matrix keeps 12 + 7 numbers, not 84
    assert adafactor.state_bytes((12, 7), torch.float32, adafactor.Config()) == (12 + 7) * 4


def test_step_has_no_matmul_flops():
    p = torch.randn(16, 8).requires_grad_()
    opt = po.build("adafactor", [p])
    p.grad = torch.randn(16, 8)
    with FlopCounterMode(display=False) as counter:
        opt.step()
    assert counter.get_total_flops() == adafactor.step_flops((16, 8), adafactor.Config()).matmul == 0


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="beta1"):
        po.build("adafactor", [torch.zeros(2, requires_grad=True)], beta1=1.0)
    with pytest.raises(ConfigError, match="beta2_decay"):
        po.build("adafactor", [torch.zeros(2, requires_grad=True)], beta2_decay=0.5)
    assert math.isclose(adafactor.from_adamw(lr=3e-4).config.lr, 3e-4)


def test_search_space_and_transfer_give_valid_configs():
    import optuna

    trial = optuna.trial.FixedTrial({"lr": 0.02, "momentum": True, "one_minus_beta1": 0.1, "beta2_decay": -0.7,
                                     "d": 1.5, "weight_decay": 0.01})
    c = adafactor.search_space(trial)
    assert (c.lr, c.beta1, c.beta2_decay, c.d) == (0.02, pytest.approx(0.9), -0.7, 1.5)
    t = adafactor.from_adamw(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    assert (t.config.lr, t.config.beta1, t.config.beta2, t.config.relative_step) == (3e-4, 0.9, 0.95, False)
