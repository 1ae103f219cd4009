"""Hfac and HfacDiag against a float64 transcription of H-Fac (arXiv 2406.09958) and of Algorithm 3 of
arXiv 2502.07488 (HfacDiag), plus exact state bytes and step FLOPs."""
from __future__ import annotations

import pytest
import torch
from conftest import measured_state_bytes
from test_adadiag import _problem, _run, reference_basis
from torch.utils.flop_counter import FlopCounterMode

import precondtune.optim as po
from precondtune.optim import hfac


def hfac_reference(w0, grad_fn, steps, *, lr, betas, wd, d=1.0, every=None, two_sided=False):
    """H-Fac written out in float64 (row/column *means*; the paper's sums r, s divided by n, m give the same V̂,
    and its √(r/n), √(s/m) are the means' square roots). ``every``: HfacDiag with that refresh period."""
    w = w0.clone().double()
    m, n = w.shape
    u, r = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    v, s = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    p, q = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    b1, b2 = betas
    for t in range(1, steps + 1):
        g = grad_fn(w, t)
        if every is not None and (t - 1) % every == 0:
            p_new, q_new = reference_basis(g, two_sided)
            p = p_new
            q = q_new if two_sided else q
        g_rot = (p.T @ g @ q) if two_sided else (p.T @ g if every is not None else g)
        bh1 = b1 * (1 - b1 ** (t - 1)) / (1 - b1**t)
        bh2 = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
        g_row, g_col = g_rot.mean(dim=1), g_rot.mean(dim=0)
        u = bh1 * u + (1 - bh1) * g_row
        v = bh1 * v + (1 - bh1) * g_col
        r = bh2 * r + (1 - bh2) * (g_rot**2).mean(dim=1)
        s = bh2 * s + (1 - bh2) * (g_rot**2).mean(dim=0)
        v_hat = torch.outer(r, s) / r.mean()
        phi = bh1 * (u - g_row) / r.sqrt()
        psi = bh1 * (v - g_col) / s.sqrt()
        scaled = g_rot / v_hat.sqrt()
        scaled = scaled / max(1.0, float(scaled.pow(2).mean().sqrt()) / d)
        upd = 0.5 * (phi[:, None] + psi[None, :]) + scaled
        if every is not None:
            upd = p @ upd @ q.T if two_sided else p @ upd
        w = w - lr * (upd + wd * w)
    return w


HP = {"lr": 0.02, "betas": (0.9, 0.99), "weight_decay": 0.1}


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_hfac_matches_float64_algorithm(shape):
    w0, grad_fn = _problem(*shape, seed=3)
    got, _ = _run("hfac", w0, grad_fn, 8, HP)
    want = hfac_reference(w0, grad_fn, 8, lr=HP["lr"], betas=HP["betas"], wd=HP["weight_decay"])
    assert not torch.allclose(want, w0, atol=0.05)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_hfac_clipping_is_exercised():
    """d small enough that clip() rescales every step: the transcription still agrees."""
    w0, grad_fn = _problem(5, 8, seed=4)
    hp = {**HP, "clip_threshold": 0.3}
    got, _ = _run("hfac", w0, grad_fn, 6, hp)
    want = hfac_reference(w0, grad_fn, 6, lr=HP["lr"], betas=HP["betas"], wd=HP["weight_decay"], d=0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("shape", "two_sided"), [((6, 10), False), ((10, 6), False), ((7, 7), True)],
                         ids=["wide", "tall", "two-sided"])
def test_hfac_diag_matches_float64_algorithm(shape, two_sided):
    w0, grad_fn = _problem(*shape, seed=5)
    transpose = shape[0] > shape[1]
    if transpose:  # the reference works on the m ≤ n orientation, as the paper states it
        w0 = w0.T.contiguous()

        def grad_t(w, t, _f=grad_fn):
            return _f(w.T, t).T

        grad_fn = grad_t
    hp = {**HP, "svd_every": 3, "two_sided": two_sided}
    got, _ = _run("hfac-diag", w0, grad_fn, 8, hp, transpose=transpose)
    want = hfac_reference(w0, grad_fn, 8, lr=HP["lr"], betas=HP["betas"], wd=HP["weight_decay"], every=3,
                          two_sided=two_sided)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "hp"), [("hfac", {}), ("hfac-diag", {"svd_every": 2}),
                                          ("hfac-diag", {"svd_every": 2, "two_sided": True})])
@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (4, 3, 2, 2)])
def test_state_bytes_exact(name, hp, shape, dtype):
    w = torch.nn.Parameter(torch.randn(shape, dtype=dtype))
    opt = po.build(name, [{"params": [w]}], **hp)
    for _ in range(3):
        w.grad = torch.randn(shape, dtype=dtype)
        opt.step()
    assert all(torch.isfinite(x).all() for x in opt.state[w].values() if torch.is_tensor(x))
    spec = po.get_spec(name)
    assert spec.state_bytes(shape, dtype, spec.config(**hp)) == measured_state_bytes(opt)


@pytest.mark.parametrize(("name", "hp"), [("hfac", {}), ("hfac-diag", {"svd_every": 2}),
                                          ("hfac-diag", {"svd_every": 2, "two_sided": True})])
@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (4, 3, 2, 2)])
def test_step_flops_equal_flop_counter(name, hp, shape):
    w = torch.nn.Parameter(torch.randn(shape))
    opt = po.build(name, [{"params": [w]}], **hp)
    spec = po.get_spec(name)
    flops = spec.step_flops(shape, spec.config(**hp))
    counted = []
    for _ in range(3):
        w.grad = torch.randn(shape)
        with FlopCounterMode(display=False) as fc:
            opt.step()
        counted.append(fc.get_total_flops())
    assert counted == [flops.matmul + flops.refresh_matmul, flops.matmul, flops.matmul + flops.refresh_matmul]
    assert (flops.refresh_other > 0) == (name == "hfac-diag")


def test_transfer_and_search_space():
    import optuna

    t = hfac.diag_from_adamw(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    assert (t.config.lr, t.config.betas, t.config.weight_decay) == (3e-3, (0.9, 0.95), 0.1)
    trial = optuna.trial.FixedTrial({"lr": 1e-3, "one_minus_beta1": 0.1, "one_minus_beta2": 0.01,
                                     "svd_every": 50, "weight_decay": 0.0})
    assert hfac.diag_search_space(trial, t.config).svd_every == 50
    assert po.get_spec("HFAC_DIAG").roles == po.MATRIX_ROLES


@pytest.mark.parametrize("name", ["hfac", "hfac-diag", "adafac-diag"])
def test_a_gradient_with_all_zero_columns_gives_a_finite_update(name):
    """A dead ReLU feature gives a weight an all-zero gradient column. With ε = 1e-30, ε² underflows to 0 in
    float32, √V̂ was 0 there and the update 0·∞ = NaN: H-Fac turned the cnn example's classifier to NaN at
    its first step. The floor is now at least float32's smallest normal number."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 64))
    opt = po.build(name, [w])
    for _ in range(3):
        g = torch.randn(32, 64)
        g[:, :5] = 0.0  # five input features that never fire
        w.grad = g
        opt.step()
    assert torch.isfinite(w).all()
    from precondtune.optim.kernels import factored

    row, col = torch.zeros(4, 1), torch.zeros(1, 3)
    assert torch.equal(factored.precondition(torch.zeros(4, 3), row, col, 1e-30), torch.zeros(4, 3))


def test_the_floor_leaves_a_representable_eps_alone_in_every_dtype():
    """The floor only replaces an eps that rounds to 0 in the dtype; Adafactor's float16 eps₁² is representable
    and its float16 step still equals torch.optim.Adafactor's (a smallest-normal floor had cut it to 0.13×)."""
    from precondtune.optim.kernels import factored

    assert factored.floor(1e-30, torch.float32) == 1e-30
    assert 0 < factored.floor(1e-60, torch.float32) < 1e-44 and 0 < factored.floor(1e-30, torch.float16) < 1e-7
    torch.manual_seed(0)
    g = torch.randn(64, 32) * 1e-3
    ours, ref = torch.nn.Parameter(torch.ones(64, 32, dtype=torch.float16)), None
    ref = torch.nn.Parameter(torch.ones(64, 32, dtype=torch.float16))
    ours.grad, ref.grad = g.half(), g.half()
    po.build("adafactor", [ours], lr=1e-2, weight_decay=0.0).step()
    torch.optim.Adafactor([ref], lr=1e-2, weight_decay=0.0).step()
    assert torch.allclose(ours.float(), ref.float(), atol=1e-3)
