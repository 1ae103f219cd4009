"""``torch.compile(opt.step)`` with inductor gives the eager step's numbers, for every bundled optimizer.

Found this way with torch 2.13.0: inductor rewrote ``p.add_(P @ U, alpha=-lr)`` as an addmm without the alpha, and
a lerp into a fresh zeros state the same way, so AdaDiag's and GaLore's compiled updates came out 1/lr times too
large and SOAP's first Gram statistics 1/(1 − β) times (the kernels' :func:`add_scaled_` and :func:`lerp_` keep the
scale); and a graph break inside Iso's inverse root (a ``float()`` of a tensor) made dynamo resume the loop over
parameters with the wrong state, so one weight's step count stood still while another's moved twice. These tests
hold every optimizer's compiled step to its eager one on a problem whose Gram matrices are full rank (a
rank-deficient gradient leaves an eigenbasis free in its null space, where any rounding difference picks another
basis).
"""
from __future__ import annotations

import shutil

import pytest
import torch

import precondtune.optim as po
from precondtune.optim.kernels import add_scaled_, lerp_
from precondtune.optim.sophia import hessian_step

pytestmark = [
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.skipif(not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")),
                       reason="inductor builds CPU kernels with a C++ compiler and none is installed (.ci/run "
                              "installs g++)"),
]

STEPS = 3
TOLERANCE = 1e-2
"""Of how far the parameters moved. Compiled kernels round differently, and eigen/SVD refreshes amplify that to
about 1e-3 of the move (AdaDiag++ 1.2e-3, SOAP and Shampoo 3e-4 measured); each bug this file was written for
changed it by 70% or more."""
SETTINGS = {
    "muon": {"ns_dtype": "fp32"},  # bf16 Newton–Schulz rounds differently once inductor fuses its ops
    "sophia": {"estimator": "hutchinson"},
    "shampoo": {"grafting": "none"},  # the preconditioned direction itself reaches the parameter update
    # a basis refreshed from this very gradient makes Pᵀ G Q diagonal: Adam then scales rounding noise off the
    # diagonal up to ±1, in eager and compiled runs alike, so the two-sided basis is refreshed every other step
    "adadiag-pp": {"svd_every": 2},
    "soap": {"precondition_frequency": 2},
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 16))


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).square().mean()


def _train(name: str, compiled: bool, **hp: object) -> list[torch.Tensor]:
    model = _model()
    opt = po.build(name, model, **hp)
    step = torch.compile(opt.step, backend="inductor") if compiled else opt.step
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    batch = (x, x.flip(1).tanh())
    for k in range(STEPS):
        opt.zero_grad()
        _loss(model, batch).backward()
        if name == "sophia":
            hessian_step(opt, model, batch, _loss, None, generator=torch.Generator().manual_seed(k))
        step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", [s.name for s in po.specs()])
def test_a_compiled_step_matches_the_eager_step(name):
    spec = po.get_spec(name)
    hp = {**spec.every_step_refresh, **SETTINGS.get(name, {})}  # refreshes run from the second step on
    start = [p.detach().clone() for p in _model().parameters()]
    eager = _train(name, False, **hp)
    compiled = _train(name, True, **hp)
    moved = max((e - s).abs().max().item() for e, s in zip(eager, start))
    gap = max((e - c).abs().max().item() for e, c in zip(eager, compiled))
    assert moved > 0
    assert gap <= TOLERANCE * moved, f"{name}: compiled and eager parameters differ by {gap:.3g} after {STEPS} steps " \
                                f"that moved them by {moved:.3g}"


def test_add_scaled_and_lerp_keep_their_scale_on_a_matrix_product_when_compiled():
    a = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))

    def update(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        add_scaled_(p, a @ a.mT, -1e-3)
        fresh = torch.zeros(8, 8)  # a state's first step: its zeros are made inside the compiled graph
        lerp_(fresh, a @ a.mT, 0.05)
        return p, fresh

    p0 = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    want = update(p0.clone())
    got = torch.compile(update, backend="inductor")(p0.clone())
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)
