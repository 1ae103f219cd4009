"""Eigen-kernels shared by Shampoo and SOAP: stable symmetric eigh, inverse p-th roots, the SOAP basis refresh,
mode-wise Gram statistics and rotations of a tensor into / out of a per-dimension basis.

Shampoo (Gupta et al., arXiv 1802.09568) preconditions G ∈ ℝ^{d₁×…×d_k} by (H_i + εI)^{-1/(2k)} along each
mode i, with H_i the sum/EMA of mode-i Gram matrices G₍ᵢ₎G₍ᵢ₎ᵀ; SOAP (Vyas et al., arXiv 2409.11321) runs Adam
in the eigenbasis Q_i of those H_i, refreshed by one power-iteration step and a QR.

Operation counts of the decompositions (FlopCounterMode does not count them; precondtune reports them as
``refresh_other``): symmetric eigendecomposition with eigenvectors ≈ 9n³ (Golub & Van Loan, *Matrix
Computations*, 4th ed., §8.3.3, symmetric QR algorithm: "about 9n³ flops" when Q is accumulated; 4n³/3 of it
is the tridiagonal reduction, §8.3.1); Householder QR of an n×n matrix with Q formed explicitly ≈ 8n³/3
(GvL §5.2.2, 2n²(m − n/3) = 4n³/3 for R, plus 4n³/3 for backward accumulation of Q, §5.1.6).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def eigh_flops(n: int) -> int:
    """Documented operation count of a symmetric n×n eigendecomposition with eigenvectors: 9n³ (GvL §8.3.3)."""
    return 9 * n ** 3


def qr_flops(n: int) -> int:
    """Documented operation count of a Householder QR of an n×n matrix with Q formed: 8n³/3 (GvL §5.2.2, §5.1.6)."""
    return (8 * n ** 3) // 3


def _work_dtype(t: Tensor, dtype: torch.dtype) -> torch.dtype:
    """At least ``dtype`` (fp32 or fp64); a float64 input stays float64."""
    return torch.float64 if torch.float64 in (t.dtype, dtype) else dtype


def eigh(a: Tensor, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric matrix ``a``, computed in ``dtype`` or wider.

    Never NaN for finite input, rank-deficient included: if ``torch.linalg.eigh`` fails or returns non-finite
    values (known on some CUDA versions for low-rank input, pytorch/pytorch#94772), it is retried in float64
    with a jitter of 1e-10·(trace/n + tiny)·I and the result cast back. Only the lower triangle is read.
    """
    work = a.to(_work_dtype(a, dtype))
    try:
        vals, vecs = torch.linalg.eigh(work)
        if bool(torch.isfinite(vals).all()) and bool(torch.isfinite(vecs).all()):
            return vals, vecs
    except RuntimeError:  # torch.linalg.LinAlgError derives from RuntimeError
        pass
    a64 = a.to(torch.float64)
    n = a64.shape[-1]
    scale = float(a64.diagonal().abs().sum()) / max(n, 1) + 1e-30
    # 1e-10 relative jitter separates repeated (e.g. zero) eigenvalues enough for LAPACK/cuSOLVER to converge
    # while staying far below the ε·I every caller adds.
    a64 = a64 + 1e-10 * scale * torch.eye(n, dtype=torch.float64, device=a.device)
    vals, vecs = torch.linalg.eigh(a64)
    return vals.to(work.dtype), vecs.to(work.dtype)


def inverse_root(a: Tensor, p: float, eps: float, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """(A + εI)^{-1/p} of a symmetric PSD ``a``, via eigh: Q·diag((max(λ, 0) + ε)^{-1/p})·Qᵀ.

    Eigenvalues are clamped at 0 first, so round-off never makes a rank-deficient A indefinite (no NaN).
    Returns ``dtype`` (or float64 for float64 input). Matmul FLOPs: 2n³ (the product Q·D·Qᵀ); plus one eigh.
    """
    vals, vecs = eigh(a, dtype=dtype)
    d = vals.clamp(min=0).add(eps).pow(-1.0 / p)
    return (vecs * d) @ vecs.mT


def eigenbasis(a: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Eigenvectors of the symmetric ``a`` as columns, eigenvalues descending (SOAP's convention, upstream
    nikhilvyas/SOAP ``get_orthogonal_matrix``)."""
    return eigh(a, dtype=dtype)[1].flip(-1)


def refresh_basis(a: Tensor, q: Tensor, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """One power-iteration step and a QR: the refreshed eigenbasis of ``a`` from the previous basis ``q``.

    Columns of Q are first sorted by their Rayleigh quotients diag(QᵀAQ) (descending), then Q' = QR(A·Q)
    (SOAP, arXiv 2409.11321, Algorithm 4; the sorting is upstream's ``get_orthogonal_matrix_QR``). diag(QᵀAQ)
    is read off A·Q, so one n×n matmul (2n³ FLOPs) serves both. Returns (Q', order); callers permute
    whatever they keep in the old basis (SOAP's second moment) by ``order``.
    """
    wd = _work_dtype(a, dtype)
    a_w, q_w = a.to(wd), q.to(wd)
    aq = a_w @ q_w
    order = torch.argsort((q_w * aq).sum(0), descending=True)
    q_new, _ = torch.linalg.qr(aq[:, order])
    return q_new, order


def mode_gram(g: Tensor, dim: int) -> Tensor:
    """The mode-``dim`` Gram matrix G₍ᵢ₎G₍ᵢ₎ᵀ (d_i × d_i), contracting every other dimension.

    For a matrix: dim 0 → GGᵀ, dim 1 → GᵀG. Matmul FLOPs: 2·numel(G)·d_i.
    """
    if g.dim() == 1:
        return g.unsqueeze(1) @ g.unsqueeze(0)
    if g.dim() == 2:
        return g @ g.mT if dim == 0 else g.mT @ g
    m = g.movedim(dim, 0).reshape(g.shape[dim], -1)  # G₍ᵢ₎ as one matmul, even for a size-1 mode
    return m @ m.mT


def to_basis(x: Tensor, bases: Sequence[Tensor | None]) -> Tensor:
    """x ×₁ Q₁ᵀ ×₂ Q₂ᵀ … : rotate every mode i into the basis Q_i (columns); ``None`` leaves a mode as is.

    For a matrix this is Q_Lᵀ·X·Q_R. Matmul FLOPs: 2·numel(x)·d_i per basis given.
    """
    return _rotate(x, bases, transpose=True)


def from_basis(x: Tensor, bases: Sequence[Tensor | None]) -> Tensor:
    """The inverse of :func:`to_basis` for orthogonal Q_i: x ×₁ Q₁ ×₂ Q₂ … (for a matrix, Q_L·X·Q_Rᵀ)."""
    return _rotate(x, bases, transpose=False)


def _rotate(x: Tensor, bases: Sequence[Tensor | None], *, transpose: bool) -> Tensor:
    if x.dim() == 2 and len(bases) == 2:
        left, right = bases
        if left is not None:
            x = (left.mT @ x) if transpose else (left @ x)
        if right is not None:
            x = (x @ right) if transpose else (x @ right.mT)
        return x
    if x.dim() == 1 and len(bases) == 1:
        return _rotate(x.unsqueeze(0), [None, bases[0]], transpose=transpose).squeeze(0)
    # General order-k tensor: contract mode 0 each time; the contracted mode lands last, so after k steps the
    # modes are back in their original order (a permutation does the same for a mode left as is).
    for q in bases:
        if q is None:
            x = x.permute(*range(1, x.dim()), 0)
        else:  # tensordot(x, q, dims=([0], [0 or 1])) as one matmul: tensordot turns a one-element case into a mul
            rest = x.shape[1:]
            x = (x.reshape(x.shape[0], -1).mT @ (q if transpose else q.mT)).reshape(*rest, q.shape[1])
    return x


def rotation_flops(shape: Sequence[int], preconditioned: Sequence[bool]) -> int:
    """Matmul FLOPs of one :func:`to_basis`/:func:`from_basis`/preconditioning pass: Σᵢ 2·numel·d_i."""
    n = math.prod(int(s) for s in shape)
    return sum(2 * n * int(d) for d, on in zip(shape, preconditioned) if on)


def gram_flops(shape: Sequence[int], preconditioned: Sequence[bool]) -> int:
    """Matmul FLOPs of :func:`mode_gram` over the preconditioned modes: Σᵢ 2·numel·d_i."""
    return rotation_flops(shape, preconditioned)
