"""SOAP: Adam in Shampoo's eigenbasis (Vyas et al., arXiv 2409.11321, Algorithm 3 in papers/002).

For an m×n layer (and per mode for order-k tensors), with Q_L, Q_R the eigenbases of L, R:

    G' = Q_Lᵀ·G·Q_R;  M' ← β₁M' + (1−β₁)G';  V ← β₂V + (1−β₂)G'⊙G'
    W ← W − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · Q_L·(M' / (√V + ε))·Q_Rᵀ;   W ← W − lr·wd·W
    L ← β_s·L + (1−β_s)·GGᵀ;  R ← β_s·R + (1−β_s)·GᵀG          (β_s = shampoo_beta, default β₂)
    every f steps: Q ← QR(P·Q) after sorting Q's columns by diag(QᵀPQ) (one power-iteration step)

Boundary conventions follow upstream SOAP (github.com/nikhilvyas/SOAP, soap.py), the authors' code: the first
step of a parameter only accumulates L, R and takes Q from ``eigh`` (no parameter update, so a gradient never
preconditions itself); M is kept in the rotated basis and rotated to the new basis on a refresh (equivalent to
Algorithm 3's M in the original basis, without two rotations per step); V is not rotated, only permuted with
the sorted columns; ε is added to √V (not √V̂) and weight decay comes after the step, as upstream.

Modes longer than ``max_precond_dim`` keep the identity basis; ``merge_dims`` first merges adjacent modes while
their product stays ≤ max_precond_dim (upstream's rule); 1-D parameters run plain Adam unless
``precondition_1d``. State per parameter: ``exp_avg`` and ``exp_avg_sq`` (n each), ``GG`` and ``Q`` (lists over
modes of d_i×d_i, ``None`` where unpreconditioned), in the parameter's dtype; the step is a Python int.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import itemsize
from . import _space
from .kernels import add_scaled_, eigen, lerp_
from .registry import ALL_ROLES, OptimizerSpec, PrecondOptimizer, StepFlops, Transfer, check_range


@dataclass(frozen=True, kw_only=True)
class Config:
    """SOAP hyperparameters; defaults are upstream SOAP's (lr 3e-3, betas (0.95, 0.95), wd 0.01, f = 10,
    max_precond_dim 10000, github.com/nikhilvyas/SOAP)."""

    lr: float = 3e-3
    """Learning rate."""
    betas: tuple[float, float] = (0.95, 0.95)
    """Adam's β₁, β₂ in the rotated basis."""
    shampoo_beta: float | None = None
    """EMA coefficient of L and R; None uses β₂ (upstream)."""
    eps: float = 1e-8
    """Added to √V."""
    weight_decay: float = 0.01
    """Decoupled weight decay, applied after the step as upstream."""
    precondition_frequency: int = 10
    """Refresh the eigenbases (power iteration + QR) every this many steps."""
    max_precond_dim: int = 10000
    """Modes longer than this keep the identity basis (upstream: excludes most vocabularies)."""
    merge_dims: bool = False
    """Merge adjacent modes while their product is ≤ max_precond_dim (for conv kernels)."""
    precondition_1d: bool = False
    """Rotate 1-D parameters too (an n×n basis); otherwise plain Adam."""
    correct_bias: bool = True
    """Adam bias correction."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, self.lr >= 0, ">= 0 (0 lets a scheduler warm up from zero)")
        check_range("betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                    "two values in [0, 1)")
        check_range("shampoo_beta", self.shampoo_beta,
                    self.shampoo_beta is None or 0 <= self.shampoo_beta < 1, "None or [0, 1)")
        check_range("eps", self.eps, self.eps >= 0, ">= 0")
        check_range("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        check_range("precondition_frequency", self.precondition_frequency,
                    isinstance(self.precondition_frequency, int) and self.precondition_frequency >= 1, "int >= 1")
        check_range("max_precond_dim", self.max_precond_dim, self.max_precond_dim >= 1, ">= 1")


def merged_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Adjacent modes multiplied together while the product stays ≤ ``max_dim`` (upstream's ``merge_dims``)."""
    out: list[int] = []
    cur = 1
    for d in shape:
        if cur * d > max_dim:
            if cur > 1:
                out.append(cur)
                cur = d
            else:
                out.append(d)
                cur = 1
        else:
            cur *= d
    if cur > 1 or not out:
        out.append(cur)
    return tuple(out)


def layout(shape: tuple[int, ...], c: Config) -> tuple[tuple[int, ...], list[bool]]:
    """The shape SOAP works on (merged or not) and which of its modes get an eigenbasis."""
    if len(shape) <= 1:
        n = shape[0] if shape else 1
        return (n,), [c.precondition_1d and n <= c.max_precond_dim]
    work = merged_shape(shape, c.max_precond_dim) if c.merge_dims else tuple(shape)
    return work, [d <= c.max_precond_dim for d in work]


def _accumulate(gg: list[torch.Tensor | None], g: torch.Tensor, beta: float) -> None:
    for i, h in enumerate(gg):
        if h is not None:
            lerp_(h, eigen.mode_gram(g, i), 1 - beta)


class SOAP(PrecondOptimizer):
    """SOAP over param groups (any role); parameters without gradients are skipped."""

    Config = Config

    def _init_state(self, p: torch.Tensor, g: torch.Tensor, c: Config, beta_s: float) -> None:
        """First step of a parameter: allocate everything, accumulate L/R once, Q from eigh (no update)."""
        work, modes = layout(tuple(p.shape), c)
        state = self.state[p]
        state["step"] = 0
        state["exp_avg"] = torch.zeros(work, dtype=p.dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(work, dtype=p.dtype, device=p.device)
        state["GG"] = [torch.zeros(d, d, dtype=p.dtype, device=p.device) if on else None
                       for d, on in zip(work, modes)]
        _accumulate(state["GG"], g, beta_s)
        state["Q"] = [eigen.eigenbasis(h).to(p.dtype) if h is not None else None for h in state["GG"]]

    def _step_group(self, group: dict[str, Any], c: Config) -> None:
        beta1, beta2 = c.betas
        beta_s = beta2 if c.shampoo_beta is None else c.shampoo_beta
        for p in self._params_with_grad(group):
            state = self.state[p]
            work, _ = layout(tuple(p.shape), c)
            g = p.grad.reshape(work)
            if not state:
                self._init_state(p, g, c, beta_s)
                continue
            gg, qs = state["GG"], state["Q"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            gp = eigen.to_basis(g, qs)
            state["step"] += 1
            t = state["step"]
            add_scaled_(m.mul_(beta1), gp, 1 - beta1)
            v.mul_(beta2).add_(gp.square(), alpha=1 - beta2)
            denom = v.sqrt().add_(c.eps)
            step_size = c.lr
            if c.correct_bias:
                step_size = c.lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            add_scaled_(p, eigen.from_basis(m / denom, qs).reshape(p.shape), -step_size)
            if c.weight_decay > 0:
                p.add_(p, alpha=-c.lr * c.weight_decay)
            _accumulate(gg, g, beta_s)
            if t % c.precondition_frequency == 0 and any(q is not None for q in qs):
                self._refresh(m, v, gg, qs)

    @staticmethod
    def _refresh(m: torch.Tensor, v: torch.Tensor, gg: list[torch.Tensor | None],
                 qs: list[torch.Tensor | None]) -> None:
        """New bases by power iteration + QR; M rotated old → original → new basis, V's modes permuted."""
        m_orig = eigen.from_basis(m, qs)
        v_new = v
        for i, (h, q) in enumerate(zip(gg, qs)):
            if h is None or q is None:
                continue
            q_new, order = eigen.refresh_basis(h, q)
            v_new = v_new.index_select(i, order)
            q.copy_(q_new)
        v.copy_(v_new)
        m.copy_(eigen.to_basis(m_orig, qs))


def state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: Config, info: Any = None) -> int:
    """(2·n [M, V] + 2·Σ_{preconditioned i} d_i² [L_i, Q_i]) · itemsize, d_i over the (merged) modes."""
    work, modes = layout(tuple(shape), config)
    n = math.prod(shape) if shape else 1
    return (2 * n + sum(2 * d * d for d, on in zip(work, modes) if on)) * itemsize(dtype)


def step_flops(shape: tuple[int, ...], config: Config) -> StepFlops:
    """Ordinary step: rotate G in, rotate the Adam direction out, accumulate L_i: 3·Σᵢ 2·n·d_i
    (m×n: 6mn(m+n)). Refresh (every f steps): M out and back in, 2·Σᵢ 2·n·d_i, plus P_i·Q_i, Σᵢ 2d_i³;
    one QR per mode, 8d_i³/3 (Golub & Van Loan §5.2.2, see :mod:`kernels.eigen`). The one-off first step
    (statistics + eigh, no update) is not included."""
    work, modes = layout(tuple(shape), config)
    if not any(modes):
        return StepFlops()
    rot = eigen.rotation_flops(work, modes)
    dims = [d for d, on in zip(work, modes) if on]
    return StepFlops(matmul=3 * rot, refresh_matmul=2 * rot + sum(2 * d ** 3 for d in dims),
                     refresh_other=sum(eigen.qr_flops(d) for d in dims), every=config.precondition_frequency)


def search_space(trial: Any, base: Config | None = None) -> Config:
    """lr (log), β₁ ∈ [0.8, 0.98], β₂ ∈ [0.9, 0.999], precondition_frequency ∈ {5, 10, 20, 50, 100}
    (the paper's ablation range, 2409.11321 §6), wd ∈ [0, 0.2]."""
    lr = _space.suggest_lr(trial, Config.lr, base, low=3e-4, high=3e-2)
    b1 = _space.suggest_beta(trial, "beta1", 0.8, 0.98)
    b2 = _space.suggest_beta(trial, "beta2", 0.9, 0.999)
    freq = trial.suggest_categorical("precondition_frequency", [5, 10, 20, 50, 100])
    wd = trial.suggest_float("weight_decay", 0.0, 0.2)
    return Config(lr=lr, betas=(b1, b2), precondition_frequency=freq, weight_decay=wd,
                  eps=base.eps if base else Config.eps)


def from_adamw(*, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.01, **_: Any) -> Transfer:
    """Identity on lr, betas, ε, wd: SOAP is Adam in a rotated basis (Q = I gives Adam back)."""
    return Transfer(Config(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, weight_decay=weight_decay),
                    "lr, betas, eps, weight_decay from AdamW (SOAP is Adam in Shampoo's eigenbasis); f = 10",
                    "Vyas et al., SOAP, arXiv 2409.11321, §3 and upstream defaults (github.com/nikhilvyas/SOAP)")


SPEC = OptimizerSpec(
    name="soap", family="Adam in Shampoo's eigenbasis", paper="Vyas et al. 2024, arXiv 2409.11321",
    config_cls=Config, optimizer_cls=SOAP, state_bytes=state_bytes, step_flops=step_flops,
    search_space=search_space, from_adamw=from_adamw,
    state_formula="2·n (M, V) + 2·Σ d_i² (L/R statistics, eigenbases)",
    refresh_knobs=("precondition_frequency", "max_precond_dim", "merge_dims"), roles=ALL_ROLES,
    every_step_refresh={"precondition_frequency": 1},
    notes="1-D parameters run plain Adam; modes above max_precond_dim keep the identity basis",
)
