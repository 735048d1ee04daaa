"""Closed-form solvers from sufficient statistics: least squares, ridge, reduced-rank regression.

All work is float64 ``torch.linalg``. One symmetric eigendecomposition of ``C_xx`` whitens
the inputs (a pseudo-inverse: exactly singular inputs such as LayerNorm outputs, whose rows
sum to zero, are handled without a bare Cholesky), and the right singular vectors of the whitened
cross-covariance ``K = (C_xx + αI)^{-1/2} C_xy`` (from ``eigh(KᵀK)``) yield reduced-rank solutions of every
rank at once (design.md §6):

* ``B = (C_xx + αI)^+ C_xy`` (least squares / ridge),
* ``B_r = B V_r V_rᵀ`` with ``V_r`` the top right singular vectors of ``K`` (the eigenvectors
  of the fitted values' Gram matrix), and training loss ``loss(B) + Σ_{i>r} s_i²`` for α = 0,
* weighted by ``Γ = F Fᵀ``: ``B_Γ,r = B F Q_r Q_rᵀ F^{-1}`` with ``Q_r`` the top right singular vectors of ``K F``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import NJTCError

__all__ = ["ReducedRankSolution", "gcv_alpha", "solve_reduced_rank", "sum_squared_error", "symmetric_sqrt"]


def sum_squared_error(B: torch.Tensor, cxx: torch.Tensor, cxy: torch.Tensor, cyy: torch.Tensor) -> float:
    """Training loss ``Σ‖y - xB‖²`` from statistics: ``tr C_yy - 2 tr BᵀC_xy + tr BᵀC_xx B``."""
    return float(torch.trace(cyy) - 2 * (B * cxy).sum() + (B * (cxx @ B)).sum())


def symmetric_sqrt(gram: torch.Tensor, ridge: float = 1e-8):
    """Symmetric square root ``F`` of a PSD matrix and its inverse (``F Fᵀ = Γ + ε I``)."""
    lam, q = torch.linalg.eigh(gram)
    lam = lam.clamp_min(0) + ridge * lam.max().clamp_min(1e-300)
    return (q * lam.sqrt()) @ q.T, (q / lam.sqrt()) @ q.T


def weight_root(g: torch.Tensor):
    """``(F, F⁻¹)`` for errors measured as ``‖e G‖²``: only ``G Gᵀ`` matters, so ``F`` is its
    symmetric square root (d×d, whatever G's width). Compute once, reuse for every layer."""
    g = g.to(torch.float64)
    return symmetric_sqrt(g @ g.T)


@dataclass
class ReducedRankSolution:
    """Every reduced-rank solution of one regression, from one decomposition.

    Attributes
    ----------
    coef : Tensor (d_x, d_y)
        The full-rank least-squares (or ridge) map ``B``.
    singular_values : Tensor
        Singular values of the (weighted) whitened cross-covariance, descending; their
        squares are the loss reductions of successive ranks.
    basis : Tensor (d_y, k)
        Right singular vectors ``V`` (or ``F Q`` when weighted), columns by importance.
    inverse_basis : Tensor (k, d_y)
        ``Vᵀ`` (or ``Qᵀ F^{-1}``): the second factor of the rank-r map.
    """

    coef: torch.Tensor
    singular_values: torch.Tensor
    basis: torch.Tensor
    inverse_basis: torch.Tensor

    @property
    def max_rank(self) -> int:
        return self.basis.shape[1]

    def factors(self, rank: int | None):
        """``(U, V)`` with ``U V`` the best map of rank ``rank`` (``None``: full, ``V = None``)."""
        if rank is None:
            return self.coef, None
        rank = min(rank, self.max_rank)
        return self.coef @ self.basis[:, :rank], self.inverse_basis[:rank]

    def coef_of_rank(self, rank: int | None) -> torch.Tensor:
        """The rank-``rank`` map as one ``d_x × d_y`` matrix."""
        u, v = self.factors(rank)
        return u if v is None else u @ v


def _whitener(cxx: torch.Tensor, alpha: float, rcond: float | None):
    """``W`` with ``W Wᵀ = (C_xx + αI)^+``, dropping directions below ``rcond × λ_max``."""
    lam, q = torch.linalg.eigh(cxx)
    lam = lam + alpha
    if rcond is None:
        rcond = cxx.shape[0] * torch.finfo(torch.float64).eps
    keep = lam > rcond * lam.max().clamp_min(1e-300)
    return q[:, keep] / lam[keep].sqrt()  # no column at all when every row is identical


def solve_reduced_rank(cxx, cxy, alpha: float = 0.0, weight=None, rcond=None) -> ReducedRankSolution:
    """Solve least squares and every reduced-rank regression of ``y ≈ x B``.

    Parameters
    ----------
    cxx, cxy : Tensor
        Input Gram and cross-Gram matrices (centred for a fit with intercept, raw without).
    alpha : float
        Ridge penalty ``α‖B‖²``; the reduced-rank solutions then minimise the penalised loss
        under the rank constraint (reduced-rank ridge regression).
    weight : (F, F⁻¹), optional
        From :func:`weight_root` of ``G``: errors are measured as ``‖(y - xB) G‖²`` (e.g. in
        logit space).
    rcond : float, optional
        Relative eigenvalue cut-off of the pseudo-inverse (default ``d × eps``).

    Returns
    -------
    ReducedRankSolution
    """
    cxx = cxx.to(torch.float64)
    cxy = cxy.to(torch.float64)
    if alpha < 0:
        raise NJTCError("ridge alpha must be non-negative")
    w = _whitener(cxx, alpha, rcond)
    k = w.T @ cxy
    coef = w @ k
    if k.shape[0] == 0:  # constant inputs: the minimum-norm solution is the zero map
        empty = cxy.new_zeros(cxy.shape[1], 0)
        return ReducedRankSolution(coef, cxy.new_zeros(0), empty, empty.T)
    if weight is None:
        s, v = _top_right_singular(k)
        return ReducedRankSolution(coef, s, v, v.T)
    f, f_inv = weight
    s, q = _top_right_singular(k @ f)
    return ReducedRankSolution(coef, s, f @ q, q.T @ f_inv)


def _top_right_singular(k: torch.Tensor):
    """Singular values (descending) and right singular vectors of ``k``, from ``eigh(kᵀk)``.

    Twice as fast as an SVD at d = 576; the leading vectors, the only ones a reduced-rank
    map uses, are as accurate (checked against a float64 SVD in the tests).
    """
    lam, v = torch.linalg.eigh(k.T @ k)
    lam, v = lam.flip(0).clamp_min(0), v.flip(1)
    n = min(k.shape)
    return lam[:n].sqrt(), v[:, :n]


def gcv_alpha(cxx, cxy, cyy, n: int, grid=None) -> tuple[float, dict]:
    """Choose the ridge penalty by generalised cross-validation, from statistics alone.

    ``GCV(α) = (SSE(α)/n) / (1 - df(α)/n)²`` with ``df(α) = Σ λ_i/(λ_i + α)``; both terms
    follow from the eigendecomposition of ``C_xx`` without touching the data again.

    Returns
    -------
    alpha : float
        The grid value with the smallest GCV score.
    scores : dict
        ``{alpha: gcv}`` for the whole grid.
    """
    cxx, cxy, cyy = (t.to(torch.float64) for t in (cxx, cxy, cyy))
    lam, q = torch.linalg.eigh(cxx)
    lam = lam.clamp_min(0)
    p2 = ((q.T @ cxy) ** 2).sum(1)  # squared norms of the projected cross-covariance rows
    scale = float(lam.mean())
    grid = grid if grid is not None else [0.0] + [scale * 10.0**e for e in torch.arange(-8, 2.5, 0.5).tolist()]
    scores = {}
    for alpha in grid:
        denom = lam + alpha
        ok = denom > lam.max() * cxx.shape[0] * torch.finfo(torch.float64).eps
        sse = float(torch.trace(cyy) - ((2 / denom[ok] - lam[ok] / denom[ok] ** 2) * p2[ok]).sum())
        df = float((lam[ok] / denom[ok]).sum())
        if df < n:
            scores[float(alpha)] = (max(sse, 0.0) / n) / (1 - df / n) ** 2
    if not scores:
        raise NJTCError("generalised cross-validation needs more rows than input dimensions")
    best = min(scores, key=scores.get)
    return best, scores
