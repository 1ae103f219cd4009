"""Factored second moments: Adafactor's row/column statistics and their rank-1 reconstruction.

For a gradient G of shape (..., n, m) keep the EMAs of its row and column mean squares,
r ← β·r + (1−β)·mean_j G²  (shape (..., n, 1)) and c ← β·c + (1−β)·mean_i G²  (shape (..., 1, m)),
and reconstruct V̂ = r·c / mean(r), the I-divergence-optimal rank-1 fit of the full second moment
(Shazeer & Stern, arXiv 1804.04235, Sec. 3; with means instead of sums, which is the same V̂).
Tensors of more than two dimensions are factored over their last two, as ``torch.optim.Adafactor`` does.

The functions are pure tensor code, so any optimizer can run Adafactor's statistics in its own basis
(AdafacDiag runs them on the gradient rotated into its singular basis, arXiv 2502.07488):

>>> row, col = zeros(g.shape, dtype=g.dtype)        # state, once
>>> update_(row, col, g, 1 - beta2)                   # every step
>>> u = precondition(g, row, col, eps=1e-30)          # g / sqrt(V̂), elementwise
"""
from __future__ import annotations

import torch
from torch import Tensor

Shape = tuple[int, ...]


def is_factored(shape: Shape | torch.Size) -> bool:
    """Whether a parameter of this shape gets factored statistics (≥ 2-D) rather than a full second moment."""
    return len(shape) >= 2


def shapes(shape: Shape | torch.Size) -> tuple[Shape, Shape]:
    """Shapes of the row and column statistics of a ≥ 2-D tensor: (..., n, 1) and (..., 1, m)."""
    if not is_factored(shape):
        raise ValueError(f"factored statistics need a tensor of at least 2 dimensions, got shape {tuple(shape)}")
    *lead, n, m = shape
    return (*lead, n, 1), (*lead, 1, m)


def numel(shape: Shape | torch.Size) -> int:
    """Elements held by the factored statistics of one ≥ 2-D tensor: (n + m)·prod(leading dims)."""
    *lead, n, m = shape
    k = 1
    for s in lead:
        k *= s
    return k * (n + m)


def zeros(shape: Shape | torch.Size, *, dtype: torch.dtype, device: torch.device | str | None = None
          ) -> tuple[Tensor, Tensor]:
    """Fresh row and column statistics for a tensor of ``shape``."""
    row_shape, col_shape = shapes(shape)
    return torch.zeros(row_shape, dtype=dtype, device=device), torch.zeros(col_shape, dtype=dtype, device=device)


def update_(row: Tensor, col: Tensor, grad: Tensor, weight: float) -> None:
    """EMA of the row and column mean squares of ``grad``, in place: r ← r + weight·(mean_j G² − r), same for c.

    ``weight`` is 1 − β₂ (Adafactor's schedule: t^−0.8). G² is one temporary of the gradient's size, freed before
    the update allocates its own, so peak memory is unchanged; on CPU this is ~10× faster than the column norm
    ``torch.optim.Adafactor`` takes (a strided reduction), and agrees with it to float32 rounding.
    """
    sq = grad * grad
    row.lerp_(sq.mean(dim=-1, keepdim=True), weight)
    col.lerp_(sq.mean(dim=-2, keepdim=True), weight)


def floor(eps: float, dtype: torch.dtype) -> float:
    """``eps`` as a floor that ``dtype`` can hold: ``eps`` itself, or the dtype's smallest positive (subnormal)
    number when ``eps`` rounds to 0 there. ε₁ = 1e-30 squared underflows to 0 in float32 (and 1e-30 itself in
    float16), and an all-zero gradient row or column (a dead ReLU feature) then gives 0·∞ = NaN."""
    if eps <= 0 or torch.tensor(eps, dtype=dtype).item() > 0:
        return eps
    info = torch.finfo(dtype)
    return info.tiny * info.eps  # the smallest subnormal: 2^-149 (fp32), 2^-24 (fp16), 2^-133 (bf16)


def reconstruct(row: Tensor, col: Tensor, eps: float = 0.0) -> Tensor:
    """The rank-1 second moment V̂ = r·c / max(mean(r), eps), a new tensor of the parameter's shape.

    ``eps`` keeps an all-zero gradient from dividing by zero (torch places ε₁ here and in :func:`precondition`,
    not inside the statistics as the paper does).
    """
    return (row * col).div_(row.mean(dim=-2, keepdim=True).clamp_(min=floor(eps, row.dtype)))


def precondition(grad: Tensor, row: Tensor, col: Tensor, eps: float, bias_correction: float = 1.0) -> Tensor:
    """Adafactor's unclipped update U = G / max(√(V̂ / bias_correction), eps) as a new tensor.

    ``bias_correction`` is 1 − β₂ᵗ for a constant β₂ (Algorithm 2 of 1804.04235); 1 under the t^−0.8 schedule,
    which needs none.
    """
    v = reconstruct(row, col, eps)
    if bias_correction != 1.0:
        v.div_(bias_correction)
    # clamp at eps² before the square root keeps eps on the scale of √V̂
    return v.clamp_(min=floor(eps * eps, v.dtype)).rsqrt_().mul_(grad)


def rms(x: Tensor) -> float:
    """Root mean square ‖x‖₂/√n as a Python float (Adafactor's update clipping and relative step size)."""
    return x.norm(2).item() / (x.numel() ** 0.5)
