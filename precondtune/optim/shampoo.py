"""Shampoo: Kronecker-factored preconditioning with Adam grafting (Gupta, Koren & Singer, arXiv 1802.09568;
Anil et al., arXiv 2002.09018; Shi et al., arXiv 2309.06497 for the grafting and defaults).

For a parameter of order k with gradient G (a matrix: k = 2), along every preconditioned mode i:

    H_i ← β₂·H_i + (1−β₂)·G₍ᵢ₎G₍ᵢ₎ᵀ   (β₂ = 1: H_i ← H_i + G₍ᵢ₎G₍ᵢ₎ᵀ, the sum of Algorithm 1)
    P_i = (Ĥ_i + εI)^{-1/(2k)}        (refreshed every ``precondition_frequency`` steps; −1/4 for matrices)
    D = M̂ ×₁ P₁ … ×_k P_k           (matrix: L^{-1/4}·M̂·R^{-1/4})

with M̂ the bias-corrected EMA of G (β₁ = 0: M̂ = G) and Ĥ_i = H_i/(1−β₂ᵗ) for β₂ < 1. With grafting (on by
default, as distributed_shampoo's ``AdamGraftingConfig``) D is rescaled to the norm of Adam's direction
A = M̂/(√v̂ + ε_g) from its own second moment v: D ← D·‖A‖_F/‖D‖_F. Before ``start_preconditioning_step``
(default: ``precondition_frequency``, as distributed_shampoo) the update is A itself. Then
W ← W·(1 − lr·wd) − lr·D (decoupled weight decay).

A mode longer than ``max_precond_dim`` is left unpreconditioned (identity on that side; no blocking), and so
are 1-D parameters unless ``precondition_1d``; a parameter with no preconditioned mode takes the grafted
(Adam) step. Roots come from :func:`kernels.eigen.inverse_root` (eigh in fp32, fp64 fallback, eigenvalues
clamped at 0, so rank-deficient statistics never give NaN). Every tensor lives in ``optimizer.state[p]``:
``stats`` and ``roots`` (lists over modes, ``None`` where unpreconditioned), ``exp_avg`` (β₁ > 0) and
``graft_exp_avg_sq`` (grafting), all in the parameter's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import itemsize
from . import _space
from .kernels import adam, add_scaled_, eigen, lerp_
from .registry import ALL_ROLES, OptimizerSpec, PrecondOptimizer, StepFlops, Transfer, check_range

GRAFTINGS = ("adam", "none")
ROOT_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True, kw_only=True)
class Config:
    """Shampoo hyperparameters; defaults are distributed_shampoo's README recipe for replacing AdamW
    (facebookresearch/optimizers, distributed_shampoo/README.md, "Example 4: AdamW")."""

    lr: float = 1e-3
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """β₁: EMA of the gradient (0 disables); β₂: EMA of the statistics (1.0: plain sums, Algorithm 1)."""
    eps: float = 1e-12
    """ε in (H + εI)^{-1/(2k)} (README: 1e-12)."""
    weight_decay: float = 0.01
    """Decoupled weight decay, W ← W·(1 − lr·wd)."""
    precondition_frequency: int = 100
    """Recompute the inverse roots every this many steps."""
    start_preconditioning_step: int | None = None
    """First step that uses the Shampoo direction (before: the grafted Adam step); None = precondition_frequency."""
    max_precond_dim: int = 8192
    """Modes longer than this are not preconditioned (identity)."""
    precondition_1d: bool = False
    """Give 1-D parameters an n×n preconditioner too (full-matrix AdaGrad on a vector, root −1/2)."""
    grafting: str = "adam"
    """``adam``: rescale to Adam's update norm; ``none``: the raw Shampoo direction."""
    grafting_beta2: float = 0.999
    """β₂ of the grafting second moment."""
    grafting_eps: float = 1e-8
    """ε of the grafting direction."""
    root_dtype: str = "fp32"
    """Precision of the eigendecomposition: ``fp32`` or ``fp64``."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, self.lr >= 0, ">= 0 (0 lets a scheduler warm up from zero)")
        check_range("betas", self.betas, len(self.betas) == 2 and 0 <= self.betas[0] < 1 and 0 < self.betas[1] <= 1,
                    "β₁ in [0, 1), β₂ in (0, 1]")
        check_range("eps", self.eps, self.eps > 0, "> 0")
        check_range("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        check_range("precondition_frequency", self.precondition_frequency,
                    isinstance(self.precondition_frequency, int) and self.precondition_frequency >= 1, "int >= 1")
        check_range("start_preconditioning_step", self.start_preconditioning_step,
                    self.start_preconditioning_step is None or self.start_preconditioning_step >= 1,
                    "None or an int >= 1")
        check_range("max_precond_dim", self.max_precond_dim, self.max_precond_dim >= 1, ">= 1")
        check_range("grafting", self.grafting, self.grafting in GRAFTINGS, ", ".join(GRAFTINGS))
        check_range("grafting_beta2", self.grafting_beta2, 0 <= self.grafting_beta2 < 1, "[0, 1)")
        check_range("grafting_eps", self.grafting_eps, self.grafting_eps > 0, "> 0")
        check_range("root_dtype", self.root_dtype, self.root_dtype in ROOT_DTYPES, " or ".join(ROOT_DTYPES))

    @property
    def start(self) -> int:
        return self.start_preconditioning_step or self.precondition_frequency


def preconditioned_modes(shape: tuple[int, ...], c: Config) -> list[bool]:
    """Per mode: does it get a preconditioner? (length ≤ max_precond_dim; 1-D only with precondition_1d)."""
    if len(shape) == 1 and not c.precondition_1d:
        return [False]
    return [d <= c.max_precond_dim for d in shape]


def precondition(m: torch.Tensor, roots: list[torch.Tensor | None]) -> torch.Tensor:
    """M ×₁ P₁ … ×_k P_k (P_i symmetric, so rotating 'into' P_i is applying it)."""
    return eigen.from_basis(m, roots)


class Shampoo(PrecondOptimizer):
    """Shampoo over param groups (any role); parameters without gradients are skipped."""

    Config = Config

    def _init_state(self, p: torch.Tensor, c: Config) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = 0
        modes = preconditioned_modes(tuple(p.shape), c)
        state["stats"] = [torch.zeros(d, d, dtype=p.dtype, device=p.device) if on else None
                          for d, on in zip(p.shape, modes)]
        state["roots"] = [torch.eye(d, dtype=p.dtype, device=p.device) if on else None
                          for d, on in zip(p.shape, modes)]
        if c.betas[0] > 0:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if c.grafting == "adam":
            state["graft_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _step_group(self, group: dict[str, Any], c: Config) -> None:
        beta1, beta2 = c.betas
        for p in self._params_with_grad(group):
            state = self.state[p] or self._init_state(p, c)
            state["step"] += 1
            t = state["step"]
            g = p.grad
            stats, roots = state["stats"], state["roots"]
            for i, h in enumerate(stats):
                if h is not None:
                    gram = eigen.mode_gram(g, i)
                    h.add_(gram) if beta2 == 1 else lerp_(h, gram, 1 - beta2)
            if beta1 > 0:
                state["exp_avg"].lerp_(g, 1 - beta1)
                m = state["exp_avg"] / (1 - beta1 ** t)
            else:
                m = g
            graft = None
            if c.grafting == "adam":
                v = state["graft_exp_avg_sq"]
                v.mul_(c.grafting_beta2).addcmul_(g, g, value=1 - c.grafting_beta2)
                graft = m / (v / (1 - c.grafting_beta2 ** t)).sqrt_().add_(c.grafting_eps)
            if t >= c.start and any(h is not None for h in stats):
                if (t - c.start) % c.precondition_frequency == 0:
                    order = max(p.dim(), 1)
                    bc2 = 1.0 if beta2 == 1 else 1 - beta2 ** t
                    for h, r in zip(stats, roots):
                        if h is not None:
                            r.copy_(eigen.inverse_root(h / bc2, 2 * order, c.eps, dtype=ROOT_DTYPES[c.root_dtype]))
                d = precondition(m, roots)
                if graft is not None:
                    d = d.mul_(graft.norm() / d.norm().clamp(min=torch.finfo(d.dtype).tiny))
            else:
                d = graft if graft is not None else m
            adam.decay_(p, c.lr, c.weight_decay)
            add_scaled_(p, d, -c.lr)


def state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: Config, info: Any = None) -> int:
    """(2·Σ_{preconditioned i} d_i² [H_i, P_i] + n·[β₁ > 0] + n·[grafting]) · itemsize."""
    n = math.prod(shape)
    modes = preconditioned_modes(tuple(shape), config)
    elems = sum(2 * d * d for d, on in zip(shape, modes) if on)
    elems += n * (config.betas[0] > 0) + n * (config.grafting == "adam")
    return elems * itemsize(dtype)


def step_flops(shape: tuple[int, ...], config: Config) -> StepFlops:
    """Ordinary step (after ``start_preconditioning_step``): statistics Σᵢ 2·n·d_i plus preconditioning
    Σᵢ 2·n·d_i (matrix m×n: 4mn(m+n)). Refresh: Q·D·Qᵀ per root, Σᵢ 2d_i³ matmul, and one eigh per root,
    9d_i³ (Golub & Van Loan §8.3.3, see :mod:`kernels.eigen`), every ``precondition_frequency`` steps."""
    modes = preconditioned_modes(tuple(shape), config)
    if not any(modes):
        return StepFlops()
    dims = [d for d, on in zip(shape, modes) if on]
    return StepFlops(
        matmul=eigen.gram_flops(shape, modes) + eigen.rotation_flops(shape, modes),
        refresh_matmul=sum(2 * d ** 3 for d in dims),
        refresh_other=sum(eigen.eigh_flops(d) for d in dims),
        every=config.precondition_frequency,
    )


def search_space(trial: Any, base: Config | None = None) -> Config:
    """lr (log), β₁ ∈ [0.8, 0.98], β₂ ∈ [0.95, 0.9995], ε ∈ [1e-12, 1e-6] (log), precondition_frequency ∈
    {10, 20, 50, 100}, wd ∈ [0, 0.2] (README "Hyperparameter Tuning": ε, betas, lr and the frequency matter)."""
    lr = _space.suggest_lr(trial, Config.lr, base, low=1e-4, high=3e-2)
    b1 = _space.suggest_beta(trial, "beta1", 0.8, 0.98)
    b2 = _space.suggest_beta(trial, "beta2", 0.95, 0.9995)
    eps = trial.suggest_float("eps", 1e-12, 1e-6, log=True)
    freq = trial.suggest_categorical("precondition_frequency", [10, 20, 50, 100])
    wd = trial.suggest_float("weight_decay", 0.0, 0.2)
    return Config(lr=lr, betas=(b1, b2), eps=eps, precondition_frequency=freq, weight_decay=wd,
                  grafting_beta2=b2, grafting_eps=base.grafting_eps if base else Config.grafting_eps)


def from_adamw(*, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.01, **_: Any) -> Transfer:
    """distributed_shampoo's AdamW recipe: same lr, betas, wd; grafting ε = AdamW's ε and β₂ = AdamW's β₂."""
    b1, b2 = float(betas[0]), float(betas[1])
    return Transfer(Config(lr=lr, betas=(b1, b2), weight_decay=weight_decay, grafting_beta2=b2, grafting_eps=eps),
                    "lr, betas, weight_decay from AdamW; Adam grafting with AdamW's β₂ and ε; ε = 1e-12",
                    "facebookresearch/optimizers distributed_shampoo/README.md, Example 4 (AdamW)")


SPEC = OptimizerSpec(
    name="shampoo", family="Kronecker-factored", paper="Gupta, Koren & Singer 2018, arXiv 1802.09568",
    config_cls=Config, optimizer_cls=Shampoo, state_bytes=state_bytes, step_flops=step_flops,
    search_space=search_space, from_adamw=from_adamw,
    state_formula="2·Σ d_i² (statistics, roots) + n (momentum) + n (Adam grafting)",
    refresh_knobs=("precondition_frequency", "max_precond_dim"), roles=ALL_ROLES,
    every_step_refresh={"precondition_frequency": 1, "start_preconditioning_step": 1},
    steady_state={"start_preconditioning_step": 1},
    notes="modes above max_precond_dim and 1-D parameters unpreconditioned (grafted Adam step)",
)
