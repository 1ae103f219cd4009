"""Muon: step-for-step equality with torch.optim.Muon, scale modes, conv/batched handling, state and FLOPs."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import precondtune.optim as po
from precondtune.errors import ConfigError
from precondtune.inventory import inventory
from precondtune.optim import muon
from precondtune.optim.kernels import newton_schulz as ns


@pytest.mark.parametrize("shape", [(16, 32), (40, 12), (20, 20)])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_step_for_step(shape, adjust, nesterov):
    torch.manual_seed(0)
    ours = nn.Parameter(torch.randn(*shape))
    ref = nn.Parameter(ours.detach().clone())
    opt = po.build("muon", [{"params": [ours]}], lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=nesterov,
                   scale=adjust, ns_steps=5, ns_coefficients=ns.PUBLIC_QUINTIC)
    ref_opt = torch.optim.Muon([ref], lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=nesterov,
                               adjust_lr_fn=adjust, ns_steps=5, ns_coefficients=ns.PUBLIC_QUINTIC)
    for _ in range(6):
        g = torch.randn(*shape)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        # Same operation order and bf16 iteration as torch.optim.Muon: bit-identical in float32.
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[ours]["momentum_buffer"], ref_opt.state[ref]["momentum_buffer"],
                               rtol=0, atol=0)


def test_update_scales():
    assert muon.update_scale(64, 16, "original") == 2.0
    assert muon.update_scale(16, 64, "original") == 1.0
    assert muon.update_scale(16, 64, "match_rms_adamw") == pytest.approx(0.2 * 8)
    assert muon.update_scale(16, 64, "spectral") == 0.5
    # match_rms_adamw makes the update RMS ≈ 0.2 (Moonlight §2.2): an orthogonal m×n matrix has RMS 1/√max.
    torch.manual_seed(0)
    o = ns.newton_schulz(torch.randn(32, 128), dtype=torch.float32) * muon.update_scale(32, 128, "match_rms_adamw")
    assert 0.15 < float(o.pow(2).mean().sqrt()) < 0.25


def test_fp32_iteration_orthogonalizes_more_precisely_than_bf16():
    torch.manual_seed(0)
    g = torch.randn(24, 48)
    c32 = muon.Config(ns_dtype="fp32", ns_steps=10, ns_coefficients=(1.5, -0.5, 0.0))
    buf = torch.zeros_like(g)
    o = muon.muon_update(g, buf, c32)
    assert o.dtype == torch.float32
    # 10 cubic Newton–Schulz steps converge towards UVᵀ (singular values → 1) on a well-conditioned input
    s = torch.linalg.svdvals(o)
    assert float((s - 1).abs().max()) < 0.05


def test_conv_is_flattened_and_batched_is_a_batch_of_matrices():
    torch.manual_seed(0)
    conv = torch.randn(8, 4, 3, 3)
    c = muon.Config(ns_dtype="fp32", momentum=0.0, nesterov=False)
    o = muon.muon_update(conv, torch.zeros_like(conv), c, role="conv")
    flat = ns.newton_schulz(conv.reshape(8, 36), dtype=torch.float32)
    torch.testing.assert_close(o, flat.reshape(8, 4, 3, 3))
    experts = torch.randn(3, 6, 10)
    o = muon.muon_update(experts, torch.zeros_like(experts), c, role="batched")
    for e in range(3):
        torch.testing.assert_close(o[e], ns.newton_schulz(experts[e], dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_routing_and_per_step_schedule():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = po.build("muon", model, ns_steps=2, ns_coefficients=[[3.4445, -4.775, 2.0315], [1.5, -0.5, 0.0]])
    parts = {type(p).__name__: p for p in opt.parts}
    muon_params = {id(p) for g in parts["Muon"].param_groups for p in g["params"]}
    assert muon_params == {id(model[1].weight)}
    assert parts["Muon"].param_groups[0]["ns_coefficients"] == ((3.4445, -4.775, 2.0315), (1.5, -0.5, 0.0))
    with pytest.raises(ConfigError, match="ns_steps"):
        po.build("muon", model, ns_steps=3, ns_coefficients=[[3.4445, -4.775, 2.0315], [1.5, -0.5, 0.0]])
    with pytest.raises(ConfigError, match="scale"):
        po.build("muon", model, scale="rms")


def test_state_bytes_and_step_flops_match_a_real_step():
    model = nn.Sequential(nn.Linear(12, 24), nn.Linear(24, 24), nn.Conv2d(3, 4, 3), nn.Linear(24, 5))
    infos = {i.name: i for i in inventory(model)}
    opt = po.build("muon", [{"params": [model[1].weight], "role": "matrix"},
                            {"params": [model[2].weight], "role": "conv"}], ns_dtype="fp32")
    for p in (model[1].weight, model[2].weight):
        p.grad = torch.randn_like(p)
    with FlopCounterMode(display=False) as fc:
        opt.step()
    c = muon.Config(ns_dtype="fp32")
    expected = sum(muon.step_flops(infos[n].shape, c, infos[n]).matmul for n in ("1.weight", "2.weight"))
    assert fc.get_total_flops() == expected
    assert expected == 5 * 6 * 24 ** 3 + ns.flops((4, 27), 5)  # d×d with T steps: 6·T·d³
    measured = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert measured == sum(muon.state_bytes(tuple(p.shape), p.dtype, c) for p in (model[1].weight, model[2].weight))
    batched = muon.step_flops((3, 6, 10), c, type("I", (), {"role": "batched"})())
    assert batched.matmul == 3 * 5 * (4 * 36 * 10 + 2 * 6 ** 3)


def test_from_adamw_uses_moonlight_rule():
    t = muon.from_adamw(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert (t.config.lr, t.config.weight_decay, t.config.scale) == (3e-4, 0.1, "match_rms_adamw")
    assert "2502.16982" in t.source


def test_search_space_with_fixed_trial():
    import optuna

    cfg = muon.search_space(optuna.trial.FixedTrial({"lr": 0.01, "one_minus_momentum": 0.05, "ns_steps": 5,
                                                      "weight_decay": 0.0, "ns_schedule": "public"}))
    assert cfg.lr == 0.01 and math.isclose(cfg.momentum, 0.95) and cfg.ns_coefficients == ns.PUBLIC_QUINTIC


def _space(**params):
    import optuna

    base = {"lr": 0.02, "one_minus_momentum": 0.05, "weight_decay": 0.0, "ns_steps": 5, "ns_schedule": "public"}
    return muon.search_space(optuna.trial.FixedTrial({**base, **params}))


def test_the_public_quintic_is_the_shape_it_is_searched_by():
    a, b, c = muon.quintic_from_shape(3.4445, 3.4445 - 4.7750 + 2.0315, 3.4445 - 3 * 4.7750 + 5 * 2.0315)
    assert (a, b, c) == pytest.approx(ns.PUBLIC_QUINTIC, abs=1e-12)


@pytest.mark.parametrize("steps", [4, 5, 6])
def test_every_searched_newton_schulz_schedule_converges(steps):
    rng = np.random.default_rng(steps)
    shapes = [(2.5, 0.6, -2.5), (4.5, 1.0, 1.0), (2.5, 1.0, 1.0), (4.5, 0.6, -2.5)]
    shapes += [tuple(rng.uniform([2.5, 0.6, -2.5], [4.5, 1.0, 1.0])) for _ in range(40)]
    projected = 0
    for a, p1, dp1 in shapes:
        cfg = _space(ns_steps=steps, ns_schedule="custom", ns_a=a, ns_p1=p1, ns_dp1=dp1)
        lo, hi = ns.singular_value_band(cfg.ns_coefficients, steps, muon.NS_LOWER)
        assert muon.NS_BAND[0] <= lo and hi <= muon.NS_BAND[1], (a, p1, dp1, cfg.ns_coefficients)
        target = muon.quintic_from_shape(a, p1, dp1)
        if muon.converges(target, steps):
            assert cfg.ns_coefficients == pytest.approx(target)  # a convergent quintic is used as sampled
        else:
            projected += 1
    assert 0 < projected < len(shapes)  # the box holds both kinds, so the projection is exercised
    for kind in ("public", "polar-express"):
        cfg = _space(ns_steps=steps, ns_schedule=kind)
        assert muon.converges(cfg.ns_coefficients, steps)
        assert muon.trial_params(cfg) == {"ns_schedule": kind}
    # a diverging quintic (the slides' misprint) is not what the search would run
    assert not muon.converges((3.1415, 4.7750, 2.0315), steps)


def test_polar_express_is_the_designed_per_step_schedule():
    from precondtune.ns_coefficients import HEADROOM, design

    cfg = _space(ns_schedule="polar-express")
    assert cfg.ns_coefficients == design(5, 1e-3, headroom=HEADROOM["bf16"]).coefficients
    assert len(cfg.ns_coefficients) == 5 and cfg.ns_coefficients[0] != cfg.ns_coefficients[-1]


def test_warm_starts_record_the_schedule_params_of_their_config():
    from precondtune.search import Knobs

    knobs = Knobs.of(muon.SPEC)
    assert {"ns_schedule", "ns_a", "ns_p1", "ns_dp1"} <= set(knobs.params)
    assert knobs.params_of(muon.Config())["ns_schedule"] == "public"
    custom = muon.Config(ns_coefficients=(3.5, -4.9, 2.1))
    params = knobs.params_of(custom)
    assert params["ns_schedule"] == "custom" and params["ns_a"] == 3.5
    assert muon.quintic_from_shape(params["ns_a"], params["ns_p1"], params["ns_dp1"]) == pytest.approx((3.5, -4.9, 2.1))


def test_a_compiled_step_does_not_recompile_on_every_hyperparameter():
    """torch.compile(opt.step): the per-group hyperparameter validation runs eagerly instead of guarding on each
    value, which hit dynamo's recompile limit within a few steps."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = po.build("muon", model)
    step = torch.compile(opt.step, backend="eager")
    x = torch.randn(8, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            opt.zero_grad()
            model(x).square().mean().backward()
            step()
    breaks = [*counters["unimplemented"], *counters["graph_break"]]
    torch._dynamo.reset()
    assert not [b for b in breaks if "recompile limit" in b.lower()], breaks
    # dynamo traced into a functools.cache wrapper and warned of "silent incorrectness" on every user's first step
    ours = ("precondtune", "registry.py", "lru_cache")
    assert not [w for w in caught if any(k in str(w.message) or k in w.filename for k in ours)], \
        [str(w.message) for w in caught]
