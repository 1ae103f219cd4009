"""Newton–Schulz coefficient schedules: the promised band is exact, tighter than the public quintic's and Polar
Express's, and holds on random matrices through Muon's own kernel in fp32 and bf16."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import precondtune
from precondtune import ns_coefficients as nc
from precondtune.cli import app
from precondtune.optim.kernels import newton_schulz as ns

runner = CliRunner()
POLAR_EXPRESS_BAND = (0.85, 1.14)  # arXiv 2505.16932, 5 steps, σ ≥ 1e-3 (as quoted in the issue)


@pytest.fixture(scope="module")
def schedules():
    return {dt: nc.design(5, 1e-3, headroom=nc.HEADROOM[dt]) for dt in nc.HEADROOM}


def test_band_beats_public_quintic_and_polar_express(schedules):
    public = ns.singular_value_band(ns.PUBLIC_QUINTIC, 5, 1e-3)
    assert public[0] == pytest.approx(0.47, abs=0.01) and public[1] == pytest.approx(1.20, abs=0.01)
    for sched in schedules.values():
        lo, hi = sched.band
        assert lo > POLAR_EXPRESS_BAND[0] and hi < POLAR_EXPRESS_BAND[1], sched.band
        assert max(1 - lo, hi - 1) < max(1 - public[0], public[1] - 1) / 3


def test_band_is_exact_on_a_dense_grid(schedules):
    sched = schedules["bf16"]
    x = torch.logspace(-3, 0, 200_001, dtype=torch.float64)
    y = ns.apply_polynomial(sched.coefficients, 5, x)
    lo, hi = sched.band
    assert float(y.min()) >= lo - 1e-12 and float(y.max()) <= hi + 1e-12
    assert float(y.min()) == pytest.approx(lo, abs=1e-6) and float(y.max()) == pytest.approx(hi, abs=1e-6)


@pytest.mark.parametrize("r", [1e-3, 0.05, 0.5, 0.9])
def test_minimax_step_equioscillates(r):
    (a, b, c), err = nc.minimax_quintic(r, 1.0)
    x = torch.linspace(r, 1.0, 100_001, dtype=torch.float64)
    dev = (1 - (a * x + b * x ** 3 + c * x ** 5)).abs()
    assert float(dev.max()) == pytest.approx(err, rel=1e-6)
    # a worse polynomial exists nearby: perturbing a coefficient raises the max deviation (it is a minimum)
    for da in (1e-3, -1e-3):
        worse = (1 - ((a + da) * x + b * x ** 3 + c * x ** 5)).abs().max()
        assert float(worse) > err


def test_observed_band_fp32_matches_exact_band(schedules):
    sched = schedules["fp32"]
    lo, hi = nc.observed_band(sched.coefficients, 5, 1e-3, dtype="fp32")
    assert sched.band[0] - 1e-3 <= lo <= sched.band[0] + 0.02
    assert sched.band[1] - 0.02 <= hi <= sched.band[1] + 1e-3


def test_observed_band_bf16_holds_and_beats_public(schedules):
    sched = schedules["bf16"]
    lo, hi = nc.observed_band(sched.coefficients, 5, 1e-3, dtype="bf16")
    p_lo, p_hi = nc.observed_band(ns.PUBLIC_QUINTIC, 5, 1e-3, dtype="bf16")
    # bf16 rounds at 2⁻⁸: the top stays within the band + 0.005, the smallest directions lose a few hundredths
    assert hi <= sched.band[1] + 5e-3
    assert lo >= sched.band[0] - 0.06
    assert lo > p_lo + 0.3 and hi < p_hi - 0.05


def test_headroom_is_what_keeps_bf16_stable():
    bare = nc.design(5, 1e-3, headroom=1.0)
    _, hi = nc.observed_band(bare.coefficients, 5, 1e-3, dtype="bf16")
    assert hi > bare.band[1] + 0.1  # without headroom, bf16 rounding lands on the polynomial's steep flank


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(8, 48), cols=st.integers(8, 48), decades=st.floats(0.5, 3.0), seed=st.integers(0, 99))
def test_kernel_singular_values_lie_in_band_fp32(rows, cols, decades, seed):
    sched = nc.design(5, 1e-3, headroom=nc.HEADROOM["fp32"])
    lower = 10 ** -decades
    spectrum = nc.unit_frobenius_spectrum(min(rows, cols), lower, 0.95)
    g = nc.random_matrix(rows, cols, spectrum, torch.Generator().manual_seed(seed))
    out = ns.newton_schulz(g.float(), sched.coefficients, 5, dtype=torch.float32).double()
    s = torch.linalg.svdvals(out)
    lo, hi = ns.singular_value_band(sched.coefficients, 5, float(spectrum.min()))
    assert float(s.min()) >= lo - 2e-3 and float(s.max()) <= hi + 2e-3


def test_bad_arguments_are_rejected():
    with pytest.raises(precondtune.ConfigError, match="lower"):
        nc.design(5, 1.5)
    with pytest.raises(precondtune.ConfigError, match="steps"):
        nc.design(0, 1e-3)
    with pytest.raises(precondtune.ConfigError, match="headroom"):
        nc.design(5, 1e-3, headroom=0.9)


def test_cli_writes_a_muon_config_that_trains(tmp_path):
    out = tmp_path / "ns.yaml"
    r = runner.invoke(app, ["ns-coefficients", "--steps", "5", "--lower", "1e-3", "--dtype", "bf16",
                            "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc["ns_coefficients"]) == 5 and all(len(t) == 3 for t in doc["ns_coefficients"])
    assert doc["band"][0] > 0.85 and doc["band"][1] < 1.14
    assert doc["public_band"][0] == pytest.approx(0.4705, abs=1e-3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = precondtune.build_optimizer(model, out)
    muon = next(p for p in opt.parts if type(p).__name__ == "Muon")
    sched = muon.group_config(muon.param_groups[0]).ns_coefficients
    assert [list(t) for t in sched] == doc["ns_coefficients"]
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(b, p) and torch.isfinite(p).all() for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("args", [["--lower", "2"], ["--lower", "abc"], ["--steps", "0"], ["--headroom", "3"],
                                  ["--lower", "0.98"]])  # no unit-Frobenius matrix of rank >= 2 has all sigma >= 0.98
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, args):
    out = tmp_path / "ns.yaml"
    r = runner.invoke(app, ["ns-coefficients", *args, "--out", str(out)])
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, needle", [
    (["--lower", "0.5"], "reach below --lower"),  # possible for rank 2, not for the weight-sized check matrices
    (["--steps", "1"], "1 step(s) cannot bring every singular value in [0.001, 1] near 1"),
    (["--lower", "1e-12"], "raise --steps or --lower"),
    ([], None),  # the defaults: nothing to note
])
def test_what_the_band_does_not_show_is_noted(args, needle):
    r = runner.invoke(app, ["ns-coefficients", *args, "--json"])
    assert r.exit_code == 0, r.output
    notes = json.loads(r.stdout)["notes"]
    assert (notes == []) if needle is None else any(needle in n for n in notes), notes
