"""An MLP classifier on data it generates: 32 features, 10 classes labelled by a fixed random teacher network."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURES, CLASSES = 32, 10
_teacher = torch.nn.Sequential(nn.Linear(FEATURES, 64), nn.Tanh(), nn.Linear(64, CLASSES))
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(7)
    for p in _teacher.parameters():
        torch.nn.init.normal_(p, std=0.5)


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, 128), nn.GELU(), nn.LayerNorm(128),
        nn.Linear(128, 128), nn.GELU(),
        nn.Linear(128, CLASSES),
    )


def _draw(batch_size: int, generator: torch.Generator | None = None):
    x = torch.randn(batch_size, FEATURES, generator=generator)
    with torch.no_grad():
        y = _teacher(x).argmax(-1)
    return x, y


def sample_batch(batch_size: int):
    return _draw(batch_size)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def logits_fn(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0])


def eval_batches():
    g = torch.Generator().manual_seed(0)
    return [_draw(256, g) for _ in range(2)]
