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

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import itemsize
from ..errors import ConfigError
from . import _space
from .kernels import adam, add_scaled_
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

    runs_on_dtensor = True  # tests/test_distributed.py

    Config = Config

    def __init__(self, params: Any, **hyperparameters: Any) -> None:
        super().__init__(params, **hyperparameters)
        self._refuse_shapes("muon", lambda p: p.dim() >= 2, "matrices (2-D and up)")

    def _step_group(self, group: dict[str, Any], c: Config) -> None:
        role = group.get("role")
        for p in self._params_with_grad(group):
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            o = muon_update(p.grad, state["momentum_buffer"], c, role)
            rows, cols = matrix_view(tuple(p.shape), role)[-2:]
            adam.decay_(p, c.lr, c.weight_decay)
            add_scaled_(p, o, -c.lr * update_scale(rows, cols, c.scale))


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


NS_SCHEDULES = ("public", "polar-express", "custom")
"""Newton–Schulz schedules the search chooses from: the public quintic every step; the per-step greedy minimax
schedule (Polar Express, arXiv 2505.16932) that ``precondtune ns-coefficients`` designs for [NS_LOWER, 1]
(:func:`polar_express`); or a custom quintic searched continuously (:func:`converging_quintic`)."""
NS_LOWER = 1e-3
"""Smallest singular value (relative to ‖G‖_F, i.e. after normalisation) a schedule is judged from; the default
of ``precondtune ns-coefficients``."""
NS_BAND = (0.1, 1.6)
"""A schedule *converges* (precondtune's criterion) when its T steps map every singular value in [NS_LOWER, 1]
into this band: bounded, and no direction left below a tenth of a full step. The public quintic passes at 4–6
steps (bands [0.14, 1.20], [0.47, 1.20], [0.68, 1.20]); Keller Jordan reports that singular values spread over
≈ (0.5, 1.5) do not hurt training."""


def converges(coefficients: Any, steps: int) -> bool:
    """Whether ``steps`` Newton–Schulz steps with ``coefficients`` keep [NS_LOWER, 1] inside :data:`NS_BAND`."""
    lo, hi = ns.singular_value_band(coefficients, steps, NS_LOWER)
    return NS_BAND[0] <= lo and hi <= NS_BAND[1]


def quintic_from_shape(a: float, p1: float, dp1: float) -> tuple[float, float, float]:
    """The odd quintic p(σ) = aσ + bσ³ + cσ⁵ with slope ``a`` at 0, value ``p1`` and slope ``dp1`` at σ = 1:
    a + b + c = p1 and a + 3b + 5c = dp1 give c = a + (dp1 − 3·p1)/2, b = (dp1 − p1)/2 − 2c. The public quintic
    is (3.4445, p1 = 0.701, dp1 = −0.723)."""
    c = a + (dp1 - 3 * p1) / 2
    return (a, (dp1 - p1) / 2 - 2 * c, c)


def converging_quintic(a: float, p1: float, dp1: float, steps: int) -> tuple[float, float, float]:
    """The quintic of shape (a, p1, dp1) if it :func:`converges` in ``steps`` steps; else the convergent point
    nearest to it among 20 evenly spaced points of the straight line to the public quintic, which converges at
    the searched 4–6 steps. A deterministic map (piecewise constant where it pulls a quintic in), so the sampler
    learns on (a, p1, dp1) as usual; the trial's ``hyperparameters`` attr holds the quintic actually used. With
    ``ns_steps`` fixed below 4 no quintic converges and the public one is used."""
    target = quintic_from_shape(a, p1, dp1)
    for k in range(20, 0, -1):
        t = k / 20
        q = tuple(p + t * (x - p) for p, x in zip(ns.PUBLIC_QUINTIC, target))
        if converges(q, steps):
            return q  # type: ignore[return-value]
    return ns.PUBLIC_QUINTIC


@functools.lru_cache(maxsize=32)
def polar_express(steps: int) -> tuple[tuple[float, float, float], ...]:
    """The per-step greedy minimax schedule for [NS_LOWER, 1] (:func:`precondtune.ns_coefficients.design`) with
    bf16's headroom, which also serves fp32 (the headroom only widens each step's design interval)."""
    from .. import ns_coefficients  # imports this package; loaded on first use

    return ns_coefficients.design(steps, NS_LOWER, headroom=ns_coefficients.HEADROOM["bf16"]).coefficients


def search_space(trial: Any, base: Config | None = None) -> Config:
    """lr (log, ×/÷10 around a base), momentum ∈ [0.85, 0.98], wd ∈ [0, 0.2], ns_steps ∈ {4, 5, 6} and the
    Newton–Schulz schedule (:data:`NS_SCHEDULES`): a custom quintic is searched by its shape — slope ``ns_a`` ∈
    [2.5, 4.5] at 0, value ``ns_p1`` ∈ [0.6, 1] and slope ``ns_dp1`` ∈ [−2.5, 1] at 1 — and kept convergent by
    :func:`converging_quintic`. Every schedule the space yields at 4–6 steps :func:`converges`."""
    lr = _space.suggest_lr(trial, Config.lr, base, low=2e-3, high=0.1)
    momentum = _space.suggest_beta(trial, "momentum", 0.85, 0.98)
    wd = trial.suggest_float("weight_decay", 0.0, 0.2)
    steps = trial.suggest_int("ns_steps", 4, 6)
    keep = {} if base is None else {"scale": base.scale, "nesterov": base.nesterov, "ns_dtype": base.ns_dtype}
    kind = trial.suggest_categorical("ns_schedule", NS_SCHEDULES)
    coeffs: Any = ns.PUBLIC_QUINTIC
    if kind == "polar-express":
        coeffs = polar_express(steps)
    elif kind == "custom":
        coeffs = converging_quintic(trial.suggest_float("ns_a", 2.5, 4.5), trial.suggest_float("ns_p1", 0.6, 1.0),
                                    trial.suggest_float("ns_dp1", -2.5, 1.0), steps)
    return Config(lr=lr, momentum=momentum, ns_steps=steps, ns_coefficients=coeffs, weight_decay=wd, **keep)


def trial_params(config: Config) -> dict[str, Any]:
    """The schedule params of :func:`search_space` that reproduce ``config``'s Newton–Schulz coefficients (for
    warm starts: the defaults and the AdamW transfer are the public quintic)."""
    sched = ns.schedule(config.ns_coefficients, config.ns_steps)
    if all(t == ns.PUBLIC_QUINTIC for t in sched):
        return {"ns_schedule": "public"}
    if sched == polar_express(config.ns_steps):
        return {"ns_schedule": "polar-express"}
    if len(set(sched)) == 1:
        a, b, c = sched[0]
        return {"ns_schedule": "custom", "ns_a": a, "ns_p1": a + b + c, "ns_dp1": a + 3 * b + 5 * c}
    return {}


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
    trial_params=trial_params,
    refresh_knobs=("ns_steps", "ns_coefficients"), roles=MATRIX_ROLES | {"batched"},
    notes="matrix and conv (flattened) through Muon, batched as a batch of matrices; the rest through AdamW",
)
