"""SOAP against a float64 transcription of Algorithm 3 (papers/002; arXiv 2409.11321), with upstream SOAP's
boundary conventions (github.com/nikhilvyas/SOAP); 1-D Adam path, merge_dims, state bytes and FLOPs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import measured_state_bytes
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import precondtune.optim as po
from precondtune.optim import soap


def _eigvecs_desc(a: np.ndarray) -> np.ndarray:
    return np.linalg.eigh(a)[1][:, ::-1]


def algorithm3(w: np.ndarray, grads: list[np.ndarray], *, lr: float, b1: float, b2: float, eps: float,
               wd: float, f: int) -> list[np.ndarray]:
    """Algorithm 3 in float64, M kept in the original basis as written. Boundary effects as upstream: the first
    gradient only builds L, R and Q (eigh, eigenvalues descending); Adam bias correction lr·√(1−β₂ᵗ)/(1−β₁ᵗ);
    weight decay after the step; Eigenvectors(P, Q) = QR(P·Q) after sorting Q by diag(QᵀPQ), V permuted alike."""
    g0 = grads[0]
    L, R = (1 - b2) * g0 @ g0.T, (1 - b2) * g0.T @ g0
    QL, QR = _eigvecs_desc(L), _eigvecs_desc(R)
    M, V = np.zeros_like(w), np.zeros_like(w)
    out = []
    for t, G in enumerate(grads[1:], start=1):
        Gp = QL.T @ G @ QR                                   # line 3
        M = b1 * M + (1 - b1) * G                            # line 4
        Mp = QL.T @ M @ QR                                   # line 5
        V = b2 * V + (1 - b2) * Gp * Gp                      # line 7
        Np = Mp / (np.sqrt(V) + eps)                         # line 8
        w = w - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * (QL @ Np @ QR.T)   # lines 10-11
        w = w - lr * wd * w
        L = b2 * L + (1 - b2) * G @ G.T                      # line 13
        R = b2 * R + (1 - b2) * G.T @ G                      # line 14
        if t % f == 0:                                       # lines 15-18
            oL = np.argsort(-np.diag(QL.T @ L @ QL), kind="stable")
            oR = np.argsort(-np.diag(QR.T @ R @ QR), kind="stable")
            V = V[oL][:, oR]
            QL = np.linalg.qr(L @ QL[:, oL])[0]
            QR = np.linalg.qr(R @ QR[:, oR])[0]
        out.append(w.copy())
    return out


def _problem(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(shape)
    grads = [rng.standard_normal(shape) for _ in range(steps)]
    return w0, grads


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)], ids=["fp64", "fp32"])
def test_matches_float64_algorithm3(dtype, tol):
    # square layer with full-rank gradients: L and R have distinct eigenvalues, so the bases are unique up to sign
    hp = {"lr": 0.01, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "wd": 0.01, "f": 3}
    w0, grads = _problem((6, 6), 11)
    ref = algorithm3(w0.copy(), grads, **hp)
    p = nn.Parameter(torch.tensor(w0, dtype=dtype))
    opt = po.build("soap", [{"params": [p]}], lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
                   weight_decay=hp["wd"], precondition_frequency=hp["f"])
    p.grad = torch.tensor(grads[0], dtype=dtype)
    opt.step()
    assert np.array_equal(p.detach().double().numpy(), np.asarray(torch.tensor(w0, dtype=dtype).double()))
    for g, w in zip(grads[1:], ref):
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        np.testing.assert_allclose(p.detach().double().numpy(), w, rtol=tol, atol=tol)


def test_one_d_parameters_run_adam_after_the_first_step():
    lr, b1, b2, eps = 0.01, 0.9, 0.95, 1e-8
    w0, grads = _problem((5,), 5, seed=1)
    p = nn.Parameter(torch.tensor(w0))
    opt = po.build("soap", [{"params": [p]}], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0)
    w, m, v = w0.copy(), 0 * w0, 0 * w0
    for k, g in enumerate(grads):
        p.grad = torch.tensor(g)
        opt.step()
        if k > 0:
            t = k
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            w = w - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12, atol=1e-12)
    assert opt.state[p]["GG"] == [None] and opt.state[p]["Q"] == [None]


def test_merge_dims_and_max_precond_dim_layout_and_state_bytes():
    assert soap.merged_shape((64, 32, 3, 3), 10000) == (6144, 3)
    assert soap.merged_shape((8, 4, 3, 3), 50) == (32, 9)
    conv = nn.Parameter(torch.randn(8, 4, 3, 3))
    emb = nn.Parameter(torch.randn(30, 6))
    opt = po.build("soap", [{"params": [conv], "merge_dims": True, "max_precond_dim": 50},
                            {"params": [emb], "max_precond_dim": 20}])
    for _ in range(3):
        conv.grad, emb.grad = torch.randn_like(conv), torch.randn_like(emb)
        opt.step()
    assert [tuple(q.shape) for q in opt.state[conv]["Q"]] == [(32, 32), (9, 9)]
    assert opt.state[emb]["Q"][0] is None and opt.state[emb]["Q"][1].shape == (6, 6)
    expected = (soap.state_bytes((8, 4, 3, 3), torch.float32, soap.Config(merge_dims=True, max_precond_dim=50))
                + soap.state_bytes((30, 6), torch.float32, soap.Config(max_precond_dim=20)))
    assert measured_state_bytes(opt) == expected == 4 * ((2 * 288 + 2 * (32 ** 2 + 9 ** 2)) + (2 * 180 + 2 * 36))


@pytest.mark.parametrize("shape,hp", [((12, 20), {}), ((3, 4, 5), {}),
                                      ((8, 4, 3, 3), {"merge_dims": True, "max_precond_dim": 50}),
                                      ((1, 1, 1, 1), {}), ((1, 1, 1), {}), ((2, 1, 3), {})])
def test_step_flops_equal_flop_counter(shape, hp):
    p = nn.Parameter(torch.randn(*shape))
    opt = po.build("soap", [{"params": [p]}], precondition_frequency=2, **hp)
    counts = []
    for _ in range(3):  # call 1 builds the preconditioner; then t = 1 (ordinary), t = 2 (refresh)
        p.grad = torch.randn(*shape)
        with FlopCounterMode(display=False) as fc:
            opt.step()
        counts.append(fc.get_total_flops())
    f = soap.step_flops(shape, soap.Config(precondition_frequency=2, **hp))
    assert counts[1] == f.matmul and counts[2] == f.matmul + f.refresh_matmul
    if shape == (12, 20):
        m, n = shape
        assert f.matmul == 6 * m * n * (m + n)
        assert f.refresh_matmul == 4 * m * n * (m + n) + 2 * (m ** 3 + n ** 3)
        assert f.refresh_other == (8 * m ** 3) // 3 + (8 * n ** 3) // 3


def test_bf16_runs_finite_and_keeps_dtype():
    p = nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
    opt = po.build("soap", [{"params": [p]}], precondition_frequency=2)
    for _ in range(6):
        p.grad = torch.randn(16, 8, dtype=torch.bfloat16)
        opt.step()
    assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    assert all(q.dtype == torch.bfloat16 for q in opt.state[p]["Q"])


def test_transfer_and_search_space():
    import optuna

    t = soap.from_adamw(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert (t.config.lr, t.config.betas, t.config.weight_decay) == (1e-3, (0.9, 0.95), 0.1)
    cfg = soap.search_space(optuna.trial.FixedTrial({"lr": 3e-3, "one_minus_beta1": 0.05, "one_minus_beta2": 0.05,
                                                      "precondition_frequency": 10, "weight_decay": 0.01}))
    assert cfg.betas == pytest.approx((0.95, 0.95)) and cfg.precondition_frequency == 10
