"""Adafactor: Adam's second moment factored into row and column statistics (Shazeer & Stern, arXiv 1804.04235).

For a ≥ 2-D parameter only the EMAs of the row and column mean squares of G are kept (last two dims, as
``torch.optim.Adafactor``), and V̂ = r·c / mean(r) is their rank-1 reconstruction (:mod:`kernels.factored`);
1-D parameters keep a full v. One step:

    β̂₂ = 1 − t^beta2_decay  (or a constant β₂ with bias correction 1 − β₂ᵗ, Algorithm 2 of the paper)
    U = G / max(√V̂, ε₁);  Û = U / max(1, RMS(U)/d)                      (update clipping)
    α = max(ε₂, RMS(X))·min(lr, 1/√t)  with ``relative_step``, else lr     (relative step size)
    X ← X·(1 − lr·wd) − α·Û    (or − α·m with momentum m ← β₁·m + (1−β₁)·Û when ``beta1`` is set)

With ``beta1=None``, ``relative_step=True`` and ``beta2=None`` this is ``torch.optim.Adafactor`` (to float32 rounding)
(same ε placement: ε₁ clamps mean(r) and √V̂ rather than being added to G², see torch's docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..dtypes import itemsize
from . import _space
from .kernels import adam, factored
from .registry import ALL_ROLES, OptimizerSpec, PrecondOptimizer, StepFlops, Transfer, check_range


@dataclass(frozen=True, kw_only=True)
class Config:
    """Adafactor hyperparameters; defaults are the paper's (Sec. 9, Table 2) as ``torch.optim.Adafactor`` has them."""

    lr: float = 1e-2
    """With ``relative_step``: the cap of ρₜ = min(lr, 1/√t) (the paper's constant 0.01); else the step size."""
    beta1: float | None = None
    """First-moment EMA of the clipped update; ``None``: no momentum, no first-moment memory (the paper)."""
    beta2: float | None = None
    """A constant β₂ with bias correction (Algorithm 2); ``None``: the schedule β̂₂ = 1 − t^beta2_decay."""
    beta2_decay: float = -0.8
    """Exponent of the β̂₂ schedule (paper Sec. 7.2: 1 − t^−0.8)."""
    eps1: float | None = None
    """Floor of √V̂ and mean(r); ``None``: the parameter dtype's machine epsilon (torch's default; the
    paper's 1e-30 underflows to 0 once squared in float32)."""
    eps2: float = 1e-3
    """Floor of RMS(X) in the relative step size (paper: 1e-3)."""
    d: float = 1.0
    """Update clipping threshold: Û = U / max(1, RMS(U)/d) (paper: 1)."""
    relative_step: bool = True
    """Scale the step by the parameter's RMS: α = max(ε₂, RMS(X))·min(lr, 1/√t) (paper Sec. 8)."""
    weight_decay: float = 0.0
    """Decoupled weight decay X ← X·(1 − lr·wd) (torch's convention; the paper has none)."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, self.lr >= 0, ">= 0 (0 lets a scheduler warm up from zero)")
        check_range("beta1", self.beta1, self.beta1 is None or 0 <= self.beta1 < 1, "None or [0, 1)")
        check_range("beta2", self.beta2, self.beta2 is None or 0 <= self.beta2 < 1, "None or [0, 1)")
        check_range("beta2_decay", self.beta2_decay, -1 <= self.beta2_decay <= 0, "[-1, 0]")
        check_range("eps1", self.eps1, self.eps1 is None or self.eps1 >= 0, "None or >= 0")
        check_range("eps2", self.eps2, self.eps2 >= 0, ">= 0")
        check_range("d", self.d, self.d > 0, "> 0")
        check_range("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")


def init_state(p: Tensor, c: Config) -> dict[str, Any]:
    """Zero statistics for ``p``: ``row_var``/``col_var`` (≥ 2-D) or ``variance``, plus ``exp_avg`` with momentum."""
    state: dict[str, Any] = {"step": 0}
    if factored.is_factored(p.shape):
        state["row_var"], state["col_var"] = factored.zeros(p.shape, dtype=p.dtype, device=p.device)
    else:
        state["variance"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if c.beta1 is not None:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def adafactor_(p: Tensor, grad: Tensor, state: dict[str, Any], c: Config) -> None:
    """One Adafactor step for one parameter, in place (``state["step"]`` already counts this step)."""
    t = state["step"]
    eps1 = torch.finfo(p.dtype).eps if c.eps1 is None else c.eps1
    if c.beta2 is None:
        weight, bias_correction = t ** c.beta2_decay, 1.0
    else:
        weight, bias_correction = 1 - c.beta2, 1 - c.beta2 ** t
    if c.relative_step:
        alpha = max(c.eps2, factored.rms(p)) * min(c.lr, 1 / t ** 0.5)
    else:
        alpha = c.lr
    adam.decay_(p, c.lr, c.weight_decay)
    if "row_var" in state:
        factored.update_(state["row_var"], state["col_var"], grad, weight)
        update = factored.precondition(grad, state["row_var"], state["col_var"], eps1, bias_correction)
    else:
        v = state["variance"]
        v.lerp_(grad * grad, weight)
        v_hat = v / bias_correction if bias_correction != 1.0 else v.clone()
        update = v_hat.clamp_(min=factored.floor(eps1 * eps1, v_hat.dtype)).rsqrt_().mul_(grad)
    # update clipping, written as torch writes it (same rounding of the clip factor)
    clip = max(1.0, update.norm(2).item() / (math.sqrt(update.numel()) * c.d))
    if c.beta1 is not None:
        m = state["exp_avg"]
        m.lerp_(update.div_(clip), 1 - c.beta1)
        p.add_(m, alpha=-alpha)
    else:
        p.add_(update, alpha=-alpha / clip)


class Adafactor(PrecondOptimizer):
    """Adafactor over param groups; parameters without gradients are skipped."""

    Config = Config

    def _step_group(self, group: dict[str, Any], c: Config) -> None:
        for p in self._params_with_grad(group):
            state = self.state[p]
            if not state:
                state.update(init_state(p, c))
            state["step"] += 1
            adafactor_(p, p.grad, state, c)


def state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: Config, info: Any = None) -> int:
    """(n + m)·prod(leading) for a ≥ 2-D (…, n, m) parameter, else its numel; plus numel for momentum."""
    size = 1
    for s in shape:
        size *= s
    held = factored.numel(shape) if factored.is_factored(shape) else size
    if config.beta1 is not None:
        held += size
    return held * itemsize(dtype)


def step_flops(shape: tuple[int, ...], config: Config) -> StepFlops:
    """No matmul: the rank-1 reconstruction r·c is a broadcast product, reductions are elementwise work."""
    return StepFlops()


def search_space(trial: Any, base: Config | None = None) -> Config:
    """lr (log), momentum on/off and β₁ ∈ [0.8, 0.95], decay exponent ∈ [−1, −0.5], d ∈ [1, 2], wd ∈ [0, 0.1].

    Ranges follow the paper's ablations (Table 2: decay exponents 0.5–1.0, d = 1 or 2).
    """
    b = base or Config()
    lr = _space.suggest_lr(trial, Config.lr, base, low=1e-3, high=1e-1)
    beta1 = None
    if trial.suggest_categorical("momentum", [False, True]):
        beta1 = _space.suggest_beta(trial, "beta1", 0.8, 0.95)
    decay = trial.suggest_float("beta2_decay", -1.0, -0.5)
    d = trial.suggest_float("d", 1.0, 2.0)
    wd = trial.suggest_float("weight_decay", 0.0, 0.1)
    return Config(lr=lr, beta1=beta1, beta2=b.beta2, beta2_decay=decay, eps1=b.eps1, eps2=b.eps2, d=d,
                  relative_step=b.relative_step, weight_decay=wd)


def from_adamw(*, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, **_: Any) -> Transfer:
    """Adafactor run as "Adam with a factored v": same lr, β₁ (momentum), constant β₂ with bias correction, wd."""
    return Transfer(
        Config(lr=lr, beta1=betas[0], beta2=betas[1], relative_step=False, weight_decay=weight_decay),
        "lr, β1, β2, wd ← AdamW's; relative_step off (absolute lr), β2 constant with bias correction",
        "Zhao et al. 2024, arXiv 2407.07972 (Adafactor with momentum matches Adam at Adam's lr); "
        "Algorithm 2 of 1804.04235",
    )


SPEC = OptimizerSpec(
    name="adafactor", family="factored diagonal", paper="Shazeer & Stern 2018, arXiv 1804.04235",
    config_cls=Config, optimizer_cls=Adafactor, state_bytes=state_bytes, step_flops=step_flops,
    search_space=search_space, from_adamw=from_adamw,
    state_formula="n+m per (…, n, m) matrix, n per vector; + n·m with β1 (momentum)", roles=ALL_ROLES,
)
