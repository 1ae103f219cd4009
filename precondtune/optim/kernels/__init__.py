"""Kernels several optimizers share (STYLE.md: compose, don't copy): Adam moments, factored second moments,
Newton–Schulz orthogonalization, eigen/SVD bases. Each is a pure function of tensors."""
from __future__ import annotations

import torch
from torch import Tensor


def add_scaled_(dst: Tensor, src: Tensor, alpha: float) -> Tensor:
    """``dst += alpha · src`` in place, also correct inside ``torch.compile`` when ``src`` is a matrix product.

    Eager: ``dst.add_(src, alpha=alpha)``. Compiled: ``dst.add_(src * alpha)``, which inductor fuses into the same
    single pointwise kernel. The eager form is not used there: inductor (torch 2.13, its post-grad
    ``add + mm → addmm`` pattern) rewrites ``add(dst, mm(a, b), alpha=α)`` as ``addmm(dst, a, b)`` and drops α,
    so a rotated update was applied 1/lr times too large (seen with torch 2.13.0; tests/test_compile.py
    compares every bundled optimizer's compiled step with its eager one).
    """
    if torch.compiler.is_compiling():
        return dst.add_(src * alpha)
    return dst.add_(src, alpha=alpha)


def lerp_(dst: Tensor, end: Tensor, weight: float) -> Tensor:
    """``dst ← dst + weight · (end − dst)`` in place (an EMA step), also correct inside ``torch.compile``.

    Eager: ``dst.lerp_(end, weight)``. Compiled: ``dst·(1 − weight) + end·weight``. Inductor lowers a lerp whose
    ``dst`` is a zeros tensor made in the same graph (a state's first step) to ``add(0, end, alpha=weight)``, and
    when ``end`` is a matrix product the pattern in :func:`add_scaled_` drops the weight: SOAP's first Gram
    statistics came out 1/(1 − β) times too large.
    """
    if torch.compiler.is_compiling():
        return dst.mul_(1 - weight).add_(end * weight)
    return dst.lerp_(end, weight)
