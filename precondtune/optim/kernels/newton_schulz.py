"""Newton–Schulz orthogonalization: X ↦ ≈UVᵀ for X = UΣVᵀ, by an odd matrix polynomial (Muon, arXiv 2502.16982).

One step with coefficients (a, b, c) maps X ← a·X + b·(XXᵀ)X + c·(XXᵀ)²X, i.e. it applies the scalar quintic
p(σ) = a·σ + b·σ³ + c·σ⁵ to every singular value and keeps the singular vectors. After normalising by the
Frobenius norm (so σ ≤ 1), T steps map each singular value σ to p_T ∘ … ∘ p_1(σ);
:func:`singular_value_band` gives the exact range of that composition over [lower, upper], which is the
promise a coefficient schedule makes (Keller Jordan, "Muon", kellerjordan.github.io/posts/muon, 2024).

The public quintic is :data:`PUBLIC_QUINTIC` = (3.4445, −4.7750, 2.0315) (Keller Jordan's Muon and
``torch.optim.Muon``'s default). The PKU slides print (3.1415, 4.7750, 2.0315): a transcription error — that
polynomial has p(1) ≈ 9.95 and blows singular values up instead of pushing them to 1 (tests guard this).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Coefficients = tuple[float, float, float]

PUBLIC_QUINTIC: Coefficients = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic (github.com/KellerJordan/Muon, muon.py), also ``torch.optim.Muon``'s default:
chosen to maximise the slope p'(0) = a while keeping the fixed-point band roughly (0.7, 1.2)."""

DEFAULT_STEPS = 5
"""Five steps, as in Keller Jordan's Muon and ``torch.optim.Muon``."""

DEFAULT_EPS = 1e-7
"""Floor of the Frobenius norm in the normalisation (``torch.optim.Muon``'s and Keller Jordan's value)."""


def schedule(coefficients: Sequence[float] | Sequence[Sequence[float]], steps: int) -> tuple[Coefficients, ...]:
    """The per-step coefficients: one (a, b, c) repeated ``steps`` times, or a per-step list of ``steps`` triples.

    Raises ``ValueError`` naming the problem (wrong triple length, list length different from ``steps``).
    """
    if steps < 1:
        raise ValueError(f"ns_steps={steps} is out of range; allowed: >= 1")
    items = list(coefficients)
    if not items:
        raise ValueError("ns_coefficients is empty; give one (a, b, c) or one per step")
    if all(isinstance(x, (int, float)) for x in items):
        if len(items) != 3:
            raise ValueError(f"ns_coefficients={tuple(items)!r} must be three numbers (a, b, c)")
        triple = (float(items[0]), float(items[1]), float(items[2]))
        return (triple,) * steps
    out = []
    for k, t in enumerate(items):
        t = list(t)  # type: ignore[arg-type]
        if len(t) != 3 or not all(isinstance(x, (int, float)) for x in t):
            raise ValueError(f"ns_coefficients[{k}]={t!r} must be three numbers (a, b, c)")
        out.append((float(t[0]), float(t[1]), float(t[2])))
    if len(out) != steps:
        raise ValueError(f"ns_coefficients has {len(out)} per-step triples but ns_steps={steps}; make them equal")
    return tuple(out)


def newton_schulz(g: Tensor, coefficients: Sequence[float] | Sequence[Sequence[float]] = PUBLIC_QUINTIC,
                  steps: int = DEFAULT_STEPS, *, dtype: torch.dtype = torch.bfloat16,
                  eps: float = DEFAULT_EPS) -> Tensor:
    """Approximately orthogonalize the last two dims of ``g`` (≥2-D; leading dims are a batch of matrices).

    X₀ = G / max(‖G‖_F, eps) (per matrix), then per step A = XXᵀ, B = b·A + c·A², X ← a·X + B·X, computed in
    ``dtype`` on the wide side (a tall matrix is transposed, so XXᵀ is min(rows, cols)² ). Returns a new tensor
    in ``dtype``. For 2-D input the operation order is ``torch.optim.Muon``'s, so both agree bit for bit.

    Matmul FLOPs per step (m = min(rows, cols), n = max): 2m²n (XXᵀ) + 2m³ (A²) + 2m²n (B·X) = 4m²n + 2m³,
    times the batch size; see :func:`flops`.
    """
    if g.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices; got shape {tuple(g.shape)}")
    sched = schedule(coefficients, steps)
    shape = g.shape
    x = g.to(dtype)
    if x.dim() > 3:
        x = x.reshape(-1, shape[-2], shape[-1])
    tall = shape[-2] > shape[-1]
    if tall:
        x = x.mT
    if x.dim() == 2:
        x = x / x.norm().clamp(min=eps)
        for a, b, c in sched:
            gram = x @ x.mT
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, poly, x, beta=a)
    else:
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        for a, b, c in sched:
            gram = x @ x.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
    if tall:
        x = x.mT
    return x.reshape(shape)


def flops(shape: Sequence[int], steps: int = DEFAULT_STEPS) -> int:
    """Matmul FLOPs of :func:`newton_schulz` on ``shape`` as FlopCounterMode counts them.

    steps · batch · (4·m²·n + 2·m³) with m = min(rows, cols), n = max(rows, cols), batch = ∏ shape[:-2];
    a d×d matrix costs 6·T·d³ (the slides' 2T(2nm² + m³), papers/002).
    """
    rows, cols = int(shape[-2]), int(shape[-1])
    m, n = min(rows, cols), max(rows, cols)
    batch = math.prod(int(s) for s in shape[:-2])
    return steps * batch * (4 * m * m * n + 2 * m ** 3)


def apply_polynomial(coefficients: Sequence[float] | Sequence[Sequence[float]], steps: int,
                     x: float | Tensor) -> float | Tensor:
    """The composed scalar map p_T ∘ … ∘ p_1 at ``x`` (a float or a tensor), with p(σ) = aσ + bσ³ + cσ⁵."""
    for a, b, c in schedule(coefficients, steps):
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return x


def _quintic_image(a: float, b: float, c: float, lo: float, hi: float) -> tuple[float, float]:
    """Exact range of p(x) = ax + bx³ + cx⁵ over [lo, hi]: p at the ends and at real critical points inside.

    p'(x) = a + 3b·x² + 5c·x⁴, a quadratic in y = x²; each root y ≥ 0 gives critical points x = ±√y.
    """
    def p(x: float) -> float:
        return x * (a + x * x * (b + c * x * x))

    ys: list[float] = []
    if c != 0:
        disc = 9 * b * b - 20 * a * c
        if disc >= 0:
            r = math.sqrt(disc)
            ys += [(-3 * b + r) / (10 * c), (-3 * b - r) / (10 * c)]
    elif b != 0:
        ys.append(-a / (3 * b))
    candidates = [lo, hi]
    for y in ys:
        if y >= 0:
            for x in (math.sqrt(y), -math.sqrt(y)):
                if lo < x < hi:
                    candidates.append(x)
    values = [p(x) for x in candidates]
    return min(values), max(values)


def singular_value_band(coefficients: Sequence[float] | Sequence[Sequence[float]], steps: int, lower: float,
                        upper: float = 1.0) -> tuple[float, float]:
    """The range [lo, hi] that every output singular value lies in, for inputs with σ ∈ [lower, upper].

    Exact (up to float64 rounding): the image of an interval under a continuous map is an interval, so the
    image of the composition is found step by step from each quintic's values at the interval ends and its
    critical points. An input normalised by its Frobenius norm has σ_max ≤ 1, so ``upper=1`` bounds every
    input; ``lower`` is the smallest normalised singular value one cares about (σ_min/‖G‖_F). Output singular
    values are absolute values of the composed map, so a signed range that crosses 0 gives lo = 0.

    The public quintic, 5 steps: lower = 1e-2 gives about (0.68, 1.13), lower = 1e-3 about (0.47, 1.20) —
    Keller Jordan's "S'ᵢᵢ ~ Uniform(0.5, 1.5)" remark.
    """
    if not 0 <= lower <= upper:
        raise ValueError(f"need 0 <= lower <= upper; got lower={lower}, upper={upper}")
    lo, hi = float(lower), float(upper)
    for a, b, c in schedule(coefficients, steps):
        lo, hi = _quintic_image(a, b, c, lo, hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), math.inf)
    if lo <= 0 <= hi:
        return 0.0, max(-lo, hi)
    return min(abs(lo), abs(hi)), max(abs(lo), abs(hi))
