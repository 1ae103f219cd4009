"""Muon: SGD-momentum whose update is orthogonalized by Newton–Schulz (Keller Jordan, kellerjordan.github.io/
posts/muon, 2024; Moonlight, Liu et al., arXiv 2502.16982).

    B ← μ·B + (1−μ)·G;   U = (1−μ)·G + μ·B if nesterov else B;   O = NS_T(U) ≈ UVᵀ of U
    W ← W·(1 − lr·wd) − lr·s(rows, cols)·O

with the update scale s: ``original`` √max(1, rows/cols) (Keller Jordan), ``match_rms_adamw``
0.2·√max(rows, cols) (Moonlight §2.2: update RMS ≈ AdamW's, so AdamW's lr and wd carry over) or ``spectral``
√(rows/cols) (the spectral condition ‖ΔW‖₂ ∝ √(fan_out/fan_in), Yang, Simon & Bernstein, arXiv 2310.17813).
The momentum is the EMA form (``lerp``) that Keller Jordan's muon.py and ``torch.optim.Muon`` use; weight decay
uses the unscaled lr, as both do.

Roles: ``matrix`` (2-D), ``conv`` (≥3-D kernels, flattened to (out, in·k·k) as Keller Jordan's Muon does) and
``batched`` (≥3-D stacks such as experts: a batch of matrices over the last two dims). Embeddings, the head and
vectors go to AdamW by the registry's default routing. State: one momentum buffer of the parameter's shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import itemsize
from ..errors import ConfigError
from . import _space
from .kernels import adam
from .kernels import newton_schulz as ns
from .registry import MATRIX_ROLES, OptimizerSpec, PrecondOptimizer, StepFlops, Transfer, check_range

SCALES = ("original", "match_rms_adamw", "spectral")
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class Config:
    """Muon hyperparameters; defaults are Keller Jordan's Muon (lr 0.02, momentum 0.95, Nesterov, 5 steps of
    the public quintic in bf16, no weight decay)."""

    lr: float = 0.02
    """Learning rate (before the update scale)."""
    momentum: float = 0.95
    """μ of the momentum EMA."""
    nesterov: bool = True
    """Orthogonalize (1−μ)·G + μ·B instead of B."""
    ns_coefficients: tuple = ns.PUBLIC_QUINTIC
    """One (a, b, c) for every step, or one triple per step (then exactly ``ns_steps`` of them)."""
    ns_steps: int = ns.DEFAULT_STEPS
    """Newton–Schulz steps T."""
    ns_dtype: str = "bf16"
    """Dtype the iteration runs in: ``bf16`` (practice) or ``fp32``."""
    eps: float = ns.DEFAULT_EPS
    """Floor of the Frobenius norm in the normalisation."""
    scale: str = "original"
    """Update scale: ``original``, ``match_rms_adamw`` or ``spectral`` (module docstring)."""
    weight_decay: float = 0.0
    """Decoupled weight decay, W ← W·(1 − lr·wd)."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, self.lr >= 0, ">= 0 (0 lets a scheduler warm up from zero)")
        check_range("momentum", self.momentum, 0 <= self.momentum < 1, "[0, 1)")
        check_range("ns_steps", self.ns_steps, isinstance(self.ns_steps, int) and 1 <= self.ns_steps <= 20,
                    "an integer in [1, 20]")
        object.__setattr__(self, "ns_coefficients", _normalise_coefficients(self.ns_coefficients, self.ns_steps))
        check_range("ns_dtype", self.ns_dtype, self.ns_dtype in NS_DTYPES, " or ".join(NS_DTYPES))
        check_range("eps", self.eps, self.eps > 0, "> 0")
        check_range("scale", self.scale, self.scale in SCALES, ", ".join(SCALES))
        check_range("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")


def _normalise_coefficients(value: Any, steps: int) -> tuple:
    """A triple stays a flat tuple; a per-step list becomes a tuple of triples (YAML lists accepted)."""
    try:
        sched = ns.schedule(value, steps)
    except (TypeError, ValueError) as e:
        raise ValueError(f"ns_coefficients: {e}") from e
    flat = all(isinstance(x, (int, float)) for x in value)
    return sched[0] if flat else sched


def update_scale(rows: int, cols: int, mode: str) -> float:
    """The lr multiplier s(rows, cols) of ``mode`` (see the module docstring)."""
    if mode == "original":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(rows / cols)


def matrix_view(shape: tuple[int, ...], role: str | None) -> tuple[int, ...]:
    """The shape Newton–Schulz sees: 2-D as is, ``batched`` as (…, rows, cols), anything else ≥3-D (conv)
    flattened to (out, in·k·k)."""
    if len(shape) < 2:
        raise ConfigError(f"Muon updates matrices; got a parameter of shape {shape}. Route vectors to adamw.")
    if len(shape) == 2 or role == "batched":
        return shape
    return (shape[0], math.prod(shape[1:]))


def muon_update(grad: torch.Tensor, buf: torch.Tensor, c: Config, role: str | None = None) -> torch.Tensor:
    """The orthogonalized update O (in ``c.ns_dtype``, the parameter's shape); updates ``buf`` in place."""
    buf.lerp_(grad, 1 - c.momentum)
    u = grad.lerp(buf, c.momentum) if c.nesterov else buf
    view = matrix_view(tuple(grad.shape), role)
    o = ns.newton_schulz(u.reshape(view), c.ns_coefficients, c.ns_steps, dtype=NS_DTYPES[c.ns_dtype], eps=c.eps)
    return o.reshape(grad.shape)


class Muon(PrecondOptimizer):
    """Muon over param groups (roles ``matrix``, ``conv``, ``batched``); parameters without gradients skipped."""

    Config = Config

    def _step_group(self, group: dict[str, Any], c: Config) -> None:
        role = group.get("role")
        for p in self._params_with_grad(group):
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            o = muon_update(p.grad, state["momentum_buffer"], c, role)
            rows, cols = matrix_view(tuple(p.shape), role)[-2:]
            adam.decay_(p, c.lr, c.weight_decay)
            p.add_(o, alpha=-c.lr * update_scale(rows, cols, c.scale))


def state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: Config, info: Any = None) -> int:
    """One momentum buffer: n·itemsize."""
    return math.prod(shape) * itemsize(dtype)


def step_flops(shape: tuple[int, ...], config: Config, info: Any = None) -> StepFlops:
    """Newton–Schulz matmuls only: T·batch·(4m²n + 2m³), m = min(rows, cols), n = max (d×d: 6·T·d³).

    ``shape`` is the parameter's; conv kernels (≥3-D without a ``batched`` role) count as (out, in·k·k), as
    :func:`matrix_view` reshapes them. Pass ``info`` with ``role="batched"`` for a stack of matrices.
    """
    role = getattr(info, "role", None)
    if len(shape) < 2:
        return StepFlops()
    return StepFlops(matmul=ns.flops(matrix_view(tuple(shape), role), config.ns_steps))


def search_space(trial: Any, base: Config | None = None) -> Config:
    """lr (log, ×/÷10 around a base), momentum ∈ [0.85, 0.98], ns_steps ∈ {4, 5, 6}, wd ∈ [0, 0.2]."""
    lr = _space.suggest_lr(trial, Config.lr, base, low=2e-3, high=0.1)
    momentum = _space.suggest_beta(trial, "momentum", 0.85, 0.98)
    steps = trial.suggest_int("ns_steps", 4, 6)
    wd = trial.suggest_float("weight_decay", 0.0, 0.2)
    keep = {} if base is None else {"scale": base.scale, "nesterov": base.nesterov, "ns_dtype": base.ns_dtype}
    coeffs = base.ns_coefficients if base is not None and isinstance(base.ns_coefficients[0], float) \
        else ns.PUBLIC_QUINTIC
    return Config(lr=lr, momentum=momentum, ns_steps=steps, ns_coefficients=coeffs, weight_decay=wd, **keep)


def from_adamw(*, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, **_: Any) -> Transfer:
    """Moonlight's rule: keep AdamW's lr and weight decay, scale updates by 0.2·√max(rows, cols)."""
    return Transfer(Config(lr=lr, weight_decay=weight_decay, scale="match_rms_adamw"),
                    "lr and weight_decay from AdamW; scale=match_rms_adamw (update RMS 0.2, like AdamW's)",
                    "Liu et al., Muon is Scalable for LLM Training, arXiv 2502.16982, §2.2")


SPEC = OptimizerSpec(
    name="muon", family="orthogonalized momentum", paper="Jordan 2024 (kellerjordan.github.io/posts/muon); "
    "Liu et al. 2025, arXiv 2502.16982", config_cls=Config, optimizer_cls=Muon, state_bytes=state_bytes,
    step_flops=step_flops, search_space=search_space, from_adamw=from_adamw, state_formula="n (momentum)",
    refresh_knobs=("ns_steps", "ns_coefficients"), roles=MATRIX_ROLES | {"batched"},
    notes="matrix and conv (flattened) through Muon, batched as a batch of matrices; the rest through AdamW",
)
