"""Newton–Schulz kernel: the pinned public quintic, the exact singular-value band, and a property test that
output singular values land in the band the schedule promises."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from precondtune.optim.kernels import newton_schulz as ns

SLIDE_TYPO = (3.1415, 4.7750, 2.0315)  # papers/002 prints this; see papers/README.md errata


def test_public_quintic_is_pinned_and_matches_torch_default():
    from torch.optim import _muon

    assert ns.PUBLIC_QUINTIC == (3.4445, -4.7750, 2.0315)
    assert ns.PUBLIC_QUINTIC == (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C)
    assert ns.DEFAULT_STEPS == _muon.DEFAULT_NS_STEPS
    from precondtune.optim.muon import Config

    assert Config().ns_coefficients == ns.PUBLIC_QUINTIC


def test_slide_coefficients_do_not_orthogonalize():
    torch.manual_seed(0)
    g = torch.randn(32, 64)
    good = torch.linalg.svdvals(ns.newton_schulz(g, ns.PUBLIC_QUINTIC, 5, dtype=torch.float32))
    assert 0.5 < float(good.min()) and float(good.max()) < 1.25
    bad = torch.linalg.svdvals(ns.newton_schulz(g.double(), SLIDE_TYPO, 2, dtype=torch.float64))
    # p(1) ≈ 9.95 and p is increasing: singular values spread out and grow instead of approaching 1
    assert float(bad.max()) > 5 and float(bad.max() / bad.min()) > 10
    assert ns.singular_value_band(SLIDE_TYPO, 5, 1e-3)[1] == math.inf
    lo, hi = ns.singular_value_band(ns.PUBLIC_QUINTIC, 5, 1e-2)
    assert 0.6 < lo < 0.7 and 1.1 < hi < 1.2


def test_band_is_exact_against_a_dense_grid():
    for sched, steps, lower in [(ns.PUBLIC_QUINTIC, 5, 1e-3), (ns.PUBLIC_QUINTIC, 3, 0.05),
                                ((1.5, -0.5, 0.0), 8, 0.01),
                                ([(4.0, -5.0, 2.0), (3.4445, -4.7750, 2.0315), (1.875, -1.25, 0.375)], 3, 0.02)]:
        xs = np.linspace(lower, 1.0, 400_001)
        ys = np.abs(ns.apply_polynomial(sched, steps, xs))
        lo, hi = ns.singular_value_band(sched, steps, lower)
        assert lo <= ys.min() + 1e-12 and ys.max() <= hi + 1e-12
        assert ys.min() - lo < 1e-6 and hi - ys.max() < 1e-6


def test_schedule_validation_names_the_problem():
    assert ns.schedule((1.0, 2.0, 3.0), 2) == ((1.0, 2.0, 3.0),) * 2
    with pytest.raises(ValueError, match="ns_steps=3"):
        ns.schedule([(1, 2, 3), (1, 2, 3)], 3)
    with pytest.raises(ValueError, match="three numbers"):
        ns.schedule((1.0, 2.0), 5)


def test_tall_wide_and_batched_agree_with_per_matrix():
    torch.manual_seed(0)
    g = torch.randn(3, 2, 24, 10)
    out = ns.newton_schulz(g, dtype=torch.float32)
    assert out.shape == g.shape
    for idx in [(0, 0), (2, 1)]:
        single = ns.newton_schulz(g[idx], dtype=torch.float32)
        torch.testing.assert_close(out[idx], single, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ns.newton_schulz(g[idx].T, dtype=torch.float32), single.T, rtol=1e-5, atol=1e-5)


def test_flops_formula_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    for shape in [(16, 16), (8, 20), (20, 8), (3, 6, 10)]:
        with FlopCounterMode(display=False) as fc:
            ns.newton_schulz(torch.randn(*shape), steps=4, dtype=torch.float32)
        assert fc.get_total_flops() == ns.flops(shape, 4)
    d, t = 16, 5
    assert ns.flops((d, d), t) == 6 * t * d ** 3


def _matrix(rows: int, cols: int, cond: float, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, float]:
    """A random matrix with log-spaced singular values from 1 down to 1/cond; returns it and its normalised
    smallest singular value σ_min/‖G‖_F."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)
    g = (u * s) @ v.T
    return g.to(dtype), float(s.min() / s.norm())


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 48), cols=st.integers(2, 48), log_cond=st.floats(0.0, 2.0),
       seed=st.integers(0, 2**16), steps=st.integers(3, 7))
def test_singular_values_land_in_the_promised_band(rows, cols, log_cond, seed, steps):
    g, lower = _matrix(rows, cols, 10 ** log_cond, seed)
    lo, hi = ns.singular_value_band(ns.PUBLIC_QUINTIC, steps, lower)
    s32 = torch.linalg.svdvals(ns.newton_schulz(g.float(), ns.PUBLIC_QUINTIC, steps, dtype=torch.float32).double())
    assert float(s32.min()) >= lo - 2e-3 and float(s32.max()) <= hi + 2e-3, (lo, hi, s32)
    sbf = torch.linalg.svdvals(ns.newton_schulz(g.float(), ns.PUBLIC_QUINTIC, steps).double())
    # bf16 has an 8-bit significand: each step's products carry ~0.4% relative error, which the steep quintic
    # (slope 3.4 near 0) amplifies; 0.1 absolute covers it with margin for these sizes.
    assert float(sbf.min()) >= lo - 0.1 and float(sbf.max()) <= hi + 0.1, (lo, hi, sbf)
