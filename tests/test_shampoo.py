"""Shampoo and the eigen kernels: refresh-1 equals explicit float64 inverse roots (Algorithm 1 and the tensor
case), grafting/EMA against a float64 transcription, stability on rank-deficient statistics, state and FLOPs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import fractional_matrix_power
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import precondtune.optim as po
from precondtune.optim import shampoo
from precondtune.optim.kernels import eigen


def _root(h: np.ndarray, p: float, eps: float) -> np.ndarray:
    """(H + εI)^{-1/p} by scipy's Schur-based fractional power (independent of torch's eigh)."""
    return np.real(fractional_matrix_power(h + eps * np.eye(len(h)), -1.0 / p))


def _unfold_gram(g: np.ndarray, i: int) -> np.ndarray:
    gi = np.moveaxis(g, i, 0).reshape(g.shape[i], -1)
    return gi @ gi.T


def _mode_apply(x: np.ndarray, mats: list[np.ndarray]) -> np.ndarray:
    for i, a in enumerate(mats):
        x = np.moveaxis(np.tensordot(a, np.moveaxis(x, i, 0), axes=([1], [0])), 0, i)
    return x


def _grads(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(steps)]


@pytest.mark.parametrize("shape", [(6, 9), (4, 3, 5)])
def test_refresh_every_step_equals_explicit_float64_roots(shape):
    """Algorithm 1 (matrix) / 2 (tensor): H_i = Σ G₍ᵢ₎G₍ᵢ₎ᵀ, W ← W − η·G ×ᵢ (H_i + εI)^{-1/(2k)}."""
    lr, eps, k = 0.1, 1e-3, len(shape)
    w0 = np.random.default_rng(1).standard_normal(shape)
    p = nn.Parameter(torch.tensor(w0))
    opt = po.build("shampoo", [{"params": [p]}], lr=lr, betas=(0.0, 1.0), eps=eps, weight_decay=0.0,
                   precondition_frequency=1, start_preconditioning_step=1, grafting="none")
    w = w0.copy()
    hs = [np.zeros((d, d)) for d in shape]
    for g in _grads(shape, 4):
        p.grad = torch.tensor(g)
        opt.step()
        hs = [h + _unfold_gram(g, i) for i, h in enumerate(hs)]
        w = w - lr * _mode_apply(g, [_root(h, 2 * k, eps) for h in hs])
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-9, atol=1e-10)


def test_grafting_momentum_and_ema_against_transcription():
    """β₁ EMA, β₂ EMA statistics with bias correction, Adam grafting, decoupled wd, refresh every 2 steps."""
    shape, lr, eps, wd, (b1, b2), gb2, geps = (5, 7), 0.05, 1e-4, 0.1, (0.9, 0.99), 0.999, 1e-8
    w0 = np.random.default_rng(2).standard_normal(shape)
    p = nn.Parameter(torch.tensor(w0))
    opt = po.build("shampoo", [{"params": [p]}], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                   precondition_frequency=2, start_preconditioning_step=2, grafting_beta2=gb2, grafting_eps=geps)
    w, m, v = w0.copy(), np.zeros(shape), np.zeros(shape)
    hs = [np.zeros((d, d)) for d in shape]
    roots = [np.eye(d) for d in shape]
    for t, g in enumerate(_grads(shape, 6, seed=3), start=1):
        p.grad = torch.tensor(g)
        opt.step()
        hs = [b2 * h + (1 - b2) * _unfold_gram(g, i) for i, h in enumerate(hs)]
        m = b1 * m + (1 - b1) * g
        mhat = m / (1 - b1 ** t)
        v = gb2 * v + (1 - gb2) * g * g
        graft = mhat / (np.sqrt(v / (1 - gb2 ** t)) + geps)
        if t >= 2:
            if (t - 2) % 2 == 0:
                roots = [_root(h / (1 - b2 ** t), 4, eps) for h in hs]
            d = _mode_apply(mhat, roots)
            d = d * np.linalg.norm(graft) / np.linalg.norm(d)
        else:
            d = graft
        w = w * (1 - lr * wd) - lr * d
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-9, atol=1e-10)


def test_rank_deficient_statistics_never_nan_in_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        p = nn.Parameter(torch.randn(32, 16, dtype=dtype))
        opt = po.build("shampoo", [{"params": [p]}], precondition_frequency=1, start_preconditioning_step=1)
        u, v = torch.randn(32, 1), torch.randn(1, 16)
        for _ in range(3):
            p.grad = (u @ v).to(dtype)  # rank 1: L and R have 31 and 15 zero eigenvalues
            opt.step()
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(r).all() for r in opt.state[p]["roots"] if r is not None)


def test_eigh_falls_back_to_float64_when_the_solver_fails(monkeypatch):
    a = torch.randn(6, 1)
    a = a @ a.T
    real = torch.linalg.eigh
    calls = []

    def flaky(x):
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("failed to converge")
        return real(x)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    vals, vecs = eigen.eigh(a)
    assert calls == [torch.float32, torch.float64] and vals.dtype == torch.float32
    torch.testing.assert_close((vecs * vals) @ vecs.T, a, atol=1e-5, rtol=1e-5)
    r = eigen.inverse_root(a, 4, 1e-6)
    assert torch.isfinite(r).all()


def test_refresh_basis_is_a_power_iteration_step():
    torch.manual_seed(0)
    x = torch.randn(8, 8, dtype=torch.float64)
    a = x @ x.T
    q = eigen.eigenbasis(a, dtype=torch.float64)
    perm = torch.randperm(8)
    q_new, order = eigen.refresh_basis(a, q[:, perm], dtype=torch.float64)
    assert torch.equal(perm[order], torch.arange(8))  # the sort undoes the shuffle: eigenvalues descending
    # From an exact (shuffled) eigenbasis, one step returns the same basis, sorted descending, up to signs.
    torch.testing.assert_close((q_new.T @ q).abs(), torch.eye(8, dtype=torch.float64), atol=1e-8, rtol=0)
    g = torch.randn(8, 5, 3, dtype=torch.float64)
    bases = [eigen.eigenbasis(eigen.mode_gram(g, i), dtype=torch.float64) for i in range(3)]
    torch.testing.assert_close(eigen.from_basis(eigen.to_basis(g, bases), bases), g)


def test_modes_above_max_precond_dim_are_identity_and_state_bytes_exact():
    p = nn.Parameter(torch.randn(6, 40))
    c = shampoo.Config(max_precond_dim=10)
    opt = po.build("shampoo", [{"params": [p]}], max_precond_dim=10)
    p.grad = torch.randn(6, 40)
    opt.step()
    st = opt.state[p]
    assert st["stats"][1] is None and st["roots"][1] is None and st["stats"][0].shape == (6, 6)
    from conftest import measured_state_bytes

    assert measured_state_bytes(opt) == shampoo.state_bytes((6, 40), torch.float32, c) == (2 * 36 + 2 * 240) * 4
    v = nn.Parameter(torch.randn(7))
    opt = po.build("shampoo", [{"params": [v]}])
    v.grad = torch.randn(7)
    opt.step()
    assert measured_state_bytes(opt) == shampoo.state_bytes((7,), torch.float32, shampoo.Config()) == 2 * 7 * 4


@pytest.mark.parametrize("shape", [(12, 20), (3, 4, 5), (1, 1, 1, 1), (1, 1, 1), (2, 1, 3)])
def test_step_flops_equal_flop_counter(shape):
    """One-element tensors too (a 1x1 conv on one channel): tensordot ran them as a mul, uncounted."""
    p = nn.Parameter(torch.randn(*shape))
    opt = po.build("shampoo", [{"params": [p]}], precondition_frequency=2, start_preconditioning_step=1)
    counts = []
    for _ in range(3):  # steps 1 and 3 refresh, step 2 is ordinary
        p.grad = torch.randn(*shape)
        with FlopCounterMode(display=False) as fc:
            opt.step()
        counts.append(fc.get_total_flops())
    f = shampoo.step_flops(shape, shampoo.Config(precondition_frequency=2))
    assert counts[1] == f.matmul
    assert counts[2] == counts[0] == f.matmul + f.refresh_matmul
    if len(shape) == 2:
        m, n = shape
        assert f.matmul == 4 * m * n * (m + n) and f.refresh_matmul == 2 * (m ** 3 + n ** 3)
        assert f.refresh_other == 9 * (m ** 3 + n ** 3) and f.every == 2


def test_transfer_and_search_space():
    import optuna

    t = shampoo.from_adamw(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    assert t.config.grafting_beta2 == 0.95 and t.config.eps == 1e-12 and t.config.weight_decay == 0.05
    cfg = shampoo.search_space(optuna.trial.FixedTrial({"lr": 1e-3, "one_minus_beta1": 0.1, "one_minus_beta2": 0.01,
                                                         "eps": 1e-10, "precondition_frequency": 20,
                                                         "weight_decay": 0.0}))
    assert cfg.precondition_frequency == 20 and cfg.betas == pytest.approx((0.9, 0.99))


def test_preconditioned_steps_decrease_a_least_squares_loss():
    """The conformance table runs defaults (f = 100: 40 steps stay on the grafted Adam path); here Shampoo's
    own direction is on from step 5."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 4)
    opt = po.build("shampoo", model, precondition_frequency=5, lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0], losses
    assert not torch.equal(opt.state[model[0].weight]["roots"][0], torch.eye(16))
