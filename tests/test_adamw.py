"""AdamW against ``torch.optim.AdamW`` step for step: both code paths, param groups, closures, dtypes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import precondtune.optim as po
from precondtune.errors import ConfigError
from precondtune.optim.adamw import AdamW

SHAPES = [(16, 8), (8,), (4, 3, 3, 3), (5, 7)]


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def _clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def _run_side_by_side(ours: torch.optim.Optimizer, ref: torch.optim.Optimizer, a: list[torch.Tensor],
                      b: list[torch.Tensor], steps: int = 6, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for x, y in zip(a, b):
            grad = torch.randn(x.shape, generator=g).to(x.dtype)
            x.grad, y.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
def test_matches_torch_adamw_bit_for_bit_in_fp32(foreach):
    a = _params(torch.float32)
    b = _clone(a)
    hp = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    _run_side_by_side(AdamW(a, foreach=foreach, **hp), torch.optim.AdamW(b, foreach=foreach, **hp), a, b)
    for x, y, x0 in zip(a, b, _params(torch.float32)):
        assert torch.equal(x, y)
        assert not torch.equal(x, x0)  # it moved


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
def test_matches_torch_adamw_closely_in_bf16(foreach):
    a = _params(torch.bfloat16)
    b = _clone(a)
    _run_side_by_side(AdamW(a, lr=1e-2, foreach=foreach), torch.optim.AdamW(b, lr=1e-2, foreach=foreach), a, b)
    for x, y in zip(a, b):
        assert x.dtype == torch.bfloat16
        torch.testing.assert_close(x, y, rtol=1.6e-2, atol=1e-2)


def test_param_groups_keep_their_own_hyperparameters():
    a = _params(torch.float32)
    b = _clone(a)

    def groups(ps: list[torch.Tensor]) -> list[dict]:
        return [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.0}, {"params": ps[2:], "betas": (0.5, 0.9)}]

    ours = AdamW(groups(a), lr=1e-3, weight_decay=0.05)
    ref = torch.optim.AdamW(groups(b), lr=1e-3, weight_decay=0.05, foreach=True)
    _run_side_by_side(ours, ref, a, b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert ours.param_groups[0]["lr"] == 1e-2 and ours.param_groups[1]["betas"] == (0.5, 0.9)


def test_closure_is_called_and_its_loss_returned():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    ref_model = nn.Linear(4, 1)
    ref_model.load_state_dict(model.state_dict())
    opt = po.build("adamw", model, lr=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.01)
    calls = 0

    def closure(m: nn.Module = model, o: torch.optim.Optimizer = opt) -> torch.Tensor:
        nonlocal calls
        calls += 1
        o.zero_grad()
        loss = (m(x) - y).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        ref_loss = ref.step(lambda: closure(ref_model, ref))
        assert torch.equal(loss, ref_loss)
    assert calls == 6
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_sparse_gradients_are_refused_with_a_clear_error():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = po.build("adamw", emb)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ConfigError, match="sparse"):
        opt.step()


def test_bad_hyperparameters_name_the_key():
    with pytest.raises(ConfigError, match="betas"):
        po.build("adamw", nn.Linear(2, 2), betas=(0.9, 1.5))
    with pytest.raises(ConfigError, match="momentum"):
        po.build("adamw", nn.Linear(2, 2), momentum=0.9)
