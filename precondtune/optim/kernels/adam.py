"""Adam's moments with bias correction and decoupled weight decay (Loshchilov & Hutter, arXiv 1711.05101).

m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  p ← p·(1 − lr·wd) − lr · m̂ / (√v̂ + ε),
with m̂ = m/(1−β1^t), v̂ = v/(1−β2^t). The operation order follows ``torch.optim.AdamW`` so results agree
bit for bit in float32.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import lerp_


def update_moments_(m: Tensor, v: Tensor, g: Tensor, beta1: float, beta2: float) -> None:
    """EMA of the gradient and of its square, in place."""
    lerp_(m, g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)


def direction(m: Tensor, v: Tensor, step: int, beta1: float, beta2: float, eps: float) -> Tensor:
    """Bias-corrected Adam direction m̂ / (√v̂ + ε) (out of place; used in rotated bases by SOAP, AdaDiag, GaLore)."""
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
    return (m / bc1).div_(denom)


def decay_(params: list[Tensor] | Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay p ← p·(1 − lr·wd), in place."""
    if weight_decay == 0:
        return
    if isinstance(params, Tensor):
        params.mul_(1 - lr * weight_decay)
    else:
        torch._foreach_mul_(params, 1 - lr * weight_decay)


def adamw_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
           steps: list[int], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
           foreach: bool = True) -> None:
    """One AdamW step over many tensors; ``foreach`` uses torch's multi-tensor kernels (one launch per op)."""
    if not params:
        return
    if not foreach:
        for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            decay_(p, lr, weight_decay)
            update_moments_(m, v, g, beta1, beta2)
            bc1, bc2 = 1 - beta1**t, 1 - beta2**t
            denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / bc1)
        return
    decay_(params, lr, weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_sizes = [-lr / (1 - beta1**t) for t in steps]
    bc2_sqrt = [math.sqrt(1 - beta2**t) for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
