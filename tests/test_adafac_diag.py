"""AdafacDiag against a float64 transcription of Algorithm 2 of arXiv 2502.07488 (App. A.1), with and
without momentum, one- and two-sided, moments carried or projected; exact state bytes and step FLOPs."""
from __future__ import annotations

import pytest
import torch
from conftest import measured_state_bytes
from test_adadiag import _problem, _run, reference_basis
from torch.utils.flop_counter import FlopCounterMode

import precondtune.optim as po
from precondtune.optim import adafac_diag


def adafac_diag_reference(w0, grad_fn, steps, *, lr, betas, wd, every, d=1.0, two_sided=False, project=False):
    """Algorithm 2 in float64 (W is m×n, m ≤ n): Adafactor's factored second moment with constant β₂ and bias
    correction, optional momentum, update clipping, all in the gradient's singular basis."""
    w = w0.clone().double()
    m, n = w.shape
    p, q = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    r, c = torch.zeros(m, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    mom = torch.zeros_like(w)
    b1, b2 = betas
    for t in range(1, steps + 1):
        g = grad_fn(w, t)
        if (t - 1) % every == 0:
            p_new, q_new = reference_basis(g, two_sided)
            if project and t > 1:
                rl = p_new.T @ p
                rr = q.T @ q_new if two_sided else torch.eye(n, dtype=torch.float64)
                mom = rl @ mom @ rr
                r = (rl * rl) @ r
                c = c @ (rr * rr)
            p = p_new
            q = q_new if two_sided else q
        g_rot = p.T @ g @ q if two_sided else p.T @ g
        r = b2 * r + (1 - b2) * (g_rot**2).mean(dim=1)
        c = b2 * c + (1 - b2) * (g_rot**2).mean(dim=0)
        v_hat = torch.outer(r, c) / r.mean() / (1 - b2**t)
        if b1 > 0:
            mom = b1 * mom + (1 - b1) * g_rot
            numerator = mom / (1 - b1**t)
        else:
            numerator = g_rot
        upd = numerator / v_hat.sqrt()
        upd = upd / max(1.0, float(upd.pow(2).mean().sqrt()) / d)
        back = p @ upd @ q.T if two_sided else p @ upd
        w = w - lr * (back + wd * w)
    return w


HP = {"lr": 0.02, "weight_decay": 0.1, "svd_every": 3}


@pytest.mark.parametrize("project", [False, True], ids=["carry", "project"])
@pytest.mark.parametrize("beta1", [0.9, 0.0], ids=["momentum", "no-momentum"])
@pytest.mark.parametrize(("shape", "two_sided"), [((6, 10), False), ((10, 6), False), ((7, 7), True)],
                         ids=["wide", "tall", "two-sided"])
def test_adafac_diag_matches_float64_algorithm(shape, two_sided, beta1, project):
    w0, grad_fn = _problem(*shape, seed=6)
    transpose = shape[0] > shape[1]
    if transpose:  # the reference works on the m ≤ n orientation, as the paper states it
        w0 = w0.T.contiguous()

        def grad_t(w, t, _f=grad_fn):
            return _f(w.T, t).T

        grad_fn = grad_t
    hp = {**HP, "betas": (beta1, 0.99), "two_sided": two_sided, "project_moments": project}
    got, opt = _run("adafac-diag", w0, grad_fn, 8, hp, transpose=transpose)
    assert ("exp_avg" in next(iter(opt.state.values()))) == (beta1 > 0)
    want = adafac_diag_reference(w0, grad_fn, 8, lr=HP["lr"], betas=(beta1, 0.99), wd=HP["weight_decay"], every=3,
                                 two_sided=two_sided, project=project)
    assert not torch.allclose(want, w0, atol=0.05)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


CONFIGS = [{"svd_every": 2}, {"svd_every": 2, "betas": (0.0, 0.999)}, {"svd_every": 2, "two_sided": True},
           {"svd_every": 2, "project_moments": True}, {"svd_every": 2, "project_moments": True, "two_sided": True}]
IDS = ["momentum", "no-momentum", "two-sided", "project", "project-two-sided"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hp", CONFIGS[:3], ids=IDS[:3])
@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (4, 3, 2, 2)])
def test_state_bytes_exact(hp, shape, dtype):
    w = torch.nn.Parameter(torch.randn(shape, dtype=dtype))
    opt = po.build("adafac-diag", [{"params": [w]}], **hp)
    for _ in range(3):
        w.grad = torch.randn(shape, dtype=dtype)
        opt.step()
    spec = po.get_spec("adafac-diag")
    assert spec.state_bytes(shape, dtype, spec.config(**hp)) == measured_state_bytes(opt)


@pytest.mark.parametrize("hp", CONFIGS, ids=IDS)
@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (4, 3, 2, 2)])
def test_step_flops_equal_flop_counter(hp, shape):
    w = torch.nn.Parameter(torch.randn(shape))
    opt = po.build("adafac-diag", [{"params": [w]}], **hp)
    spec = po.get_spec("adafac-diag")
    flops = spec.step_flops(shape, spec.config(**hp))
    counted = []
    for _ in range(3):  # refresh (nothing to project yet), ordinary, refresh
        w.grad = torch.randn(shape)
        with FlopCounterMode(display=False) as fc:
            opt.step()
        counted.append(fc.get_total_flops())
    assert counted == [flops.matmul, flops.matmul, flops.matmul + flops.refresh_matmul]


def test_transfer_search_space_and_validation():
    import optuna

    from precondtune.errors import ConfigError

    t = adafac_diag.from_adamw(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    assert (t.config.lr, t.config.betas) == (3e-3, (0.9, 0.95))
    no_momentum = adafac_diag.Config(betas=(0.0, 0.999))
    trial = optuna.trial.FixedTrial({"lr": 1e-3, "one_minus_beta2": 0.01, "svd_every": 50, "weight_decay": 0.0})
    assert adafac_diag.search_space(trial, no_momentum).betas == pytest.approx((0.0, 0.99))
    with pytest.raises(ConfigError, match="clip_threshold"):
        po.get_spec("AdafacDiag").config(clip_threshold=0)
