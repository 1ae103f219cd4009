"""The gradient's singular basis and rotations into and out of it (AdaDiag, arXiv 2502.07488, §3 and Alg. 1).

G = P Σ Qᵀ with P (m×m) and Q (n×n) orthogonal (``torch.linalg.svd(G, full_matrices=True)``).
One-sided (AdaDiag):   G̃ = Pᵀ G,   update back U ↦ P U.
Two-sided (AdaDiag++): G̃ = Pᵀ G Q, update back U ↦ P U Qᵀ.

The one-sided basis P is the *smaller* side's; a tall matrix is handled as its transpose (:func:`oriented`).
That is what the paper's memory figures count (Table 3: the extra AdaDiag state is min(m, n)² per matrix; a
larger-side basis would give 0.33G instead of the printed 0.26G for LLaMA-60M). Every basis here is computed on
that oriented view.

Moments across a refresh. The paper's Algorithm 1 keeps M and V unchanged when P, Q are recomputed (its
convergence argument, §4, covers moments accumulated in earlier subspaces). :func:`project_linear` and
:func:`project_diagonal` offer the consistent alternative: with R_L = P_newᵀ P_old and R_R = Q_oldᵀ Q_new,
the first moment moves exactly (M ← R_L M R_R, the same map that takes G̃_old to G̃_new), and a diagonal
second moment moves as the variances of uncorrelated coordinates do (V ← (R_L∘R_L) V (R_R∘R_R)), which keeps
V ≥ 0 and preserves its row/column sums' meaning (a factored second moment moves exactly under that map).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import adam, add_scaled_


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Rotations and moment arithmetic run in float32 for 16-bit parameters (states are stored in their dtype)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def oriented(t: Tensor) -> tuple[Tensor, bool]:
    """``t`` as an m×n matrix with m ≤ n (conv kernels flattened to (out, in·k…), tall matrices transposed).

    Returns the view and whether it was transposed.
    """
    mat = t.reshape(t.shape[0], -1)
    if mat.shape[0] > mat.shape[1]:
        return mat.mT, True
    return mat, False


def oriented_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(m, n) with m ≤ n of a parameter shape, as :func:`oriented` sees it."""
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    return (rows, cols) if rows <= cols else (cols, rows)


def restore(x: Tensor, transposed: bool, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`oriented`: back to the parameter's shape."""
    return (x.mT if transposed else x).reshape(shape)


def _canonical_signs_(u: Tensor) -> Tensor:
    """Flip each column so its largest-magnitude entry is positive (the ``svd_flip`` convention of
    scikit-learn); returns the signs. Makes the basis a function of the gradient, not of the LAPACK driver,
    so consecutive bases agree in sign and moments carried across a refresh keep their meaning."""
    idx = u.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(u, 0, idx))
    signs[signs == 0] = 1
    u.mul_(signs)
    return signs


def _svd(a: Tensor, full: bool) -> tuple[Tensor, Tensor] | None:
    try:
        u, _, vh = torch.linalg.svd(a, full_matrices=full)
    except torch.linalg.LinAlgError:
        return None
    if not (torch.isfinite(u).all() and torch.isfinite(vh).all()):
        return None
    return u, vh


def svd_basis(g: Tensor, *, two_sided: bool) -> tuple[Tensor, Tensor | None] | None:
    """P (m×m) and, if ``two_sided``, Q (n×n) of an oriented gradient ``g`` (m ≤ n), in ``g``'s dtype.

    Computed in float32 (float64 input stays float64); a driver failure or a non-finite result is retried in
    float64; a gradient with non-finite entries, or a second failure, gives ``None`` (the caller keeps its
    previous basis). With m ≤ n the reduced SVD's U is already the complete m×m basis, so ``full_matrices``
    is only needed for Q.
    """
    if g.shape[0] > g.shape[1]:
        raise ValueError(f"svd_basis expects an oriented m×n gradient with m ≤ n, got {tuple(g.shape)}")
    a = g.to(compute_dtype(g.dtype) if g.dtype != torch.float64 else torch.float64)
    if not torch.isfinite(a).all():
        return None
    out = _svd(a, two_sided)
    if out is None and a.dtype != torch.float64:
        out = _svd(a.double(), two_sided)
    if out is None:
        return None
    u, vh = out
    p = u.contiguous()
    signs = _canonical_signs_(p)
    q = None
    if two_sided:
        q = vh.mT.contiguous()
        k = p.shape[1]
        q[:, :k].mul_(signs)  # keeps G = P Σ Qᵀ
        if q.shape[1] > k:
            _canonical_signs_(q[:, k:])  # null-space columns: their own convention
        q = q.to(g.dtype)
    return p.to(g.dtype), q


def rotate(g: Tensor, p: Tensor, q: Tensor | None = None) -> Tensor:
    """G̃ = Pᵀ G (one-sided) or Pᵀ G Q (two-sided)."""
    out = p.mT @ g
    return out if q is None else out @ q


def unrotate(u: Tensor, p: Tensor, q: Tensor | None = None) -> Tensor:
    """Back to the parameter's coordinates: P U (one-sided) or P U Qᵀ (two-sided)."""
    out = p @ u
    return out if q is None else out @ q.mT


def init_basis(state: dict[str, Any], g: Tensor, dtype: torch.dtype, *, two_sided: bool) -> None:
    """Identity bases (used until the first SVD succeeds) in the state dtype."""
    m, n = g.shape
    state["P"] = torch.eye(m, dtype=dtype, device=g.device)
    if two_sided:
        state["Q"] = torch.eye(n, dtype=dtype, device=g.device)


def refresh_basis_(state: dict[str, Any], g: Tensor, *, two_sided: bool, with_transitions: bool = False
                   ) -> tuple[Tensor, Tensor | None] | None:
    """Recompute ``state["P"]`` (and ``"Q"``) from the oriented gradient ``g``, keeping the old basis when the SVD
    cannot be computed. With ``with_transitions``, returns R_L = P_newᵀ P_old and R_R = Q_oldᵀ Q_new (in ``g``'s
    dtype) so the caller can move its moments; ``None`` when the basis did not change."""
    basis = svd_basis(g, two_sided=two_sided)
    if basis is None:
        return None
    p_new, q_new = basis
    moves = None
    if with_transitions:
        moves = transitions(p_new.to(g.dtype), state["P"].to(g.dtype),
                            None if q_new is None else q_new.to(g.dtype),
                            state["Q"].to(g.dtype) if two_sided else None)
    state["P"].copy_(p_new)
    if two_sided:
        state["Q"].copy_(q_new)
    return moves


@dataclass(frozen=True)
class Rotated:
    """One parameter's gradient in its singular basis for this step, and the way back: what AdaDiag, AdafacDiag
    and HfacDiag share, so each says only which update it runs in the basis. Made by :func:`rotate_in`."""

    grad: Tensor
    """G̃ = Pᵀ G [Q] of the oriented gradient, in the compute dtype."""
    step: int
    """t, counted from 1."""
    fresh: bool
    """The state was created on this step: the caller adds its own moments (shape ``grad.shape``)."""
    moves: tuple[Tensor, Tensor | None] | None
    """(R_L, R_R) when the basis changed on this step and transitions were asked for, else ``None``."""
    basis_p: Tensor
    basis_q: Tensor | None
    transposed: bool

    def apply_(self, param: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
        """W ← W·(1 − η·λ) − η · P U [Qᵀ] for an update U computed in the basis (decoupled weight decay)."""
        back = unrotate(update, self.basis_p, self.basis_q)
        adam.decay_(param, lr, weight_decay)
        add_scaled_(param, restore(back, self.transposed, param.shape).to(param.dtype), -lr)


def rotate_in(param: Tensor, state: dict[str, Any], *, two_sided: bool, every: int,
              project_moments: bool = False) -> Rotated:
    """Orient ``param.grad`` (m ≤ n), cast it to the compute dtype, create ``state["step"]`` and identity bases
    on first use (stored in the parameter's dtype), count the step, recompute the basis on steps 1, T+1, 2T+1, …
    (T = ``every``) and rotate the gradient in. With ``project_moments``, a refresh after the first step also
    returns the matrices that move the caller's moments into the new basis (:func:`project_linear`,
    :func:`project_diagonal`)."""
    g, transposed = oriented(param.grad)
    g = g.to(compute_dtype(param.dtype))
    fresh = not state
    if fresh:
        state["step"] = 0
        init_basis(state, g, param.dtype, two_sided=two_sided)
    state["step"] += 1
    t = state["step"]
    moves = None
    if (t - 1) % every == 0:
        moves = refresh_basis_(state, g, two_sided=two_sided, with_transitions=project_moments and t > 1)
    basis_p = state["P"].to(g.dtype)
    basis_q = state["Q"].to(g.dtype) if two_sided else None
    return Rotated(rotate(g, basis_p, basis_q), t, fresh, moves, basis_p, basis_q, transposed)


def transitions(p_new: Tensor, p_old: Tensor, q_new: Tensor | None = None,
                q_old: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """R_L = P_newᵀ P_old and R_R = Q_oldᵀ Q_new: G̃_new = R_L G̃_old R_R for a gradient seen in both bases."""
    r_left = p_new.mT @ p_old
    r_right = None if q_new is None or q_old is None else q_old.mT @ q_new
    return r_left, r_right


def project_linear(x: Tensor, r_left: Tensor, r_right: Tensor | None = None) -> Tensor:
    """A first moment moved exactly into the new basis: R_L X (R_R)."""
    out = r_left @ x
    return out if r_right is None else out @ r_right


def project_diagonal(v: Tensor, r_left: Tensor, r_right: Tensor | None = None) -> Tensor:
    """A diagonal second moment moved into the new basis: (R_L∘R_L) V (R_R∘R_R) (variances of uncorrelated
    coordinates under an orthogonal change of basis; non-negative, row/column sums carried exactly)."""
    out = (r_left * r_left) @ v
    return out if r_right is None else out @ (r_right * r_right)


def rotation_flops(m: int, n: int, two_sided: bool) -> int:
    """Matmul FLOPs (2·m·n·k per product, as FlopCounterMode counts) of one rotate + one unrotate."""
    one = 2 * m * m * n
    return 2 * one + (2 * (2 * m * n * n) if two_sided else 0)


def projection_flops(m: int, n: int, two_sided: bool, moments: int) -> int:
    """Matmul FLOPs of moving ``moments`` m×n moments (first or diagonal second) into a new basis at a refresh,
    the transition matrices R_L (and R_R) included."""
    flops = 2 * m * m * m + (2 * n * n * n if two_sided else 0)
    per = 2 * m * m * n + (2 * m * n * n if two_sided else 0)
    return flops + moments * per


def svd_flops(m: int, n: int, two_sided: bool) -> int:
    """Documented operation count of the SVD of an m×n matrix (m ≤ n here; the table is stated for its
    transpose, rows ≥ cols): Golub & Van Loan, *Matrix Computations* (3rd ed., §5.4.5, Golub–Reinsch SVD
    column), for a matrix with M ≥ N rows/cols: Σ, U₁ (thin), V: 14·M·N² + 8·N³ (the reduced SVD, one-sided);
    Σ, U, V (full): 4·M²·N + 8·M·N² + 9·N³ (``full_matrices=True``, two-sided)."""
    big, small = max(m, n), min(m, n)
    if two_sided:
        return 4 * big * big * small + 8 * big * small * small + 9 * small**3
    return 14 * big * small * small + 8 * small**3
