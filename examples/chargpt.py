"""A character-level GPT trained on the Python standard library's own source code.

The text ships with every Python installation, so this example needs no download. The model is small
(~0.1M parameters, 2 layers, d=64) so hundreds of steps run in about a minute on 2 CPU cores.
Follows precondtune's model-file contract: build_model, sample_batch, loss_fn, eval_batches, logits_fn.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 128  # ASCII; other characters map to '?'
BLOCK = 64
CONFIG = dict(n_layer=2, n_head=4, d_model=64)
SOURCES = ("argparse.py", "dataclasses.py", "functools.py", "inspect.py", "typing.py", "textwrap.py")


@functools.cache
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    root = Path(os.__file__).parent
    text = "".join((root / name).read_text(encoding="utf-8", errors="replace") for name in SOURCES)
    ids = torch.tensor([c if c < VOCAB else ord("?") for c in text.encode("ascii", errors="replace")],
                       dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, n_layer: int = 2, n_head: int = 4, d_model: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(BLOCK, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases (so the first loss is about ln(vocab))."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_model() -> nn.Module:
    return GPT(**CONFIG)


def _batch(ids: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
    ix = torch.randint(len(ids) - BLOCK - 1, (batch_size,), generator=generator)
    x = torch.stack([ids[i:i + BLOCK] for i in ix])
    y = torch.stack([ids[i + 1:i + BLOCK + 1] for i in ix])
    return x, y


def sample_batch(batch_size: int):
    return _batch(_data()[0], batch_size)


def logits_fn(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0])


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def eval_batches():
    g = torch.Generator().manual_seed(0)
    return [_batch(_data()[1], 32, g) for _ in range(4)]
