"""Profile one training step: forward+backward FLOPs (``FlopCounterMode``) and measured step time.

Attention: on CPU, PyTorch's fused SDPA kernel is not in ``FlopCounterMode``'s table and would count as
zero, so counting runs SDPA through its math backend (explicit matmuls, which are counted). A meta-device
model is counted on meta tensors: nothing is allocated.
"""
from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .errors import ConfigError, ModelFileError
from .inventory import count_parameters, inventory, role_counts
from .modelfile import ModelFile, is_meta, move_to, tokens_in

FLOP_METHOD = "torch.utils.flop_counter.FlopCounterMode over forward+backward, SDPA through its math backend"


def resolve_device(device: str, model: nn.Module | None = None) -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; meta models stay on ``meta``; bad names fail clearly."""
    if model is not None and is_meta(model):
        return torch.device("meta")
    device = device.strip().lower()  # CPU, Cuda:0
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu or cuda[:N]") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: use auto, cpu or cuda[:N]")
    return dev


def count_train_flops(mf: ModelFile, model: nn.Module, batch: Any,
                      linear_rows: dict[str, int] | None = None) -> int:
    """FLOPs of one forward+backward on ``batch`` as ``FlopCounterMode`` counts them (grads cleared after).

    ``linear_rows``, when given, is filled with the rows each ``nn.Linear`` weight saw in that forward and got an
    output gradient for in the backward, keyed by the weight's name (summed over calls and over modules sharing
    it): what hooks capturing a layer's (input, output gradient) pairs work on (a ViT's patches, a sliced
    sequence). A layer recomputed under activation checkpointing is counted once, as such hooks see it."""
    param = next(model.parameters(), None)
    if param is None:
        raise ModelFileError(f"{mf.path}: the model has no parameters; nothing to optimize")
    device = param.device
    batch = move_to(batch, device)
    counter = FlopCounterMode(display=False)
    handles = []
    if linear_rows is not None:
        def rows(name: str, n: int, _grad: torch.Tensor) -> None:
            linear_rows[name] = linear_rows.get(name, 0) + n

        def count(name: str, module: nn.Linear, args: tuple[Any, ...], output: Any) -> None:
            # counted when the output's gradient arrives, as Iso's hooks capture: a forward recomputed under
            # activation checkpointing runs the hook again, but only one of the two outputs gets a gradient
            if args and torch.is_tensor(args[0]) and torch.is_tensor(output) and output.requires_grad:
                output.register_hook(functools.partial(rows, name, args[0].numel() // max(module.in_features, 1)))

        first: dict[int, str] = {}  # a weight shared by two Linear modules is one parameter, named where first seen
        linears = [(path, m) for path, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.Linear)]
        for path, m in linears:
            first.setdefault(id(m.weight), f"{path}.weight" if path else "weight")
        handles = [m.register_forward_hook(functools.partial(count, first[id(m.weight)]))
                   for m in {id(m): m for _, m in linears}.values()]
    try:
        with sdpa_kernel([SDPBackend.MATH]), counter:
            loss = mf.loss(model, batch)
            mf.backward(model, loss)
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work on ``device`` so a wall-clock reading covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, *, warmup: int = 2, steps: int = 5) -> list[float]:
    """Wall-clock seconds of ``steps`` calls of ``step`` after ``warmup`` untimed ones (device synchronized)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


@dataclass(frozen=True)
class Profile:
    """What ``precondtune profile`` reports."""

    path: str
    parameters: int
    trainable_parameters: int
    roles: dict[str, int]
    train_flops_per_step: int
    tokens_per_batch: int
    batch_size: int
    device: str
    step_seconds: float | None
    meta: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "model": {"path": self.path, "parameters": self.parameters,
                      "trainable_parameters": self.trainable_parameters, "roles": self.roles},
            "train_flops_per_step": self.train_flops_per_step, "tokens_per_batch": self.tokens_per_batch,
            "batch_size": self.batch_size, "device": self.device, "step_seconds": self.step_seconds,
            "flops_method": FLOP_METHOD,
        }


def profile_model(mf: ModelFile, *, batch_size: int = 8, device: str = "auto", tokens_per_batch: int | None = None,
                  measure_steps: int = 5, seed: int = 0) -> Profile:
    """Inventory, fwd+bwd FLOPs and (on a real model) the median measured fwd+bwd step time."""
    torch.manual_seed(seed)
    model = mf.build()
    dev = resolve_device(device, model)
    meta = dev.type == "meta"
    if not meta:
        model.to(dev)
    total, trainable = count_parameters(model)
    roles = role_counts(inventory(model))
    batch = mf.sample_batch(batch_size)
    tokens = tokens_per_batch or tokens_in(batch)
    if not meta:
        mf.check_first_step(model, move_to(batch, dev))
        model.zero_grad(set_to_none=True)
    flops = count_train_flops(mf, model, batch)
    seconds = None
    if not meta and measure_steps > 0:
        dbatch = move_to(batch, dev)

        def step() -> None:
            mf.loss(model, dbatch).backward()
            model.zero_grad(set_to_none=True)

        seconds = statistics.median(time_steps(step, dev, steps=measure_steps))
    return Profile(str(mf.path), total, trainable, roles, flops, tokens, batch_size, str(dev), seconds, meta)
