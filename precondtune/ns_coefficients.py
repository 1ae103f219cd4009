"""Per-step Newton–Schulz coefficient schedules: greedy minimax odd quintics (Polar Express, arXiv 2505.16932).

Muon orthogonalizes X (normalised so σ ≤ 1) by T steps of X ← aₜX + bₜ(XXᵀ)X + cₜ(XXᵀ)²X, i.e. it applies
p_T ∘ … ∘ p_1 with pₜ(σ) = aₜσ + bₜσ³ + cₜσ⁵ to every singular value. Given the interval [ℓₜ, uₜ] the singular
values lie in before step t, the step picks the odd quintic that minimises max |1 − p(σ)| over that interval
(a Remez exchange on the four equioscillation points ℓ, x₁, x₂, u) and the next interval is the image
[min p, max p]. Amsel et al. (arXiv 2505.16932, Thm. 4.1) show this greedy choice is optimal for the whole
composition. Each step is designed for [ℓₜ, h·uₜ] with a headroom factor h > 1, so rounding that pushes a
singular value slightly above uₜ lands where the polynomial is still ≈ 1 instead of on its steep outer flank
(with h = 1 the iteration blows up in bf16; the tests show it). The resulting worst-case band over
[lower, 1] is exact (:func:`precondtune.optim.kernels.newton_schulz.singular_value_band`), and
:func:`observed_band` checks it on random matrices in fp32 and bf16.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .dtypes import dtype_name, parse_dtype
from .errors import ConfigError
from .optim.kernels import newton_schulz as ns

Coefficients = tuple[float, float, float]

HEADROOM = {"fp32": 1.002, "bf16": 1.01}
"""Default headroom h per dtype: bf16 rounds at 2⁻⁸ relative, and h = 1.01 keeps the composed map ≈ 1 there
(h = 1 diverges in bf16); fp32 needs only a sliver. Both measured by :func:`observed_band` (tests)."""

CLASSIC_QUINTIC: Coefficients = (15 / 8, -10 / 8, 3 / 8)
"""The classic Newton–Schulz quintic (p(1) = 1, p'(1) = p''(1) = 0); used once the interval has collapsed
to within 1e-9 of 1, where the minimax system is singular and this polynomial is already optimal."""


@dataclass(frozen=True)
class Schedule:
    """A per-step coefficient schedule and the singular-value band it promises over [lower, 1]."""

    coefficients: tuple[Coefficients, ...]
    lower: float
    headroom: float
    band: tuple[float, float]

    @property
    def steps(self) -> int:
        return len(self.coefficients)

    def hyperparameters(self, dtype: str = "bf16") -> dict[str, object]:
        """The Muon hyperparameters (``precondtune.optim.muon.Config``) that use this schedule."""
        return {"ns_steps": self.steps, "ns_coefficients": [list(c) for c in self.coefficients],
                "ns_dtype": dtype}


def minimax_quintic(lo: float, hi: float, *, iterations: int = 100) -> tuple[Coefficients, float]:
    """The odd quintic p minimising max_{σ∈[lo, hi]} |1 − p(σ)|, and that error E.

    Remez exchange on 4 reference points lo < x₁ < x₂ < hi with p = 1 ∓ E alternating (p(lo) = 1 − E,
    p(hi) = 1 + E); x₁, x₂ are the critical points of p, the roots of p'(x) = a + 3bx² + 5cx⁴ (a quadratic
    in x²). Solved on [lo/hi, 1] and rescaled: p(x) = q(x/hi), so a = α/hi, b = β/hi³, c = γ/hi⁵.
    """
    if not 0 < lo <= hi:
        raise ConfigError(f"need 0 < lower <= upper; got {lo}, {hi}")
    r = lo / hi
    if 1 - r < 1e-9:
        a, b, c = CLASSIC_QUINTIC
        return (a / hi, b / hi ** 3, c / hi ** 5), 0.0
    pts = np.array([r, r + 0.3 * (1 - r), r + 0.75 * (1 - r), 1.0])
    signs = np.array([1.0, -1.0, 1.0, -1.0])
    coef = np.zeros(4)
    for _ in range(iterations):
        system = np.stack([pts, pts ** 3, pts ** 5, signs], axis=1)
        coef = np.linalg.solve(system, np.ones(4))
        a, b, c, _e = coef
        disc = 9 * b * b - 20 * a * c
        if c == 0 or disc < 0:
            break
        ys = sorted(((-3 * b - math.sqrt(disc)) / (10 * c), (-3 * b + math.sqrt(disc)) / (10 * c)))
        if ys[0] <= 0:
            break
        new = np.array([r, min(max(math.sqrt(ys[0]), r), 1.0), min(max(math.sqrt(ys[1]), r), 1.0), 1.0])
        if np.max(np.abs(new - pts)) < 1e-15:
            break
        pts = new
    a, b, c, e = (float(x) for x in coef)
    return (a / hi, b / hi ** 3, c / hi ** 5), abs(e)


def design(steps: int, lower: float, *, headroom: float = HEADROOM["bf16"]) -> Schedule:
    """The greedy per-step minimax schedule for σ ∈ [lower, 1] (module docstring), each step with headroom."""
    if not (isinstance(steps, int) and 1 <= steps <= 20):
        raise ConfigError(f"--steps {steps} is out of range; allowed: an integer in [1, 20]")
    if not 0 < lower < 1:
        raise ConfigError(f"--lower {lower} is out of range; allowed: (0, 1), e.g. 1e-3")
    if not 1 <= headroom <= 1.5:
        raise ConfigError(f"--headroom {headroom} is out of range; allowed: [1, 1.5], e.g. 1.01")
    lo, hi = lower, 1.0
    out: list[Coefficients] = []
    for _ in range(steps):
        coeffs, _err = minimax_quintic(lo, hi * headroom)
        out.append(coeffs)
        lo, hi = ns.singular_value_band([coeffs], 1, lo, hi)
    schedule = tuple(out)
    return Schedule(schedule, lower, headroom, ns.singular_value_band(schedule, steps, lower))


def unit_frobenius_spectrum(k: int, lower: float, top: float) -> torch.Tensor:
    """k singular values with ‖σ‖₂ = 1, so Muon's Frobenius normalisation leaves them as they are: the largest
    is ``top``, the other k−1 log-spaced in [lower, cap] with cap found by bisection to make up the unit norm."""
    target = 1 - top * top

    def rest(cap: float) -> torch.Tensor:
        return torch.logspace(math.log10(lower), math.log10(cap), k - 1, dtype=torch.float64)

    lo_cap, hi_cap = lower, top
    for _ in range(60):
        mid = math.sqrt(lo_cap * hi_cap)
        lo_cap, hi_cap = (mid, hi_cap) if float((rest(mid) ** 2).sum()) < target else (lo_cap, mid)
    values = rest(lo_cap)
    values = values * math.sqrt(target / float((values ** 2).sum()))  # a sliver; exact unit norm
    return torch.cat([torch.tensor([math.sqrt(1 - float((values ** 2).sum()))], dtype=torch.float64), values])


TOPS = (0.99, 0.9, 0.7)
"""Largest normalised singular value of the test matrices: near 1 (one dominant direction) down to a spread
spectrum, so the checked singular values cover [lower, 0.99]."""


def random_matrix(rows: int, cols: int, spectrum: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A float64 matrix with Haar-random singular vectors and the given singular values."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))
    return (u * spectrum) @ v.T


SHAPES = ((64, 64), (96, 48), (48, 160), (128, 128))
"""Matrix shapes :func:`observed_band` checks: square, tall and wide."""


def observed_band(coefficients: Sequence[Sequence[float]] | Sequence[float], steps: int, lower: float, *,
                  dtype: str | torch.dtype = "fp32", shapes: Sequence[tuple[int, int]] = SHAPES,
                  seed: int = 0) -> tuple[float, float]:
    """The range of output singular values Muon's own Newton–Schulz kernel produces, in ``dtype``, on random
    matrices whose normalised singular values span [lower, 0.99] (:func:`unit_frobenius_spectrum`)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = math.inf, 0.0
    for rows, cols in shapes:
        for top in TOPS:
            spectrum = unit_frobenius_spectrum(min(rows, cols), lower, top)
            g = random_matrix(rows, cols, spectrum, gen).to(torch.float32)
            out = ns.newton_schulz(g, coefficients, steps, dtype=parse_dtype(dtype)).to(torch.float64)
            s = torch.linalg.svdvals(out)
            lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
    return lo, hi


@dataclass(frozen=True)
class Report:
    """What ``precondtune ns-coefficients`` shows: the schedule, its exact band, the public quintic's, and the
    bands observed on random matrices."""

    schedule: Schedule
    dtype: str
    public_band: tuple[float, float]
    observed: tuple[float, float]
    public_observed: tuple[float, float]
    notes: tuple[str, ...] = ()
    """What the bands do not show: a --lower no checked matrix can have, a band far from 1."""

    def as_json(self) -> dict[str, object]:
        s = self.schedule
        return {"steps": s.steps, "lower": s.lower, "headroom": s.headroom, "dtype": self.dtype,
                "ns_coefficients": [list(c) for c in s.coefficients], "band": list(s.band),
                "public_quintic": list(ns.PUBLIC_QUINTIC), "public_band": list(self.public_band),
                "observed": {"dtype": self.dtype, "band": list(self.observed),
                             "public_band": list(self.public_observed), "shapes": [list(x) for x in SHAPES]},
                "hyperparameters": s.hyperparameters(self.dtype), "notes": list(self.notes)}

    def recommended_config(self) -> dict[str, object]:
        """A schema-1 recommended config for Muon with this schedule (``precondtune.build_optimizer`` loads it)."""
        s = self.schedule
        return {"schema_version": 1, "optimizer": "muon", "hyperparameters": s.hyperparameters(self.dtype),
                "param_groups": [], "estimates": {},
                "evidence": {"ns_band": list(s.band), "ns_lower": s.lower, "ns_headroom": s.headroom,
                             "ns_observed_band": list(self.observed),
                             "source": "greedy minimax odd quintics (Polar Express, arXiv 2505.16932)"}}


def report(steps: int, lower: float, *, dtype: str = "bf16", headroom: float | None = None,
           seed: int = 0) -> Report:
    """Design a schedule (headroom defaults per dtype, :data:`HEADROOM`) and measure it and the public quintic."""
    name = dtype_name(parse_dtype(dtype))
    if name not in HEADROOM:
        raise ConfigError(f"--dtype {dtype}: Muon's Newton–Schulz runs in {' or '.join(HEADROOM)}")
    if lower >= 2 ** -0.5:  # the k singular values of a unit-Frobenius matrix: the smallest is at most 1/sqrt(k)
        raise ConfigError(f"--lower {lower}: no matrix of rank 2 or more, normalised to unit Frobenius norm as Muon "
                          "does, has every singular value at or above 1/√2 ≈ 0.707; allowed: (0, 0.707), e.g. 1e-3")
    sched = design(steps, lower, headroom=HEADROOM[name] if headroom is None else headroom)
    notes = []
    rank = min(min(shape) for shape in SHAPES)
    if lower > rank ** -0.5:
        notes.append(f"no rank-{rank} matrix normalised to unit Frobenius norm has every singular value at or above "
                     f"{lower:g} (the smallest is at most 1/√{rank} ≈ {rank ** -0.5:.3f}), so the observed matrices, "
                     "like real gradients, reach below --lower, where the exact band promises nothing; for weight "
                     f"matrices use --lower {rank ** -0.5:.2g} or less")
    lo, hi = sched.band
    if lo < 0.5 or hi > 1.5:
        notes.append(f"{steps} step(s) cannot bring every singular value in [{lower:g}, 1] near 1 (band [{lo:.4f}, "
                     f"{hi:.4f}]): raise --steps or --lower")
    return Report(
        schedule=sched, dtype=name,
        public_band=ns.singular_value_band(ns.PUBLIC_QUINTIC, steps, lower),
        observed=observed_band(sched.coefficients, steps, lower, dtype=name, seed=seed),
        public_observed=observed_band(ns.PUBLIC_QUINTIC, steps, lower, dtype=name, seed=seed),
        notes=tuple(notes),
    )
