"""GaLore against pytorch-optimizer's GaLore (where settings coincide) and a float64 transcription (arXiv 2403.03507)."""
from __future__ import annotations

import pytest
import torch
from conftest import measured_state_bytes
from torch.utils.flop_counter import FlopCounterMode

from precondtune.optim import galore

SHAPES = [(12, 5), (5, 12)]  # m ≥ n: right projector (r×n); m < n: left projector (m×r)


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 0.1 for _ in range(steps)]


@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide"])
def test_matches_pytorch_optimizer_galore(shape):
    """Same settings as the reference: one projector (gap longer than the run), no weight decay, tiny ε."""
    from pytorch_optimizer import GaLore as RefGaLore

    torch.manual_seed(0)
    w0 = torch.randn(shape)
    ours, ref = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    hp = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-12, "weight_decay": 0.0}
    opt = galore.GaLore([ours], rank=3, update_proj_gap=1000, scale=0.5, **hp)
    ref_opt = RefGaLore([{"params": [ref], "rank": 3, "update_proj_gap": 1000, "scale": 0.5,
                          "projection_type": "std"}], **hp)
    for g in _grads(shape, 6):
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def _align(basis, like, right):
    """Singular vectors are unique up to sign: flip the float64 ones to match the optimizer's float32 ones."""
    signs = torch.sign((basis * like.double()).sum(dim=1 if right else 0, keepdim=True))
    return basis * signs


@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide"])
def test_matches_float64_transcription_with_refreshes_and_decay(shape):
    torch.manual_seed(1)
    steps, gap, rank, scale = 8, 3, 2, 0.25
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.99), 1e-6, 0.1
    w = torch.randn(shape).requires_grad_()
    opt = galore.GaLore([w], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, rank=rank, update_proj_gap=gap,
                        scale=scale)
    ref = w.detach().double().clone()
    m_ = v_ = p_ = None
    right = shape[0] >= shape[1]
    for t, g in enumerate(_grads(shape, steps, seed=2), start=1):
        w.grad = g.clone()
        opt.step()
        g = g.double()
        if (t - 1) % gap == 0:  # Algorithm 2: new projector from the SVD of the current gradient
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            p_ = _align(vh[:rank] if right else u[:, :rank], opt.state[w]["projector"], right)
        low = g @ p_.T if right else p_.T @ g
        if m_ is None:
            m_, v_ = torch.zeros_like(low), torch.zeros_like(low)
        m_ = b1 * m_ + (1 - b1) * low
        v_ = b2 * v_ + (1 - b2) * low**2
        n_ = (m_ / (1 - b1**t)) / ((v_ / (1 - b2**t)).sqrt() + eps)
        ref = ref * (1 - lr * wd) - lr * scale * (n_ @ p_ if right else p_ @ n_)
    torch.testing.assert_close(w.detach().double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 6), (6, 16), (8, 8)])
def test_step_flops_match_flop_counter_on_ordinary_and_refresh_steps(shape):
    config = galore.Config(rank=4, update_proj_gap=2)
    w = torch.randn(shape, requires_grad=True)
    opt = galore.GaLore([w], rank=4, update_proj_gap=2)
    expected = galore.step_flops(shape, config)
    counts = []
    for g in _grads(shape, 2):
        w.grad = g
        with FlopCounterMode(display=False) as fc:
            opt.step()
        counts.append(fc.get_total_flops())
    assert counts == [expected.matmul + expected.refresh_matmul, expected.matmul]  # refresh step, ordinary step
    m, n = max(shape), min(shape)
    assert expected.refresh_other == 6 * m * n * n + 20 * n**3 and expected.every == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,rank", [((12, 5), 3), ((5, 12), 3), ((4, 6), 128)])
def test_state_bytes_exact_and_rank_capped(shape, rank, dtype):
    w = torch.randn(shape, dtype=dtype, requires_grad=True)
    opt = galore.GaLore([w], rank=rank)
    w.grad = torch.randn(shape, dtype=dtype)
    opt.step()
    assert measured_state_bytes(opt) == galore.state_bytes(shape, dtype, galore.Config(rank=rank))
    assert min(opt.state[w]["projector"].shape) == min(rank, *shape)
    assert opt.state[w]["projector"].dtype == dtype


def test_transfer_and_search_space():
    import optuna

    t = galore.from_adamw(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert (t.config.lr, t.config.betas, t.config.weight_decay, t.config.scale) == (3e-3, (0.9, 0.95), 0.1, 0.25)
    c = galore.search_space(optuna.trial.FixedTrial({"lr": 1e-2, "rank": 64, "update_proj_gap": 100,
                                                      "scale": 0.5}))
    assert (c.rank, c.update_proj_gap, c.scale) == (64, 100, 0.5)
