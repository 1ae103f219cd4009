"""AdaDiag and AdaDiag++: Adam run in the basis of the gradient's SVD (Nguyen et al., arXiv 2502.07488, Alg. 1).

Every T steps (and on the first): P, Σ, Qᵀ = svd(G_t, full_matrices=True); between refreshes P, Q are kept.
G̃ = Pᵀ G (AdaDiag, one-sided) or Pᵀ G Q (AdaDiag++, two-sided);
M ← β1·M + (1−β1)·G̃;  V ← β2·V + (1−β2)·G̃²;  W ← W·(1 − η·λ) − η · P (M̂ / (√V̂ + ε)) [Qᵀ],
with Adam's bias corrections M̂ = M/(1−β1ᵗ), V̂ = V/(1−β2ᵗ). A tall matrix is rotated as its transpose, so the
one-sided basis is always the smaller side's (min(m, n)² extra elements). Matrix roles only; embeddings, the head
and vectors go to AdamW by default, as in the paper's LLaMA runs (GaLore's code base: only attention/MLP
matrices are rotated).

State per matrix (state dtype = parameter dtype): P (m×m), Q (n×n, AdaDiag++ only), M and V (m×n each).
At a refresh the moments are carried over unchanged, as Algorithm 1 does; ``project_moments=True`` moves them
into the new basis instead (see :mod:`.kernels.svd_basis`).

Checked against the paper (arXiv 2502.07488 as extracted in source document 004, whose formulas lost their
symbols; no public code by the authors was found): the SVD of the gradient with ``full_matrices=True`` every T
steps (§3.3), Pᵀ G / Pᵀ G Q with the update rotated back (§3.2, eqs. 7–9), an EMA of the rotated gradient
accumulated before preconditioning (§3.3), Adam's bias corrections (App. C: "decay moment coefficients along
with the bias-correction steps"), moments carried across refreshes (§4 analyses "momentum estimates
accumulated across previous subspaces"; no projection step is described). The smaller side for the one-sided
basis is fixed by the paper's Table 3: LLaMA-60M (d 512, f 1376, 8 layers, bf16) has Adam 0.23G, AdaDiag
0.26G, AdaDiag++ 0.36G; the smaller-side basis gives 0.256G and both bases 0.361G, while a larger-side basis
would give 0.332G (tests/test_memory_table3.py reproduces all four sizes). A third-party transcription of
Algorithm 1 (github.com/junaidaliop/zij, canon/math/adadiag.md) agrees with the update above. NOT from the
paper (its values were lost in extraction): the defaults β = (0.9, 0.999) and ε = 1e-8 (Adam's, which App. C
says all optimizers share), T = 200 (GaLore's update_proj_gap; the paper uses one T for image and another for
language tasks), weight decay 0 — precondtune's documented choices.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import itemsize
from . import _space
from .kernels import adam, svd_basis
from .registry import MATRIX_ROLES, OptimizerSpec, PrecondOptimizer, StepFlops, Transfer, check_range

PAPER = "Nguyen, Liu, Chen & Liu 2025, arXiv 2502.07488"


@dataclass(frozen=True, kw_only=True)
class Config:
    """AdaDiag / AdaDiag++ hyperparameters: torch's Adam defaults (App. C of the paper uses one β and ε for all
    optimizers; the values themselves were not legible)."""

    lr: float = 1e-3
    """Learning rate η."""
    betas: tuple[float, float] = (0.9, 0.999)
    """EMA coefficients of the rotated gradient and of its square."""
    eps: float = 1e-8
    """Added to √V̂ in the denominator."""
    weight_decay: float = 0.0
    """Decoupled weight decay λ (0 in the GaLore LLaMA/C4 recipe the paper's language runs follow)."""
    svd_every: int = 200
    """Refresh period T: the SVD basis is recomputed on steps 1, T+1, 2T+1, … (200: GaLore's update_proj_gap, a
    precondtune choice; the paper's values were not legible)."""
    project_moments: bool = False
    """Move M and V into the new basis at a refresh (False: carry them over unchanged, as Algorithm 1 does)."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, self.lr >= 0, ">= 0 (0 lets a scheduler warm up from zero)")
        check_range("betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                    "two values in [0, 1)")
        check_range("eps", self.eps, self.eps >= 0, ">= 0")
        check_range("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        check_range("svd_every", self.svd_every, isinstance(self.svd_every, int) and self.svd_every >= 1,
                    "an integer >= 1")


class AdaDiag(PrecondOptimizer):
    """AdaDiag (one-sided): Adam in the gradient's left singular basis."""

    Config = Config
    two_sided = False

    def _step_group(self, group: dict[str, Any], c: Config) -> None:
        beta1, beta2 = c.betas
        for p in self._params_with_grad(group):
            state = self.state[p]
            rot = svd_basis.rotate_in(p, state, two_sided=self.two_sided, every=c.svd_every,
                                      project_moments=c.project_moments)
            cd = rot.grad.dtype
            if rot.fresh:
                state["exp_avg"] = torch.zeros(rot.grad.shape, dtype=p.dtype, device=p.device)
                state["exp_avg_sq"] = torch.zeros(rot.grad.shape, dtype=p.dtype, device=p.device)
            if rot.moves is not None:
                state["exp_avg"].copy_(svd_basis.project_linear(state["exp_avg"].to(cd), *rot.moves))
                state["exp_avg_sq"].copy_(svd_basis.project_diagonal(state["exp_avg_sq"].to(cd), *rot.moves))
            # Adam in the basis.
            exp_avg, exp_avg_sq = state["exp_avg"].to(cd), state["exp_avg_sq"].to(cd)
            adam.update_moments_(exp_avg, exp_avg_sq, rot.grad, beta1, beta2)
            if exp_avg.dtype != p.dtype:
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
            rot.apply_(p, adam.direction(exp_avg, exp_avg_sq, rot.step, beta1, beta2, c.eps), c.lr, c.weight_decay)


class AdaDiagPP(AdaDiag):
    """AdaDiag++ (two-sided): Adam in the gradient's left and right singular bases."""

    two_sided = True


def state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: Config, info: Any = None, *,
                two_sided: bool = False) -> int:
    """(m² [+ n²] + 2·m·n)·itemsize with m ≤ n: P [and Q] plus the two moments (the step is a Python int)."""
    m, n = svd_basis.oriented_shape(shape)
    elements = m * m + (n * n if two_sided else 0) + 2 * m * n
    return elements * itemsize(dtype)


def step_flops(shape: tuple[int, ...], config: Config, *, two_sided: bool = False) -> StepFlops:
    """Rotation in and out every step (4·m²·n [+ 4·m·n²]); at a refresh the SVD (Golub & Van Loan counts, see
    :func:`.kernels.svd_basis.svd_flops`) and, with ``project_moments``, the moment projection matmuls."""
    m, n = svd_basis.oriented_shape(shape)
    return StepFlops(
        matmul=svd_basis.rotation_flops(m, n, two_sided),
        refresh_matmul=svd_basis.projection_flops(m, n, two_sided, 2) if config.project_moments else 0,
        refresh_other=svd_basis.svd_flops(m, n, two_sided),
        every=config.svd_every,
    )


def search_space(trial: Any, base: Config | None = None) -> Config:
    """lr (log, around the transferred AdamW lr), β1 ∈ [0.8, 0.98], β2 ∈ [0.9, 0.9995] (as 1−β, log), T ∈ [20, 1000]
    (log; the paper's ablation, Fig. 7, finds a few hundred best and T ≤ 10 harmful), weight decay ∈ [0, 0.2]."""
    lr = _space.suggest_lr(trial, Config.lr, base, low=1e-4, high=3e-2)
    b1 = _space.suggest_beta(trial, "beta1", 0.8, 0.98)
    b2 = _space.suggest_beta(trial, "beta2", 0.9, 0.9995)
    every = trial.suggest_int("svd_every", 20, 1000, log=True)
    wd = trial.suggest_float("weight_decay", 0.0, 0.2)
    return Config(lr=lr, betas=(b1, b2), svd_every=every, weight_decay=wd, eps=base.eps if base else Config.eps,
                  project_moments=base.project_moments if base else Config.project_moments)


def from_adamw(*, lr: float, betas: tuple[float, float] = Config.betas, eps: float = Config.eps,
               weight_decay: float = Config.weight_decay, **_: Any) -> Transfer:
    """Identity: the paper tunes AdaDiag over the same lr grid as Adam and picks the same values (Table 6,
    App. C: one setting of β, ε and lr per model size shared by Adam and AdaDiag)."""
    return Transfer(Config(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                    "identity (lr, betas, eps, weight decay from AdamW)",
                    f"{PAPER}, App. C / Table 6: Adam's settings reused")


SPEC = OptimizerSpec(
    name="adadiag", family="rotated diagonal (Adam in the gradient's SVD basis)", paper=PAPER,
    config_cls=Config, optimizer_cls=AdaDiag, state_bytes=state_bytes, step_flops=step_flops,
    search_space=search_space, from_adamw=from_adamw,
    state_formula="min(m,n)² + 2·m·n (P, M, V)", refresh_knobs=("svd_every",), roles=MATRIX_ROLES,
    every_step_refresh={"svd_every": 1},
    notes="one-sided; SVD every svd_every steps",
)

SPEC_PP = OptimizerSpec(
    name="adadiag-pp", family="rotated diagonal (Adam in the gradient's SVD basis)", paper=PAPER,
    config_cls=Config, optimizer_cls=AdaDiagPP, state_bytes=functools.partial(state_bytes, two_sided=True),
    step_flops=functools.partial(step_flops, two_sided=True), search_space=search_space, from_adamw=from_adamw,
    state_formula="m² + n² + 2·m·n (P, Q, M, V)", refresh_knobs=("svd_every",), roles=MATRIX_ROLES,
    every_step_refresh={"svd_every": 1},
    aliases=("adadiag++",), notes="two-sided; full SVD every svd_every steps",
)
