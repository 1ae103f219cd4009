"""Parameter roles by module type and shape; tied weights once; meta models without allocation."""
from __future__ import annotations

import torch
from conftest import load_example
from torch import nn

from precondtune.inventory import count_parameters, inventory, role_counts


def _roles(model: nn.Module) -> dict[str, str]:
    return {i.name: i.role for i in inventory(model)}


def test_chargpt_roles_and_tied_head_counted_once():
    model = load_example("chargpt").build()
    roles = _roles(model)
    assert roles["tok.weight"] == "head"  # tied to the output projection: a head, counted once
    assert "head.weight" not in roles
    assert roles["pos.weight"] == "embedding"
    for k in range(2):
        for lin in ("qkv", "proj", "fc", "out"):
            assert roles[f"blocks.{k}.{lin}.weight"] == "matrix"
            assert roles[f"blocks.{k}.{lin}.bias"] == "vector"
        assert roles[f"blocks.{k}.ln1.weight"] == "vector"
    tied = next(i for i in inventory(model) if i.name == "tok.weight")
    assert tied.tied_names == ("head.weight",)
    total, trainable = count_parameters(model)
    assert total == trainable == sum(p.numel() for p in model.parameters())  # parameters() dedups ties too
    assert total < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))


def test_untied_head_is_head():
    model = load_example("llama7b_meta").build()
    roles = _roles(model)
    assert roles["lm_head.weight"] == "head"
    assert roles["embed_tokens.weight"] == "embedding"
    assert roles["layers.0.attn.q_proj.weight"] == "matrix"
    assert roles["layers.31.down_proj.weight"] == "matrix"
    assert roles["layers.0.attn_norm.weight"] == "vector"
    counts = role_counts(inventory(model))
    assert counts["head"] == counts["embedding"] == 32000 * 4096
    assert sum(counts.values()) == 6_738_415_616


def test_mlp_and_cnn_roles():
    mlp = _roles(load_example("mlp").build())
    assert mlp == {"0.weight": "matrix", "0.bias": "vector", "2.weight": "vector", "2.bias": "vector",
                   "3.weight": "matrix", "3.bias": "vector", "5.weight": "head", "5.bias": "vector"}
    cnn = _roles(load_example("cnn").build())
    assert cnn["0.weight"] == "conv" and cnn["4.weight"] == "conv"
    assert cnn["1.weight"] == "vector"  # BatchNorm scale
    assert cnn["9.weight"] == "matrix" and cnn["11.weight"] == "head"


def test_batched_and_multihead_attention():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, 8, 16))
            self.attn = nn.MultiheadAttention(16, 4)
            self.out = nn.Linear(16, 3)

    infos = {i.name: i for i in inventory(Experts())}
    assert infos["w"].role == "batched"
    assert infos["attn.in_proj_weight"].role == "matrix"
    assert infos["attn.in_proj_weight"].extra == {"heads": 4, "attention": "in_proj"}
    assert infos["attn.out_proj.weight"].role == "matrix"
    assert infos["out.weight"].role == "head"


def test_frozen_parameters_are_not_trainable():
    model = load_example("mlp").build()
    model[0].weight.requires_grad_(False)
    total, trainable = count_parameters(model)
    assert total - trainable == 32 * 128
    assert "0.weight" not in _roles(model)


def test_meta_model_inventory_allocates_nothing():
    model = load_example("llama7b_meta").build()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len(inventory(model)) == 3 + 32 * 9  # embed, final norm, head + 9 per layer
