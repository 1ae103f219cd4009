"""A small CNN on images it generates: 16×16 stripes at one of 4 orientations, plus noise."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SIZE, CLASSES = 16, 4
NOISE = 3.0  # strong enough that 100 steps do not saturate the task


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, CLASSES),
    )


def _draw(batch_size: int, generator: torch.Generator | None = None):
    y = torch.randint(CLASSES, (batch_size,), generator=generator)
    angle = y.float() * math.pi / CLASSES
    coords = torch.arange(SIZE).float()
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    phase = xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
    images = torch.sin(phase * 1.3) + NOISE * torch.randn(batch_size, SIZE, SIZE, generator=generator)
    return images[:, None], y


def sample_batch(batch_size: int):
    return _draw(batch_size)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def logits_fn(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0])


def eval_batches():
    g = torch.Generator().manual_seed(0)
    return [_draw(128, g) for _ in range(2)]
