"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, arXiv 1711.05101).

State per parameter: ``exp_avg`` and ``exp_avg_sq`` (2·n elements in the state dtype) and an integer step.
The update is :func:`kernels.adam.adamw_`, whose multi-tensor path matches ``torch.optim.AdamW(foreach=True)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import itemsize
from . import _space
from .kernels import adam
from .registry import ALL_ROLES, OptimizerSpec, PrecondOptimizer, StepFlops, Transfer, check_range


@dataclass(frozen=True, kw_only=True)
class Config:
    """AdamW hyperparameters; defaults are ``torch.optim.AdamW``'s."""

    lr: float = 1e-3
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """EMA coefficients of the gradient and its square."""
    eps: float = 1e-8
    """Added to √v̂ in the denominator."""
    weight_decay: float = 0.01
    """Decoupled weight decay, applied as p ← p·(1 − lr·wd)."""
    foreach: bool = True
    """Use torch's multi-tensor kernels."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, self.lr >= 0, ">= 0 (0 lets a scheduler warm up from zero)")
        check_range("betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                    "two values in [0, 1)")
        check_range("eps", self.eps, self.eps >= 0, ">= 0")
        check_range("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")


class AdamW(PrecondOptimizer):
    """AdamW over param groups; parameters without gradients are skipped."""

    runs_on_dtensor = True  # tests/test_distributed.py

    Config = Config

    def _step_group(self, group: dict[str, Any], c: Config) -> None:
        params = self._params_with_grad(group)
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        states = [self.state[p] for p in params]
        adam.adamw_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                    lr=c.lr, beta1=c.betas[0], beta2=c.betas[1], eps=c.eps, weight_decay=c.weight_decay,
                    foreach=c.foreach)


def state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: Config, info: Any = None) -> int:
    """Two moments of the parameter's shape: 2·n·itemsize (the step is a Python int)."""
    n = 1
    for s in shape:
        n *= s
    return 2 * n * itemsize(dtype)


def step_flops(shape: tuple[int, ...], config: Config) -> StepFlops:
    """Elementwise only: no matmul FLOPs."""
    return StepFlops()


def search_space(trial: Any, base: Config | None = None) -> Config:
    """lr (log), β1 ∈ [0.8, 0.98], β2 ∈ [0.9, 0.9995] (as 1−β, log), weight decay ∈ [0, 0.2]."""
    lr = _space.suggest_lr(trial, Config.lr, base, low=1e-4, high=3e-2)
    b1 = _space.suggest_beta(trial, "beta1", 0.8, 0.98)
    b2 = _space.suggest_beta(trial, "beta2", 0.9, 0.9995)
    wd = trial.suggest_float("weight_decay", 0.0, 0.2)
    return Config(lr=lr, betas=(b1, b2), weight_decay=wd, eps=base.eps if base else Config.eps)


def from_adamw(*, lr: float, betas: tuple[float, float] = Config.betas, eps: float = Config.eps,
               weight_decay: float = Config.weight_decay, **_: Any) -> Transfer:
    """Identity."""
    return Transfer(Config(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                    "identity", "the tuned AdamW itself")


SPEC = OptimizerSpec(
    name="adamw", family="diagonal (Adam)", paper="Loshchilov & Hutter 2019, arXiv 1711.05101",
    config_cls=Config, optimizer_cls=AdamW, state_bytes=state_bytes, step_flops=step_flops,
    search_space=search_space, from_adamw=from_adamw, state_formula="2·n (m, v)", roles=ALL_ROLES,
    elementwise=True,
)
