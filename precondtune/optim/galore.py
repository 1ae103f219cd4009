"""GaLore: Adam on a rank-r projection of each matrix gradient (Zhao et al., arXiv 2403.03507, Algorithm 2).

For a gradient G ∈ ℝ^{m×n}, every ``update_proj_gap`` steps (at t = 1, 1+T, 1+2T, … as the official code's
``iter % T == 0`` on a 0-based counter) the projector is refreshed from the thin SVD G = U·S·Vᵀ:

    m ≥ n:  P = V[:, :r]ᵀ ∈ ℝ^{r×n},  R = G·Pᵀ ∈ ℝ^{m×r},  back: α·N·P
    m < n:  P = U[:, :r]   ∈ ℝ^{m×r},  R = Pᵀ·G ∈ ℝ^{r×n},  back: α·P·N

(the projector side is chosen so that the moments have the smaller shape: the paper's "std" projection),
and Adam runs on R: N = m̂ / (√v̂ + ε) (:func:`kernels.adam.direction`), W ← W·(1 − lr·wd) − lr·α·(back-
projected N). The moments are kept as they are when the projector changes (as the official code does).
r is capped at min(m, n). The projector is a state tensor (counted and checkpointed) in the parameter's
dtype; the SVD runs in float32.

Differences from pytorch-optimizer's GaLore, used as a test reference: that one applies the weight decay
after the update and places ε outside the √(1−β2ᵗ) correction; with wd = 0 and a tiny ε they agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..dtypes import itemsize
from . import _space
from .kernels import adam, add_scaled_
from .registry import OptimizerSpec, PrecondOptimizer, StepFlops, Transfer, check_range

SVD_FLOPS_MN2 = 6
SVD_FLOPS_N3 = 20
"""Thin SVD of an m×n matrix (m ≥ n) with U₁, Σ and V by the R-SVD: 6·m·n² + 20·n³ flops
(Golub & Van Loan, Matrix Computations, 3rd ed., §5.4.5, Figure 5.4.1)."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """GaLore hyperparameters; defaults are the paper's pre-training settings (Sec. 5.1 / App. C)."""

    lr: float = 1e-2
    """Learning rate (paper: 0.01 for LLaMA pre-training; matrices effectively move at lr·α)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's EMA coefficients of the projected gradient and its square."""
    eps: float = 1e-6
    """Added to √v̂ (the official code's AdamW default)."""
    weight_decay: float = 0.0
    """Decoupled weight decay W ← W·(1 − lr·wd)."""
    rank: int = 128
    """Projection rank r (capped at min(m, n))."""
    update_proj_gap: int = 200
    """Steps between projector refreshes (paper's T = 200)."""
    scale: float = 0.25
    """α: the back-projected update is multiplied by it (paper: 0.25)."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, self.lr >= 0, ">= 0 (0 lets a scheduler warm up from zero)")
        check_range("betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                    "two values in [0, 1)")
        check_range("eps", self.eps, self.eps >= 0, ">= 0")
        check_range("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        check_range("rank", self.rank, isinstance(self.rank, int) and self.rank >= 1, "an integer >= 1")
        check_range("update_proj_gap", self.update_proj_gap,
                    isinstance(self.update_proj_gap, int) and self.update_proj_gap >= 1, "an integer >= 1")
        check_range("scale", self.scale, self.scale > 0, "> 0")


def _layout(shape: tuple[int, ...], rank: int) -> tuple[int, int, int, bool]:
    """(m, n, r, right): ``right`` when m ≥ n (project G·Pᵀ with P ∈ ℝ^{r×n})."""
    m, n = shape
    return m, n, min(rank, m, n), m >= n


def projector(grad: Tensor, rank: int, dtype: torch.dtype) -> Tensor:
    """The rank-r projector from the thin SVD of ``grad`` (float32), in ``dtype``."""
    *_, r, right = _layout(tuple(grad.shape), rank)
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return (vh[:r] if right else u[:, :r]).to(dtype).contiguous()


def project(grad: Tensor, proj: Tensor, right: bool) -> Tensor:
    """R = G·Pᵀ (right, P ∈ ℝ^{r×n}) or Pᵀ·G (left, P ∈ ℝ^{m×r})."""
    return grad @ proj.mT if right else proj.mT @ grad


def project_back(low: Tensor, proj: Tensor, right: bool) -> Tensor:
    """N·P (right) or P·N (left)."""
    return low @ proj if right else proj @ low


class GaLore(PrecondOptimizer):
    """GaLore for 2-D parameters (``matrix`` role); other shapes are routed to AdamW by default."""

    Config = Config

    def __init__(self, params: Any, **hyperparameters: Any) -> None:
        super().__init__(params, **hyperparameters)
        self._refuse_shapes("galore", lambda p: p.dim() == 2, "2-D parameters only")

    def _step_group(self, group: dict[str, Any], c: Config) -> None:
        for p in self._params_with_grad(group):
            grad = p.grad
            _, _, r, right = _layout(tuple(p.shape), c.rank)
            state = self.state[p]
            if not state:
                state["step"] = 0
                low_shape = (p.shape[0], r) if right else (r, p.shape[1])
                state["exp_avg"] = torch.zeros(low_shape, dtype=p.dtype, device=p.device)
                state["exp_avg_sq"] = torch.zeros(low_shape, dtype=p.dtype, device=p.device)
                state["projector"] = torch.zeros((r, p.shape[1]) if right else (p.shape[0], r), dtype=p.dtype,
                                                 device=p.device)
            if state["step"] % c.update_proj_gap == 0:
                state["projector"].copy_(projector(grad, c.rank, p.dtype))
            state["step"] += 1
            proj = state["projector"]
            low = project(grad, proj, right)
            adam.update_moments_(state["exp_avg"], state["exp_avg_sq"], low, *c.betas)
            direction = adam.direction(state["exp_avg"], state["exp_avg_sq"], state["step"], *c.betas, c.eps)
            adam.decay_(p, c.lr, c.weight_decay)
            add_scaled_(p, project_back(direction, proj, right), -c.lr * c.scale)


def state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: Config, info: Any = None) -> int:
    """Two projected moments (m×r or r×n) and the projector (r×n or m×r): (2·|R| + |P|)·itemsize."""
    m, n, r, right = _layout(tuple(shape), config.rank)
    low = m * r if right else r * n
    proj = r * n if right else m * r
    return (2 * low + proj) * itemsize(dtype)


def step_flops(shape: tuple[int, ...], config: Config) -> StepFlops:
    """Project and project back: 2·(2·m·n·r) matmul FLOPs per step; the SVD every T steps by R-SVD counts."""
    m, n, r, _ = _layout(tuple(shape), config.rank)
    big, small = max(m, n), min(m, n)
    svd = SVD_FLOPS_MN2 * big * small * small + SVD_FLOPS_N3 * small**3
    return StepFlops(matmul=4 * m * n * r, refresh_other=svd, every=config.update_proj_gap)


def search_space(trial: Any, base: Config | None = None) -> Config:
    """lr (log, around base), rank ∈ {32, 64, 128, 256}, T ∈ {50, 100, 200, 500}, α ∈ [0.1, 1] (log)."""
    b = base or Config()
    lr = _space.suggest_lr(trial, Config.lr, base, low=1e-3, high=5e-2)
    rank = trial.suggest_categorical("rank", [32, 64, 128, 256])
    gap = trial.suggest_categorical("update_proj_gap", [50, 100, 200, 500])
    scale = trial.suggest_float("scale", 0.1, 1.0, log=True)
    return Config(lr=lr, betas=b.betas, eps=b.eps, weight_decay=b.weight_decay, rank=rank, update_proj_gap=gap,
                  scale=scale)


def from_adamw(*, lr: float, betas: tuple[float, float] = Config.betas, eps: float = Config.eps,
               weight_decay: float = Config.weight_decay, **_: Any) -> Transfer:
    """AdamW's lr, betas, eps and weight decay; α = 0.25, rank 128, T = 200 (the paper's fixed choices)."""
    config = Config(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    return Transfer(config, "lr, betas, eps, weight_decay = AdamW's; scale α = 0.25, rank = 128, gap = 200",
                    "GaLore, arXiv 2403.03507, Sec. 5 and App. C: the same α = 0.25 and T = 200 for every model "
                    "size, α acting as a fractional learning rate on the projected modules")


SPEC = OptimizerSpec(
    name="galore", family="low-rank projection (Adam)", paper="Zhao et al. 2024, arXiv 2403.03507",
    config_cls=Config, optimizer_cls=GaLore, state_bytes=state_bytes, step_flops=step_flops,
    search_space=search_space, from_adamw=from_adamw,
    state_formula="2·m·r + n·r (m ≥ n; else 2·n·r + m·r)", refresh_knobs=("update_proj_gap",),
    every_step_refresh={"update_proj_gap": 1},
    roles=frozenset({"matrix"}),
    notes="matrix role only (the paper projects attention and MLP weights); embeddings, head, vectors, "
          "convs go to AdamW",
)
