"""Adam-mini: one second-moment scalar per Hessian block (Zhang et al., arXiv 2406.16793).

Adam with v ← β₂·v + (1−β₂)·mean_block(g²) shared by every element of a block; m, bias correction and
decoupled weight decay as in AdamW, and the update m̂ / (√v̂ + ε) (the official code's ε placement, so a
model whose blocks are single elements steps exactly as AdamW). Blocks follow the paper's partition
principle (Sec. 2.3, Algorithm 3), decided from the parameter's role and declared structure, never its name:

* ``embedding`` and ``head``: token-wise, one block per row (one per vocabulary entry);
* ``matrix`` (hidden ``nn.Linear``: value, attention output projection, MLP): neuron-wise, one per output row;
* ``conv``: one per output channel; ``batched`` (..., n, m): one per row of each matrix in the batch;
* attention query/key: head-wise, one block per head. ``nn.MultiheadAttention``'s packed ``in_proj_weight``
  arrives with ``heads`` and ``attention="in_proj"`` from the inventory: rows [q; k; v], q and k head-wise,
  v neuron-wise;
* ``vector`` (biases, norm scales): one block per tensor — the paper's "default PyTorch partition" for the
  remaining parameters (Algorithm 3), as the official implementation does.

Custom attention declares its structure in a routing rule's hyperparameters, e.g. for a packed ``qkv``
``nn.Linear`` with 4 heads (examples/chargpt.py)::

    param_groups:
      - {match: matrix, name: "qkv", optimizer: adam-mini, hyperparameters: {heads: 4, attention: qkv}}

``attention: qkv`` (or ``in_proj``) means rows [q; k; v] of equal size; ``attention: qk`` means every row
belongs to a query or key head (separate q/k projections; with grouped-query attention give the key
projection its own rule with ``heads`` = the number of key/value heads). :func:`blocks` is the partition;
the optimizer and :func:`state_bytes` both read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..dtypes import itemsize
from ..errors import ConfigError
from . import _space
from .kernels import adam
from .registry import ALL_ROLES, OptimizerSpec, PrecondOptimizer, StepFlops, Transfer, check_range

ATTENTION_LAYOUTS = ("qkv", "in_proj", "qk")
"""Declared attention layouts: packed [q; k; v] rows (``in_proj`` is nn.MultiheadAttention's name), or q/k rows."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """Adam-mini hyperparameters; defaults are the official ``adam_mini`` package's (AdamW's, its README says)."""

    lr: float = 1e-3
    """Learning rate (the README: use AdamW's)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """EMA coefficients of the gradient and of the block mean of its square."""
    eps: float = 1e-8
    """Added to √v̂ in the denominator."""
    weight_decay: float = 0.0
    """Decoupled weight decay, p ← p·(1 − lr·wd) (the official default is 0; the paper trains with 0.1)."""
    heads: int | None = None
    """Attention heads of a declared attention projection (with ``attention``); ``None``: not attention."""
    attention: str | None = None
    """Row layout of a declared attention projection: ``qkv``/``in_proj`` (packed [q; k; v]) or ``qk``."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, self.lr >= 0, ">= 0 (0 lets a scheduler warm up from zero)")
        check_range("betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                    "two values in [0, 1)")
        check_range("eps", self.eps, self.eps >= 0, ">= 0")
        check_range("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        check_range("heads", self.heads, self.heads is None or (isinstance(self.heads, int) and self.heads >= 1),
                    "None or an integer >= 1")
        check_range("attention", self.attention, self.attention is None or self.attention in ATTENTION_LAYOUTS,
                    "None or one of " + ", ".join(ATTENTION_LAYOUTS))
        check_range("heads", self.heads, (self.heads is None) == (self.attention is None),
                    "set together with 'attention' (both or neither)")


def _default_role(shape: tuple[int, ...]) -> str:
    return "vector" if len(shape) <= 1 else "matrix" if len(shape) == 2 else "batched"


def blocks(shape: tuple[int, ...], role: str | None = None, heads: int | None = None,
           attention: str | None = None) -> tuple[tuple[int, int], ...]:
    """The partition as ``((num_blocks, block_size), ...)`` segments tiling the row-major flattened parameter.

    >>> blocks((24, 8), "matrix", heads=2, attention="in_proj")   # q,k: 2 heads each; v: 8 neurons
    ((4, 32), (8, 8))
    """
    n = math.prod(shape)
    role = role or _default_role(shape)
    if attention is not None:
        if len(shape) != 2 or heads is None:
            raise ConfigError(f"adam-mini: attention={attention!r} needs a 2-D weight and 'heads'; got shape "
                              f"{tuple(shape)}, heads={heads}")
        rows, cols = shape
        if attention == "qk":
            if rows % heads:
                raise ConfigError(f"adam-mini: {rows} rows do not split into heads={heads}")
            return ((heads, n // heads),)
        if rows % (3 * heads):
            raise ConfigError(f"adam-mini: attention={attention!r} needs rows [q; k; v] with each part split "
                              f"into heads={heads}; {rows} rows are not a multiple of {3 * heads}")
        d = rows // 3
        return ((2 * heads, d // heads * cols), (d, cols))
    if role == "vector" or len(shape) <= 1:
        return ((1, n),)
    if role == "batched":
        return ((n // shape[-1], shape[-1]),)
    return ((shape[0], n // shape[0]),)  # embedding/head: tokens; matrix: neurons; conv: output channels


def num_blocks(shape: tuple[int, ...], role: str | None = None, heads: int | None = None,
               attention: str | None = None) -> int:
    """Second-moment scalars kept for one parameter."""
    return sum(k for k, _ in blocks(shape, role, heads, attention))


def adam_mini_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               steps: list[int], segments: list[tuple[tuple[int, int], ...]], *, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float) -> None:
    """One Adam-mini step over many tensors, in place; ``exp_avg_sqs[i]`` holds one scalar per block of
    ``segments[i]``. Decay and m use torch's multi-tensor kernels; the block statistics go tensor by tensor."""
    if not params:
        return
    adam.decay_(params, lr, weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    for p, grad, m, v, step, segs in zip(params, grads, exp_avgs, exp_avg_sqs, steps, segments):
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        flat_p = p.view(-1) if p.is_contiguous() else p.detach().reshape(-1)
        flat_g, flat_m = grad.reshape(-1), m.view(-1)
        off = voff = 0
        for k, size in segs:
            g = flat_g[off:off + k * size].view(k, size)
            vb = v[voff:voff + k]
            # mean of squares as ‖·‖²/size: no temporary of the block's size
            vb.mul_(beta2).add_(torch.linalg.vector_norm(g, dim=1).square_().div_(size), alpha=1 - beta2)
            denom = (vb.sqrt() / math.sqrt(bc2)).add_(eps).unsqueeze(1)
            flat_p[off:off + k * size].view(k, size).addcdiv_(flat_m[off:off + k * size].view(k, size), denom,
                                                               value=-lr / bc1)
            off += k * size
            voff += k
        if not p.is_contiguous():
            p.copy_(flat_p.view_as(p))


class AdamMini(PrecondOptimizer):
    """Adam-mini over param groups (each group's ``role`` and declared attention decide its blocks)."""

    Config = Config

    def _step_group(self, group: dict[str, Any], c: Config) -> None:
        params = self._params_with_grad(group)
        segments = [blocks(tuple(p.shape), group.get("role"), c.heads, c.attention) for p in params]
        for p, segs in zip(params, segments):
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros(sum(k for k, _ in segs), dtype=p.dtype, device=p.device)
            state["step"] += 1
        states = [self.state[p] for p in params]
        adam_mini_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                   [s["exp_avg_sq"] for s in states], [s["step"] for s in states], segments,
                   lr=c.lr, beta1=c.betas[0], beta2=c.betas[1], eps=c.eps, weight_decay=c.weight_decay)


def state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: Config, info: Any = None) -> int:
    """m of the parameter's shape plus one v scalar per block: (n + #blocks)·itemsize.

    The blocks are :func:`blocks` of the role in ``info`` and the attention structure from ``info.extra``
    (nn.MultiheadAttention) or, failing that, from ``config`` (a routing rule's declaration), as in ``build``.
    """
    extra = getattr(info, "extra", None) or {}
    role = getattr(info, "role", None)
    heads = extra.get("heads", config.heads)
    attention = extra.get("attention", config.attention) if "heads" in extra else config.attention
    return (math.prod(shape) + num_blocks(tuple(shape), role, heads, attention)) * itemsize(dtype)


def step_flops(shape: tuple[int, ...], config: Config) -> StepFlops:
    """Elementwise and block reductions only: no matmul FLOPs."""
    return StepFlops()


def search_space(trial: Any, base: Config | None = None) -> Config:
    """AdamW's knobs and ranges (the paper tunes Adam-mini as AdamW): lr (log), β1, β2, weight decay."""
    lr = _space.suggest_lr(trial, Config.lr, base, low=1e-4, high=3e-2)
    b1 = _space.suggest_beta(trial, "beta1", 0.8, 0.98)
    b2 = _space.suggest_beta(trial, "beta2", 0.9, 0.9995)
    wd = trial.suggest_float("weight_decay", 0.0, 0.2)
    b = base or Config()
    return Config(lr=lr, betas=(b1, b2), weight_decay=wd, eps=b.eps, heads=b.heads, attention=b.attention)


def from_adamw(*, lr: float, betas: tuple[float, float] = Config.betas, eps: float = Config.eps,
               weight_decay: float = Config.weight_decay, **_: Any) -> Transfer:
    """Identity: the official README recommends AdamW's lr, betas, eps and weight decay unchanged."""
    return Transfer(Config(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), "identity",
                    "Adam-mini README (github.com/zyushun/Adam-mini): use the same values as for AdamW")


SPEC = OptimizerSpec(
    name="adam-mini", family="block diagonal (Adam)", paper="Zhang et al. 2024, arXiv 2406.16793",
    config_cls=Config, optimizer_cls=AdamMini, state_bytes=state_bytes, step_flops=step_flops,
    search_space=search_space, from_adamw=from_adamw,
    state_formula="n (m) + one v per block (rows; heads for q/k; one per vector)", roles=ALL_ROLES,
    aliases=("adammini",),
)
