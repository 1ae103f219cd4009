"""AdaDiag / AdaDiag++ against a float64 transcription of Algorithm 1 of arXiv 2502.07488, plus the SVD-basis
kernel, exact state bytes and FlopCounterMode-exact step FLOPs."""
from __future__ import annotations

import pytest
import torch
from conftest import measured_state_bytes
from torch.utils.flop_counter import FlopCounterMode

import precondtune.optim as po
from precondtune.errors import ConfigError
from precondtune.optim import adadiag
from precondtune.optim.kernels import svd_basis

# ---------------------------------------------------------------------------------------------- reference


def flip_signs(u: torch.Tensor) -> torch.Tensor:
    """Largest-magnitude entry of each column positive (the convention the kernel documents)."""
    out = u.clone()
    for j in range(out.shape[1]):
        i = int(out[:, j].abs().argmax())
        if out[i, j] < 0:
            out[:, j] = -out[:, j]
    return out


def reference_basis(g: torch.Tensor, two_sided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float64 P (and Q) of an m×n gradient with m ≤ n, signs fixed as documented (Q's first m columns follow
    P's signs so that G = P Σ Qᵀ; its null-space columns get their own largest-entry-positive signs)."""
    u, _, vh = torch.linalg.svd(g, full_matrices=True)
    k = u.shape[1]
    signs = torch.stack([torch.sign(u[int(u[:, j].abs().argmax()), j]) for j in range(k)])
    p = u * signs
    if not two_sided:
        return p, None
    q = vh.T.clone()
    q[:, :k] *= signs
    q[:, k:] = flip_signs(q[:, k:])
    return p, q


def adadiag_reference(w0, grad_fn, steps, *, lr, betas, eps, wd, every, two_sided, project=False,
                      basis_hook=None):
    """Algorithm 1 in float64, written out step by step (W is m×n, m ≤ n)."""
    w = w0.clone().double()
    m, n = w.shape
    p, q = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    mom = torch.zeros_like(w)
    var = torch.zeros_like(w)
    b1, b2 = betas
    for t in range(1, steps + 1):
        g = grad_fn(w, t)
        if (t - 1) % every == 0:
            p_new, q_new = reference_basis(g, two_sided)
            if basis_hook is not None:
                p_new, q_new = basis_hook(t, p_new, q_new)
            if project and t > 1:
                rl = p_new.T @ p
                rr = q.T @ q_new if two_sided else torch.eye(n, dtype=torch.float64)
                mom = rl @ mom @ rr
                var = (rl * rl) @ var @ (rr * rr)
            p = p_new
            if two_sided:
                q = q_new
        g_rot = p.T @ g @ q if two_sided else p.T @ g
        mom = b1 * mom + (1 - b1) * g_rot
        var = b2 * var + (1 - b2) * g_rot**2
        m_hat = mom / (1 - b1**t)
        v_hat = var / (1 - b2**t)
        n_rot = m_hat / (v_hat.sqrt() + eps)
        update = p @ n_rot @ q.T if two_sided else p @ n_rot
        w = w - lr * (update + wd * w)
    return w


def _problem(m: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, m, generator=gen, dtype=torch.float64) / m**0.5 + torch.eye(m, dtype=torch.float64)
    target = torch.randn(m, n, generator=gen, dtype=torch.float64)
    noise = [torch.randn(m, n, generator=gen, dtype=torch.float64) * 0.1 for _ in range(20)]
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)

    def grad_fn(w, t):
        return a.T @ (a @ w - target) + noise[t - 1]

    return w0, grad_fn


def _run(name, w0, grad_fn, steps, hp, *, transpose=False, capture=None):
    """Drive the optimizer on W (stored transposed when ``transpose``) with the reference's gradients."""
    w = torch.nn.Parameter((w0.T if transpose else w0).clone().float())
    opt = po.build(name, [{"params": [w]}], **hp)
    for t in range(1, steps + 1):
        wd = w.detach().double()
        g = grad_fn(wd.T if transpose else wd, t)
        w.grad = (g.T if transpose else g).float().contiguous()
        opt.step()
        if capture is not None:
            capture(t, opt.state[w])
    return (w.detach().T if transpose else w.detach()).double(), opt


HP = {"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1, "svd_every": 3}
HP_TWO_SIDED = {**HP, "eps": 1e-2}
"""At a refresh step Pᵀ G Q is Σ: its off-diagonal entries are rounding noise (~1e-6·σ₁ in float32, ~1e-15 in
float64), and Adam's first step turns any entry above ε into ±1. An ε well above float32 noise keeps the
comparison about the algorithm rather than about which rounding noise each precision produced."""


@pytest.mark.parametrize("project", [False, True], ids=["carry", "project"])
@pytest.mark.parametrize("transpose", [False, True], ids=["wide", "tall"])
def test_adadiag_matches_float64_algorithm(transpose, project):
    w0, grad_fn = _problem(6, 10)
    hp = {**HP, "project_moments": project}
    got, _ = _run("adadiag", w0, grad_fn, 8, hp, transpose=transpose)
    want = adadiag_reference(w0, grad_fn, 8, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], wd=hp["weight_decay"],
                             every=hp["svd_every"], two_sided=False, project=project)
    assert not torch.allclose(want, w0, atol=0.05)  # the steps moved W
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("project", [False, True], ids=["carry", "project"])
def test_adadiag_pp_matches_float64_algorithm_square(project):
    w0, grad_fn = _problem(7, 7, seed=1)
    hp = {**HP_TWO_SIDED, "project_moments": project}
    got, _ = _run("adadiag++", w0, grad_fn, 8, hp)
    want = adadiag_reference(w0, grad_fn, 8, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], wd=hp["weight_decay"],
                             every=hp["svd_every"], two_sided=True, project=project)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_adadiag_pp_matches_float64_algorithm_rectangular():
    """For m < n the last n−m columns of Q span the gradient's null space, where any orthonormal basis is a valid
    SVD; the reference takes those columns from the optimizer's own Q (checked orthogonal to G's row space)."""
    w0, grad_fn = _problem(5, 9, seed=2)
    seen: dict[int, torch.Tensor] = {}

    def capture(t, state):
        if (t - 1) % HP["svd_every"] == 0:
            seen[t] = state["Q"].double().clone()

    got, _ = _run("adadiag-pp", w0, grad_fn, 7, HP_TWO_SIDED, capture=capture)

    def hook(t, p, q):
        null = seen[t][:, p.shape[1]:]
        assert torch.allclose(q[:, :p.shape[1]].T @ null, torch.zeros(p.shape[1], null.shape[1],
                                                                     dtype=torch.float64), atol=1e-5)
        q = q.clone()
        q[:, p.shape[1]:] = null
        return p, q

    hp = HP_TWO_SIDED
    want = adadiag_reference(w0, grad_fn, 7, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], wd=hp["weight_decay"],
                             every=hp["svd_every"], two_sided=True, basis_hook=hook)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (4, 3, 2, 2), (6, 6)])
def test_svd_basis_is_orthogonal_and_diagonalizes(shape):
    g = torch.randn(shape)
    mat, transposed = svd_basis.oriented(g)
    assert mat.shape[0] <= mat.shape[1] and transposed == (shape[0] > mat.numel() // shape[0])
    p, q = svd_basis.svd_basis(mat, two_sided=True)
    m, n = mat.shape
    torch.testing.assert_close(p.T @ p, torch.eye(m), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.T @ q, torch.eye(n), atol=1e-5, rtol=0)
    rotated = svd_basis.rotate(mat, p, q)
    sigma = torch.linalg.svdvals(mat)
    torch.testing.assert_close(rotated[:, :m], torch.diag(sigma), atol=1e-5, rtol=0)  # Σ, signs consistent
    torch.testing.assert_close(rotated[:, m:], torch.zeros(m, n - m), atol=1e-5, rtol=0)
    back = svd_basis.restore(svd_basis.unrotate(rotated, p, q), transposed, g.shape)
    torch.testing.assert_close(back, g, atol=1e-5, rtol=0)
    one, none = svd_basis.svd_basis(mat, two_sided=False)
    assert none is None
    torch.testing.assert_close(one, p)
    assert (one.gather(0, one.abs().argmax(0, keepdim=True)) > 0).all()


def test_svd_basis_16bit_and_non_finite():
    g = torch.randn(4, 6, dtype=torch.bfloat16)
    p, _ = svd_basis.svd_basis(g, two_sided=False)
    assert p.dtype == torch.bfloat16
    g[0, 0] = float("nan")
    assert svd_basis.svd_basis(g, two_sided=True) is None


def test_project_moves_first_moment_exactly_and_keeps_row_sums():
    g = torch.randn(4, 7, dtype=torch.float64)
    p_old, q_old = reference_basis(torch.randn(4, 7, dtype=torch.float64), True)
    p_new, q_new = reference_basis(torch.randn(4, 7, dtype=torch.float64), True)
    rl, rr = svd_basis.transitions(p_new, p_old, q_new, q_old)
    moved = svd_basis.project_linear(p_old.T @ g @ q_old, rl, rr)
    torch.testing.assert_close(moved, p_new.T @ g @ q_new)
    v = torch.rand(4, 7, dtype=torch.float64)
    dv = svd_basis.project_diagonal(v, rl, rr)
    assert (dv >= 0).all()
    torch.testing.assert_close(dv.sum(), v.sum())


def test_non_finite_gradient_keeps_previous_basis():
    w = torch.nn.Parameter(torch.randn(3, 5))
    opt = po.build("adadiag", [{"params": [w]}], svd_every=1)
    w.grad = torch.randn(3, 5)
    opt.step()
    before = opt.state[w]["P"].clone()
    w.grad = torch.full((3, 5), float("nan"))
    opt.step()
    assert torch.equal(opt.state[w]["P"], before)


# ---------------------------------------------------------------------------------------------- bytes, FLOPs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["adadiag", "adadiag-pp"])
@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (4, 3, 2, 2)])
def test_state_bytes_exact(name, shape, dtype):
    w = torch.nn.Parameter(torch.randn(shape, dtype=dtype))
    opt = po.build(name, [{"params": [w]}], svd_every=2)
    for _ in range(3):
        w.grad = torch.randn(shape, dtype=dtype)
        opt.step()
    spec = po.get_spec(name)
    assert spec.state_bytes(shape, dtype, spec.config(svd_every=2)) == measured_state_bytes(opt)


@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("name", ["adadiag", "adadiag-pp"])
@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (4, 3, 2, 2)])
def test_step_flops_equal_flop_counter(name, shape, project):
    w = torch.nn.Parameter(torch.randn(shape))
    opt = po.build(name, [{"params": [w]}], svd_every=2, project_moments=project)
    spec = po.get_spec(name)
    flops = spec.step_flops(shape, spec.config(svd_every=2, project_moments=project))
    counted = []
    for _ in range(3):  # steps 1 (refresh, nothing to project yet), 2 (ordinary), 3 (refresh)
        w.grad = torch.randn(shape)
        with FlopCounterMode(display=False) as fc:
            opt.step()
        counted.append(fc.get_total_flops())
    assert counted[1] == flops.matmul
    assert counted[2] == flops.matmul + flops.refresh_matmul
    assert flops.every == 2 and flops.refresh_other > 0


def test_svd_flops_follow_golub_van_loan():
    assert svd_basis.svd_flops(3, 5, two_sided=True) == 4 * 25 * 3 + 8 * 5 * 9 + 9 * 27
    assert svd_basis.svd_flops(5, 3, two_sided=False) == 14 * 5 * 9 + 8 * 27


def test_names_transfer_and_search_space():
    import optuna

    assert po.get_spec("AdaDiag++").name == "adadiag-pp"
    assert po.get_spec("adadiag").roles == po.MATRIX_ROLES
    t = adadiag.from_adamw(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert (t.config.lr, t.config.betas, t.config.weight_decay) == (3e-3, (0.9, 0.95), 0.1)
    trial = optuna.trial.FixedTrial({"lr": 1e-3, "one_minus_beta1": 0.1, "one_minus_beta2": 0.01,
                                     "svd_every": 100, "weight_decay": 0.0})
    c = adadiag.search_space(trial, t.config)
    assert c.svd_every == 100 and c.betas == pytest.approx((0.9, 0.99))
    with pytest.raises(ConfigError, match="svd_every"):
        po.get_spec("adadiag").config(svd_every=0)
