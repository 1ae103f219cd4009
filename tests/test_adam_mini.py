"""Adam-mini: reduces to AdamW on one-element blocks; blocks follow module structure (arXiv 2406.16793)."""
from __future__ import annotations

import pytest
import torch
from conftest import load_example, measured_state_bytes
from torch import nn

import precondtune.optim as po
from precondtune.errors import ConfigError
from precondtune.optim import adam_mini


def _step(model: nn.Module, opt: torch.optim.Optimizer, loss_of, steps: int = 2) -> None:
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of().backward()
        opt.step()


def test_one_element_blocks_equal_adamw_in_float64():
    # (n, 1) matrices are neuron-wise with one element per row; a (1,) vector is one block of one element
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 1), (5, 1), (1,)]
    a = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    b = [p.detach().clone().requires_grad_() for p in a]
    hp = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    ours = po.build("adam-mini", a, **hp)
    ref = torch.optim.AdamW(b, foreach=False, **hp)
    for _ in range(6):
        for x, y in zip(a, b):
            grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x.grad, y.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)
    assert [ours.state[p]["exp_avg_sq"].numel() for p in a] == [7, 5, 1]


class _Attention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 4, vocab: int = 11) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc = nn.Linear(d, 2 * d)
        self.norm = nn.LayerNorm(2 * d)
        self.out = nn.Linear(2 * d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.out(self.norm(self.fc(x)))


def test_blocks_follow_module_structure_on_multihead_attention():
    torch.manual_seed(0)
    model = _Attention(d=16, heads=4, vocab=11)
    opt = po.build("adam-mini", model, betas=(0.9, 0.5))
    idx = torch.randint(0, 11, (3, 5))
    model.zero_grad()
    model(idx).logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    v = {n: opt.state[p]["exp_avg_sq"] for n, p in model.named_parameters()}
    counts = {n: t.numel() for n, t in v.items()}
    assert counts == {
        "tok.weight": 11,                     # token-wise
        "attn.in_proj_weight": 2 * 4 + 16,    # q, k head-wise (4 heads each), v neuron-wise (16 rows)
        "attn.in_proj_bias": 1,               # vectors: one block per tensor
        "attn.out_proj.weight": 16,           # neuron-wise
        "attn.out_proj.bias": 1,
        "fc.weight": 32, "fc.bias": 1, "norm.weight": 1, "norm.bias": 1,
        "out.weight": 11, "out.bias": 1,      # head: token-wise
    }
    # after one step v = (1 − β2)·mean(g²) over each block: check the head-wise and neuron-wise slices
    g = grads["attn.in_proj_weight"]
    q_head1 = g[4:8].pow(2).mean()            # rows of the second query head (head dim 16/4 = 4)
    k_head0 = g[16:20].pow(2).mean()
    v_row3 = g[32 + 3].pow(2).mean()
    got = v["attn.in_proj_weight"]
    torch.testing.assert_close(got[1], 0.5 * q_head1)
    torch.testing.assert_close(got[4], 0.5 * k_head0)
    torch.testing.assert_close(got[8 + 3], 0.5 * v_row3)
    assert po.state_bytes("adam-mini", model) == measured_state_bytes(opt)


def test_custom_packed_qkv_is_declared_by_a_routing_rule():
    mf = load_example("chargpt")
    torch.manual_seed(0)
    model = mf.build()
    rule = {"match": "matrix", "name": r"\.qkv\.", "optimizer": "adam-mini",
            "hyperparameters": {"heads": 4, "attention": "qkv"}}
    opt = po.build("adam-mini", model, routing=[rule])
    _step(model, opt, lambda: mf.loss(model, mf.sample_batch(2)))
    qkv = model.blocks[0].qkv.weight                     # (3·64, 64), 4 heads
    assert opt.state[qkv]["exp_avg_sq"].numel() == 2 * 4 + 64
    assert opt.state[model.blocks[0].proj.weight]["exp_avg_sq"].numel() == 64
    assert opt.state[model.head.weight]["exp_avg_sq"].numel() == 128  # tied embedding/head: token-wise
    assert po.state_bytes("adam-mini", model, routing=[rule]) == measured_state_bytes(opt)
    undeclared = po.state_bytes("adam-mini", model)
    declared = po.state_bytes("adam-mini", model, routing=[rule])
    assert undeclared - declared == 2 * (3 * 64 - (2 * 4 + 64)) * 4  # two blocks, 4-byte floats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_bytes_formula(dtype):
    c = adam_mini.Config()
    size = torch.tensor([], dtype=dtype).element_size()
    assert adam_mini.state_bytes((24, 8), dtype, c) == (24 * 8 + 24) * size
    assert adam_mini.state_bytes((8,), dtype, c) == (8 + 1) * size
    declared = adam_mini.Config(heads=2, attention="qkv")
    assert adam_mini.state_bytes((24, 8), dtype, declared) == (24 * 8 + 2 * 2 + 8) * size


def test_bad_declarations_are_refused():
    with pytest.raises(ConfigError, match="heads"):
        po.build("adam-mini", nn.Linear(4, 12), attention="qkv")
    with pytest.raises(ConfigError, match="attention"):
        po.build("adam-mini", nn.Linear(4, 12), heads=2, attention="kqv")
    w = nn.Parameter(torch.randn(12, 4))
    opt = po.build("adam-mini", [w], heads=5, attention="qkv")
    w.grad = torch.randn(12, 4)
    with pytest.raises(ConfigError, match="heads=5"):
        opt.step()


def test_search_space_keeps_declared_structure_and_transfer_is_identity():
    import optuna

    base = adam_mini.Config(lr=1e-3, heads=4, attention="qkv")
    trial = optuna.trial.FixedTrial({"lr": 2e-3, "one_minus_beta1": 0.1, "one_minus_beta2": 0.05,
                                     "weight_decay": 0.1})
    c = adam_mini.search_space(trial, base)
    assert (c.lr, c.heads, c.attention) == (2e-3, 4, "qkv")
    t = adam_mini.from_adamw(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert (t.config.lr, t.config.betas, t.config.weight_decay) == (3e-4, (0.9, 0.95), 0.1)
