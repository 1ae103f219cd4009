"""AdafacDiag: Adafactor run in the gradient's SVD basis (arXiv 2502.07488, App. A.1, Alg. 2), with or
without momentum. With P = I (no SVD step) it is Adafactor with a constant, bias-corrected β₂.

Every T steps (and on the first) P [, Q] ← svd(G); G̃ = Pᵀ G [Q] (the smaller side's basis, or both with
``two_sided``, the "AdafacDiag++" of the paper's Table 4);
  r ← β₂r + (1−β₂)·mean_j G̃²,  c ← β₂c + (1−β₂)·mean_i G̃²,  V̂ = r·c / mean(r) / (1 − β₂ᵗ)
  N = M̂ with M ← β₁M + (1−β₁)·G̃, M̂ = M/(1 − β₁ᵗ)   (with momentum; β₁ = 0: N = G̃, no M is kept)
  U = N / √V̂,  Û = U / max(1, RMS(U)/d),  W ← W·(1 − η·λ) − η·P Û [Qᵀ].
The factored statistics are :mod:`.kernels.factored`'s (ε as a floor under mean(r) and √V̂, as
``torch.optim.Adafactor`` places it). Matrix roles only; the rest go to AdamW by default.

State per matrix (parameter dtype): r (m), c (n), M (m×n, with momentum), P (min(m,n)²; with ``two_sided``
P and Q: m² + n²). At a refresh the moments are carried over (Alg. 2); ``project_moments=True`` moves M exactly
and r, c by the diagonal transport of :mod:`.kernels.svd_basis`, which maps the rank-1 V̂ = r·c/mean(r) to the
transported full second moment exactly (mean(r) is preserved).

Checked against the paper (arXiv 2502.07488, App. A.1–A.2 and C, as extracted in source document 004; Algorithm
2's formulas lost their symbols, and no public code by the authors was found): Adafactor's factored V̂ in the
rotated basis; with momentum, a full first moment M normalised by V̂ ("Adafactor normalizes the first moment using
the second-moment approximation", "updates parameters using the signal-to-noise ratio" M/√V, App. A.2), read here
as N = M̂ before the division (not momentum of the clipped update, as in HF Transformers); bias corrections with
constant β's (App. C); the memory of both variants (Table 3, reproduced by tests/test_memory_table3.py).
Documented choices of precondtune, not read from the paper: clipping applied to M̂/√V̂ (Adafactor's d = 1 on the
update), ε as a floor (1e-30), the defaults β = (0.9, 0.999), T = 200 and weight decay 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import itemsize
from . import _space
from .kernels import factored, lerp_, svd_basis
from .registry import MATRIX_ROLES, OptimizerSpec, PrecondOptimizer, StepFlops, Transfer, check_range

PAPER = "Nguyen, Liu, Chen & Liu 2025, arXiv 2502.07488, App. A.1 (AdafacDiag)"


@dataclass(frozen=True, kw_only=True)
class Config:
    """AdafacDiag hyperparameters; β₁ = 0 is "without momentum" (no first moment kept)."""

    lr: float = 1e-3
    """Learning rate η (an absolute step, Adam's scale, as the paper runs it; no relative step size)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """β₁ (0: no momentum) and the constant β₂ of the factored second moment (bias-corrected)."""
    eps: float = 1e-30
    """Floor under mean(r) and √V̂ (Adafactor's ε₁)."""
    clip_threshold: float = 1.0
    """d in Û = U / max(1, RMS(U)/d) (Adafactor's update clipping)."""
    weight_decay: float = 0.0
    """Decoupled weight decay λ."""
    svd_every: int = 200
    """Refresh period T of the SVD basis (steps 1, T+1, …)."""
    two_sided: bool = False
    """Rotate by both singular bases (AdafacDiag++) instead of the smaller side's only."""
    project_moments: bool = False
    """Move M, r, c into the new basis at a refresh (False: carry them over, as Algorithm 2 does)."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, self.lr >= 0, ">= 0 (0 lets a scheduler warm up from zero)")
        check_range("betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                    "two values in [0, 1) (beta1 = 0: without momentum)")
        check_range("eps", self.eps, self.eps >= 0, ">= 0")
        check_range("clip_threshold", self.clip_threshold, self.clip_threshold > 0, "> 0")
        check_range("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        check_range("svd_every", self.svd_every, isinstance(self.svd_every, int) and self.svd_every >= 1,
                    "an integer >= 1")


class AdafacDiag(PrecondOptimizer):
    """Adafactor (factored second moment, optional momentum, update clipping) in the gradient's SVD basis."""

    Config = Config

    def _step_group(self, group: dict[str, Any], c: Config) -> None:
        beta1, beta2 = c.betas
        for p in self._params_with_grad(group):
            state = self.state[p]
            rot = svd_basis.rotate_in(p, state, two_sided=c.two_sided, every=c.svd_every,
                                      project_moments=c.project_moments)
            cd, g_rot, t = rot.grad.dtype, rot.grad, rot.step
            if rot.fresh:
                state["row"], state["col"] = factored.zeros(g_rot.shape, dtype=p.dtype, device=p.device)
                if beta1 > 0:
                    state["exp_avg"] = torch.zeros(g_rot.shape, dtype=p.dtype, device=p.device)
            if rot.moves is not None:
                r_left, r_right = rot.moves
                state["row"].copy_((r_left * r_left) @ state["row"].to(cd))
                if r_right is not None:
                    state["col"].copy_(state["col"].to(cd) @ (r_right * r_right))
                if "exp_avg" in state:
                    state["exp_avg"].copy_(svd_basis.project_linear(state["exp_avg"].to(cd), r_left, r_right))
            # Adafactor in the basis.
            row, col = state["row"].to(cd), state["col"].to(cd)
            factored.update_(row, col, g_rot, 1 - beta2)
            numerator = g_rot
            if beta1 > 0:
                exp_avg = state["exp_avg"].to(cd)
                lerp_(exp_avg, g_rot, 1 - beta1)
                if exp_avg is not state["exp_avg"]:
                    state["exp_avg"].copy_(exp_avg)
                numerator = exp_avg / (1 - beta1**t)
            if row is not state["row"]:
                state["row"].copy_(row)
                state["col"].copy_(col)
            update = factored.precondition(numerator, row, col, c.eps, bias_correction=1 - beta2**t)
            update.div_(max(1.0, factored.rms(update) / c.clip_threshold))
            rot.apply_(p, update, c.lr, c.weight_decay)


def state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: Config, info: Any = None) -> int:
    """(m + n [+ m·n] + m² [+ n²])·itemsize with m ≤ n: r, c [, M with momentum], P [, Q two-sided]."""
    m, n = svd_basis.oriented_shape(shape)
    elements = m + n + (m * n if config.betas[0] > 0 else 0) + m * m + (n * n if config.two_sided else 0)
    return elements * itemsize(dtype)


def step_flops(shape: tuple[int, ...], config: Config) -> StepFlops:
    """Rotation in and out every step; at a refresh the SVD (Golub & Van Loan counts, see
    :func:`.kernels.svd_basis.svd_flops`) and, with ``project_moments``, the projection matmuls (transitions,
    M, and the row [and column] statistics as (m×m)(m×1) [and (1×n)(n×n)] products)."""
    m, n = svd_basis.oriented_shape(shape)
    refresh_matmul = 0
    if config.project_moments:
        refresh_matmul = (svd_basis.projection_flops(m, n, config.two_sided, 1 if config.betas[0] > 0 else 0)
                          + 2 * m * m + (2 * n * n if config.two_sided else 0))
    return StepFlops(matmul=svd_basis.rotation_flops(m, n, config.two_sided), refresh_matmul=refresh_matmul,
                     refresh_other=svd_basis.svd_flops(m, n, config.two_sided), every=config.svd_every)


def search_space(trial: Any, base: Config | None = None) -> Config:
    """lr (log, around the transferred AdamW lr), β1 ∈ [0.8, 0.98] (kept 0 when the base has no momentum),
    β2 ∈ [0.9, 0.9995] (as 1−β, log), T ∈ [20, 1000] (log), weight decay ∈ [0, 0.2]."""
    lr = _space.suggest_lr(trial, Config.lr, base, low=1e-4, high=3e-2)
    momentum = base is None or base.betas[0] > 0
    b1 = _space.suggest_beta(trial, "beta1", 0.8, 0.98) if momentum else 0.0
    b2 = _space.suggest_beta(trial, "beta2", 0.9, 0.9995)
    every = trial.suggest_int("svd_every", 20, 1000, log=True)
    wd = trial.suggest_float("weight_decay", 0.0, 0.2)
    keep = {k: getattr(base, k) for k in ("eps", "clip_threshold", "two_sided", "project_moments")} if base else {}
    return Config(lr=lr, betas=(b1, b2), svd_every=every, weight_decay=wd, **keep)


def from_adamw(*, lr: float, betas: tuple[float, float] = Config.betas, weight_decay: float = 0.0,
               **_: Any) -> Transfer:
    """Identity on lr, betas and weight decay: the paper runs AdafacDiag with Adam's β and Adam's lr grid
    (App. C: one (β1, β2) for all optimizers; Table 5 compares at Adam's settings); eps keeps Adafactor's ε₁."""
    return Transfer(Config(lr=lr, betas=tuple(betas), weight_decay=weight_decay),
                    "identity (lr, betas, weight decay from AdamW; eps is Adafactor's ε₁)",
                    f"{PAPER}; App. C: Adam's β and lr grid shared by all optimizers")


SPEC = OptimizerSpec(
    name="adafac-diag", family="rotated factored (Adafactor in the gradient's SVD basis)", paper=PAPER,
    config_cls=Config, optimizer_cls=AdafacDiag, state_bytes=state_bytes, step_flops=step_flops,
    search_space=search_space, from_adamw=from_adamw,
    state_formula="m + n + min(m,n)² [+ m·n with momentum] (r, c, P [, M]); two_sided: + max(m,n)²",
    refresh_knobs=("svd_every",), every_step_refresh={"svd_every": 1}, roles=MATRIX_ROLES, aliases=("adafacdiag",),
)
