"""Hfac and HfacDiag: rank-1 factored first *and* second moments (H-Fac, Nguyen et al., arXiv 2406.09958;
HfacDiag: the same in the gradient's SVD basis, arXiv 2502.07488, App. A.2, Alg. 3).

For an m×n matrix gradient G (rotated first for HfacDiag: G̃ = Pᵀ G [Q]), with time-corrected decays
β̂ₖₜ = βₖ(1 − βₖᵗ⁻¹)/(1 − βₖᵗ) (EMAs that need no bias correction; β̂ₖ₁ = 0):
  u ← β̂₁u + (1−β̂₁)·G1/n,   v ← β̂₁v + (1−β̂₁)·1ᵀG/m          (row / column means: the factored momentum)
  r ← β̂₂r + (1−β̂₂)·G²1/n,  s ← β̂₂s + (1−β̂₂)·1ᵀG²/m         (row / column mean squares)
  V̂ = r sᵀ / mean(r)                                            (Adafactor's rank-1 second moment)
  φ = β̂₁(u − G1/n)/√r,  ψ = β̂₁(v − 1ᵀG/m)/√s                (momentum scaled by its own factor)
  W ← W·(1 − η·λ) − η·[P]( ½(φ1ᵀ + 1ψᵀ) + clip(G / √V̂) )[Qᵀ],  clip(U) = U / max(1, RMS(U)/d).
Hfac's normalisation: the factored momentum is divided by the matching factored second moment (u by r, v by
s) while the current gradient is divided by the full rank-1 V̂ — unlike Adafactor, which divides one full
momentum by V̂ (arXiv 2502.07488, App. A.2). ε is placed as :mod:`.kernels.factored` places it (a floor under
mean(r) and √V̂, as ``torch.optim.Adafactor`` does) rather than added to G² inside the statistics.

Sources. The H-Fac paper's algorithm could not be read here beyond its abstract (arXiv 2406.09958: rank-1
parameterisation of both the momentum and the scaling), App. A.2 of arXiv 2502.07488 (the normalisation above) and
Table 3 there (the memory, reproduced by tests/test_memory_table3.py); no public code by the authors was found. A
third-party transcription of H-Fac's update (github.com/junaidaliop/zij, canon/math/hfac.md) agrees with every
line above: u, v as EMAs of row/column means, r, s of row/column sums of G² (the same V̂ and the same √(r/n),
√(s/m) as the means used here), time-corrected β̂₁, β̂₂ with β̂₁ also scaling φ, ψ, the ½ on φ + ψ, the clipped
G/√V̂ and decoupled decay. Its one difference is ε, added to G² inside r, s there; the floor here is precondtune's
documented choice (with ε = 1e-30 the two agree to float32 rounding unless squared gradients come within a few
orders of ε, e.g. all-zero rows or columns). The defaults β = (0.9, 0.999), d = 1, ε = 1e-30 and, for HfacDiag,
T = 200 are precondtune's choices, not values read from either paper.

Matrix roles only; the rest go to AdamW by default (the paper's memory table counts them at Adam's 2·n).
State per matrix: u, r (m each) and v, s (n each) in the parameter dtype; HfacDiag adds P (min(m,n)²) or,
``two_sided``, P and Q (m² + n²). Bases refresh every ``svd_every`` steps; moments are carried over, as
Algorithm 3 does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..dtypes import itemsize
from . import _space
from .kernels import factored, svd_basis
from .registry import MATRIX_ROLES, OptimizerSpec, PrecondOptimizer, StepFlops, Transfer, check_range

PAPER = "Nguyen, Chen, Liu & Liu 2024, arXiv 2406.09958 (H-Fac)"
PAPER_DIAG = "Nguyen, Liu, Chen & Liu 2025, arXiv 2502.07488, App. A.2 (HfacDiag)"


@dataclass(frozen=True, kw_only=True)
class Config:
    """Hfac hyperparameters: torch's Adam β and lr scale (arXiv 2502.07488, App. C, shares one β setting across
    all its optimizers, Hfac included; the values were not legible)."""

    lr: float = 1e-3
    """Learning rate η."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Decays of the factored first and second moments (time-corrected, see the module docstring)."""
    eps: float = 1e-30
    """Floor under mean(r) and √V̂ (Adafactor's ε₁, 1e-30: only guards all-zero rows/columns)."""
    clip_threshold: float = 1.0
    """d in clip(U) = U / max(1, RMS(U)/d) (Adafactor's update clipping)."""
    weight_decay: float = 0.0
    """Decoupled weight decay λ."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, self.lr >= 0, ">= 0 (0 lets a scheduler warm up from zero)")
        check_range("betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                    "two values in [0, 1)")
        check_range("eps", self.eps, self.eps >= 0, ">= 0")
        check_range("clip_threshold", self.clip_threshold, self.clip_threshold > 0, "> 0")
        check_range("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")


@dataclass(frozen=True, kw_only=True)
class DiagConfig(Config):
    """HfacDiag: Hfac's hyperparameters plus the basis refresh."""

    svd_every: int = 200
    """Refresh period T of the SVD basis (steps 1, T+1, …), as AdaDiag."""
    two_sided: bool = False
    """Rotate by both singular bases (the "++" variant) instead of the smaller side's only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("svd_every", self.svd_every, isinstance(self.svd_every, int) and self.svd_every >= 1,
                    "an integer >= 1")


def time_corrected(beta: float, t: int) -> float:
    """β̂ₜ = β(1 − βᵗ⁻¹)/(1 − βᵗ): an EMA with this decay equals Adam's bias-corrected EMA."""
    return beta * (1 - beta ** (t - 1)) / (1 - beta**t) if beta > 0 else 0.0


def hfac_direction(g: Tensor, state: dict[str, Any], t: int, c: Config) -> Tensor:
    """One Hfac step on the (possibly rotated) m×n gradient ``g``: updates u, v, r, s in ``state`` (in ``g``'s
    dtype, written back to the state dtype) and returns ½(φ1ᵀ + 1ψᵀ) + clip(G/√V̂)."""
    b1, b2 = time_corrected(c.betas[0], t), time_corrected(c.betas[1], t)
    u, v = state["u"].to(g.dtype), state["v"].to(g.dtype)
    row, col = state["r"].to(g.dtype), state["s"].to(g.dtype)
    g_row, g_col = g.mean(dim=-1, keepdim=True), g.mean(dim=-2, keepdim=True)
    u.lerp_(g_row, 1 - b1)
    v.lerp_(g_col, 1 - b1)
    factored.update_(row, col, g, 1 - b2)
    for key, x in (("u", u), ("v", v), ("r", row), ("s", col)):
        if state[key] is not x:
            state[key].copy_(x)
    scaled = factored.precondition(g, row, col, c.eps)
    denom = max(1.0, factored.rms(scaled) / c.clip_threshold)
    tiny = factored.floor(c.eps, g.dtype)
    phi = (u - g_row).div_(row.sqrt().clamp_(min=tiny))
    psi = (v - g_col).div_(col.sqrt().clamp_(min=tiny))
    return (phi + psi).mul_(0.5 * b1).add_(scaled, alpha=1 / denom)


def _init_factors(state: dict[str, Any], m: int, n: int, dtype: torch.dtype, device: torch.device) -> None:
    for key, shape in (("u", (m, 1)), ("v", (1, n)), ("r", (m, 1)), ("s", (1, n))):
        state[key] = torch.zeros(shape, dtype=dtype, device=device)


class Hfac(PrecondOptimizer):
    """H-Fac on matrix parameters (conv kernels flattened to (out, in·k…))."""

    Config = Config

    def _step_group(self, group: dict[str, Any], c: Config) -> None:
        for p in self._params_with_grad(group):
            state = self.state[p]
            g = p.grad.reshape(p.shape[0], -1).to(svd_basis.compute_dtype(p.dtype))
            if not state:
                state["step"] = 0
                _init_factors(state, *g.shape, p.dtype, p.device)
            state["step"] += 1
            update = hfac_direction(g, state, state["step"], c)
            if c.weight_decay:
                p.mul_(1 - c.lr * c.weight_decay)
            p.add_(update.reshape(p.shape).to(p.dtype), alpha=-c.lr)


class HfacDiag(PrecondOptimizer):
    """HfacDiag: H-Fac on the gradient rotated into its singular basis (refreshed every ``svd_every`` steps)."""

    Config = DiagConfig

    def _step_group(self, group: dict[str, Any], c: DiagConfig) -> None:
        for p in self._params_with_grad(group):
            state = self.state[p]
            rot = svd_basis.rotate_in(p, state, two_sided=c.two_sided, every=c.svd_every)
            if rot.fresh:
                _init_factors(state, *rot.grad.shape, p.dtype, p.device)
            # H-Fac in the basis.
            rot.apply_(p, hfac_direction(rot.grad, state, rot.step, c), c.lr, c.weight_decay)


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    cols = 1
    for s in shape[1:]:
        cols *= s
    return shape[0], cols


def state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: Config, info: Any = None) -> int:
    """2·(m + n)·itemsize: u, r (m) and v, s (n) (the step is a Python int)."""
    m, n = _matrix(shape)
    return 2 * (m + n) * itemsize(dtype)


def diag_state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: DiagConfig, info: Any = None) -> int:
    """(2·(m + n) + m² [+ n²])·itemsize with m ≤ n: the factors plus P [and Q]."""
    m, n = svd_basis.oriented_shape(shape)
    return (2 * (m + n) + m * m + (n * n if config.two_sided else 0)) * itemsize(dtype)


def step_flops(shape: tuple[int, ...], config: Config) -> StepFlops:
    """Means, squares and a rank-1 broadcast only: no matmul FLOPs."""
    return StepFlops()


def diag_step_flops(shape: tuple[int, ...], config: DiagConfig) -> StepFlops:
    """Rotation in and out every step; the SVD at a refresh (Golub & Van Loan counts, see
    :func:`.kernels.svd_basis.svd_flops`)."""
    m, n = svd_basis.oriented_shape(shape)
    return StepFlops(matmul=svd_basis.rotation_flops(m, n, config.two_sided),
                     refresh_other=svd_basis.svd_flops(m, n, config.two_sided), every=config.svd_every)


def _common_space(trial: Any, base: Config | None) -> dict[str, Any]:
    return {
        "lr": _space.suggest_lr(trial, Config.lr, base, low=1e-4, high=3e-2),
        "betas": (_space.suggest_beta(trial, "beta1", 0.8, 0.98), _space.suggest_beta(trial, "beta2", 0.9, 0.9995)),
        "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.2),
        "eps": base.eps if base else Config.eps,
        "clip_threshold": base.clip_threshold if base else Config.clip_threshold,
    }


def search_space(trial: Any, base: Config | None = None) -> Config:
    """lr (log, around the transferred AdamW lr), β1 ∈ [0.8, 0.98], β2 ∈ [0.9, 0.9995] (as 1−β, log), weight
    decay ∈ [0, 0.2]."""
    return Config(**_common_space(trial, base))


def diag_search_space(trial: Any, base: DiagConfig | None = None) -> DiagConfig:
    """Hfac's space plus the refresh period T ∈ [20, 1000] (log), as AdaDiag."""
    return DiagConfig(**_common_space(trial, base), svd_every=trial.suggest_int("svd_every", 20, 1000, log=True),
                      two_sided=getattr(base, "two_sided", False))


def from_adamw(*, lr: float, betas: tuple[float, float] = Config.betas, weight_decay: float = 0.0,
               **_: Any) -> Transfer:
    """Identity on lr, betas and weight decay: both papers run Hfac with Adam's β and the lr grid tuned for Adam
    (2502.07488 App. C: one (β1, β2) for all optimizers); eps keeps Hfac's own floor (a different role)."""
    return Transfer(Config(lr=lr, betas=tuple(betas), weight_decay=weight_decay),
                    "identity (lr, betas, weight decay from AdamW; eps is Hfac's own)",
                    f"{PAPER_DIAG}, App. C: Adam's β and lr grid shared by all optimizers")


def diag_from_adamw(*, lr: float, betas: tuple[float, float] = Config.betas, weight_decay: float = 0.0,
                    **_: Any) -> Transfer:
    """As :func:`from_adamw`, with the default refresh period."""
    base = from_adamw(lr=lr, betas=betas, weight_decay=weight_decay)
    return Transfer(DiagConfig(lr=lr, betas=tuple(betas), weight_decay=weight_decay), base.rule, base.source)


SPEC = OptimizerSpec(
    name="hfac", family="factored (rank-1 first and second moments)", paper=PAPER,
    config_cls=Config, optimizer_cls=Hfac, state_bytes=state_bytes, step_flops=step_flops,
    search_space=search_space, from_adamw=from_adamw, state_formula="2·(m + n) (u, v, r, s)", roles=MATRIX_ROLES,
)

SPEC_DIAG = OptimizerSpec(
    name="hfac-diag", family="rotated factored (Hfac in the gradient's SVD basis)", paper=PAPER_DIAG,
    config_cls=DiagConfig, optimizer_cls=HfacDiag, state_bytes=diag_state_bytes, step_flops=diag_step_flops,
    search_space=diag_search_space, from_adamw=diag_from_adamw,
    state_formula="2·(m + n) + min(m,n)² (u, v, r, s, P); two_sided: + max(m,n)²", refresh_knobs=("svd_every",),
    every_step_refresh={"svd_every": 1},
    roles=MATRIX_ROLES,
)
