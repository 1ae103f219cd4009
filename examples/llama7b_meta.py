"""A Llama-2-7B-shaped model on the meta device: for planning (memory, FLOPs) only, nothing is allocated.

Shapes from the Llama 2 paper (arXiv 2307.09288): 32 layers, d=4096, 32 heads, SwiGLU FFN 11008,
vocabulary 32000, untied output head, RMSNorm, rotary position embeddings; 6.74B parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONFIG = dict(vocab=32000, d_model=4096, n_layer=32, n_head=32, ffn=11008)
SEQ = 4096


def _rope(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(_rope(q), _rope(k), v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.attn = Attention(d, heads)
        self.gate_proj, self.up_proj = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        h = self.ffn_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, vocab: int, d_model: int, n_layer: int, n_head: int, ffn: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(Layer(d_model, n_head, ffn) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def build_model() -> nn.Module:
    with torch.device("meta"):
        return Llama(**CONFIG)


def sample_batch(batch_size: int):
    ids = torch.randint(CONFIG["vocab"], (batch_size, SEQ + 1))
    return ids[:, :-1], ids[:, 1:]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
