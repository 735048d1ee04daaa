"""Closed-form solvers from sufficient statistics: least squares, ridge, reduced-rank regression, in float64.

One eigendecomposition of ``C_xx`` whitens the inputs (a pseudo-inverse), and the right singular
vectors of ``K = (C_xx + αI)^{-1/2} C_xy`` give every rank at once (docs/reference/numerics.md):
``B = (C_xx + αI)^+ C_xy``; ``B_r = B V_r V_rᵀ``; weighted by ``Γ = F Fᵀ``, ``B_Γ,r = B F Q_r Q_rᵀ F⁺``
with ``Q_r`` from ``K F``, the null directions of a singular ``Γ`` fitted on the same r features.

Examples
--------
>>> import torch
>>> from njtc_solve.solve.solvers import solve_reduced_rank
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(500, 6, generator=g, dtype=torch.float64)
>>> y = x @ torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 5, generator=g, dtype=torch.float64)
>>> solution = solve_reduced_rank(x.T @ x, x.T @ y)
>>> u, v = solution.factors(2)
>>> bool(torch.allclose(x @ u @ v, y))
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.maps.shortcuts import ShortcutMap

__all__ = ["ReducedRankSolution", "fitted_map", "gcv_alpha", "gram_eigh", "solve_ranks", "solve_reduced_rank",
           "sum_squared_error", "symmetric_sqrt", "train_record", "weight_root"]


def sum_squared_error(B: torch.Tensor, cxx: torch.Tensor, cxy: torch.Tensor, cyy: torch.Tensor) -> float:
    """Training loss ``Σ‖y - xB‖²`` from statistics: ``tr C_yy - 2 tr BᵀC_xy + tr BᵀC_xx B``."""
    return float(torch.trace(cyy) - 2 * (B * cxy).sum() + (B * (cxx @ B)).sum())


def fitted_map(u, v, bias, norm_mean, norm_scale, *, normalize: str, residual: bool) -> ShortcutMap:
    """The float32 :class:`ShortcutMap` of ``W = u`` (``v`` ``None``) or ``W = u v``."""
    f32 = lambda t: None if t is None else t.to(torch.float32)
    full = v is None
    return ShortcutMap(weight=f32(u) if full else None, U=None if full else f32(u), V=f32(v), bias=f32(bias),
                       norm_mean=f32(norm_mean), norm_scale=f32(norm_scale), normalize=normalize, residual=residual)


def train_record(m: ShortcutMap, sse: float, *, n: float, total_var: float, alpha, solve_s: float,
                 n_train: int) -> dict:
    """The training record of the fitted map ``m``, whose loss over ``n`` rows is ``sse``."""
    d = m.width
    return {"train_mse": sse / (n * d), "train_sse": sse, "r2": 1 - sse / total_var if total_var else 0.0,
            "params": m.n_params, "reduction": 1 - m.n_params / (d * d), "alpha": alpha, "rank": m.rank,
            "solve_s": solve_s, "n_train": n_train}


def symmetric_sqrt(gram: torch.Tensor, rcond: float | None = None):
    """Symmetric square root of a PSD matrix, its pseudo-inverse and its null space.

    Returns ``(F, F⁺, N)`` with ``F F = Γ`` on the directions whose eigenvalue exceeds
    ``rcond × λ_max`` (default ``d × eps``) and ``N`` (d × k) an orthonormal basis of the rest.
    """
    lam, q = torch.linalg.eigh(gram)
    rcond = gram.shape[0] * torch.finfo(gram.dtype).eps if rcond is None else rcond
    keep = lam > rcond * lam.max().clamp_min(1e-300)
    root, qk = lam[keep].sqrt(), q[:, keep]
    return (qk * root) @ qk.T, (qk / root) @ qk.T, q[:, ~keep]


def weight_root(g: torch.Tensor):
    """``(F, F⁺, N)`` for errors measured as ``‖e G‖²``: :func:`symmetric_sqrt` of ``G Gᵀ``."""
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
        Right singular vectors ``V`` (or ``F Q`` when weighted), columns by importance, each
        signed so that its largest entry is positive (the factors are then reproducible).
    inverse_basis : Tensor (k, d_y)
        ``Vᵀ`` (or ``Qᵀ F⁺ + C Nᵀ``): the second factor of the rank-r map.
    """

    coef: torch.Tensor
    singular_values: torch.Tensor
    basis: torch.Tensor
    inverse_basis: torch.Tensor

    @property
    def max_rank(self) -> int:
        """The number of directions the inputs span."""
        return self.basis.shape[1]

    def factors(self, rank: int | None):
        """``(U, V)`` with ``U V`` the best map of rank ``rank`` (``None``: full, ``V = None``); columns
        beyond :attr:`max_rank` are zero."""
        if rank is None:
            return self.coef, None
        kept = min(rank, self.max_rank)
        u, v = self.coef @ self.basis[:, :kept], self.inverse_basis[:kept]
        return (torch.nn.functional.pad(u, (0, rank - kept)), torch.nn.functional.pad(v, (0, 0, 0, rank - kept)))

    def coef_of_rank(self, rank: int | None) -> torch.Tensor:
        """The rank-``rank`` map as one ``d_x × d_y`` matrix."""
        u, v = self.factors(rank)
        return u if v is None else u @ v


def gram_eigh(cxx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ, Q)``, the float64 eigendecomposition of ``C_xx`` that :func:`solve_reduced_rank` and
    :func:`gcv_alpha` take as ``eigh``."""
    return torch.linalg.eigh(cxx.to(torch.float64))


def _whitener(cxx: torch.Tensor, alpha: float, rcond: float | None, eigh=None):
    """``W`` with ``W Wᵀ = (C_xx + αI)^+``, dropping directions below ``rcond × λ_max``."""
    lam, q = gram_eigh(cxx) if eigh is None else eigh
    lam = lam + alpha
    if rcond is None:
        rcond = cxx.shape[0] * torch.finfo(torch.float64).eps
    keep = lam > rcond * lam.max().clamp_min(1e-300)
    return q[:, keep] / lam[keep].sqrt()  # no column at all when every row is identical


def solve_reduced_rank(cxx: torch.Tensor, cxy: torch.Tensor, alpha: float = 0.0, *, weight=None,
                       rcond: float | None = None, eigh=None) -> ReducedRankSolution:
    """Solve least squares and every reduced-rank regression of ``y ≈ x B``.

    Parameters
    ----------
    cxx, cxy : Tensor
        Input Gram and cross-Gram matrices (centred for a fit with intercept, raw without).
    alpha : float
        Ridge penalty ``α‖B‖²``; the reduced-rank solutions then minimise the penalised loss
        under the rank constraint (reduced-rank ridge regression).
    weight : (F, F⁺, N), optional
        From :func:`weight_root` of ``G``: errors are measured as ``‖(y - xB) G‖²`` (e.g. in
        logit space); target directions ``N`` that ``G`` ignores are fitted by least squares
        on the rank-r features.
    rcond : float, optional
        Relative eigenvalue cut-off of the pseudo-inverse of ``C_xx`` (default ``d × eps``).
    eigh : (Tensor, Tensor), optional
        :func:`gram_eigh` of ``cxx``, when the caller already has it.

    Returns
    -------
    ReducedRankSolution
    """
    cxx = cxx.to(torch.float64)
    cxy = cxy.to(torch.float64)
    if alpha < 0:
        raise NJTCError("ridge alpha must be non-negative")
    w = _whitener(cxx, alpha, rcond, eigh)
    k = w.T @ cxy
    coef = w @ k
    if k.shape[0] == 0:  # constant inputs: the minimum-norm solution is the zero map
        empty = cxy.new_zeros(cxy.shape[1], 0)
        return ReducedRankSolution(coef, cxy.new_zeros(0), empty, empty.T)
    if weight is None:
        s, v = _top_right_singular(k)
        return ReducedRankSolution(coef, s, v, v.T)
    f, f_pinv, null = weight
    s, q = _top_right_singular(k @ f)
    basis = f @ q
    # least squares of the ignored target directions on the features a = x·coef·basis, whose
    # Gram Σ aᵀa = diag(s²) (the whitening makes them orthogonal): C = diag(1/s²) basisᵀ KᵀK N
    inv_s2 = torch.where(s > 0, 1.0 / s.clamp_min(1e-300) ** 2, torch.zeros_like(s))
    null_coef = inv_s2[:, None] * (basis.T @ (k.T @ (k @ null)))
    return ReducedRankSolution(coef, s, basis, q.T @ f_pinv + null_coef @ null.T)


def solve_ranks(gxx, gxt, gtt, mean_x, mean_t, *, ranks, alpha, n_rows: int, fit_intercept: bool, weight=None,
                eigh=None) -> tuple[float, dict]:
    """``(alpha, {rank: (coef, bias, U, V)})`` of one regression, every rank from one decomposition: ``alpha``
    ``"auto"`` is chosen by :func:`gcv_alpha` over ``n_rows``; ``bias`` is ``None`` without an intercept."""
    eigh = gram_eigh(gxx) if eigh is None else eigh
    alpha = (gcv_alpha(gxx, gxt, gtt, n_rows, fit_intercept=fit_intercept, eigh=eigh)[0]
             if alpha == "auto" else float(alpha))
    solution = solve_reduced_rank(gxx, gxt, alpha, weight=weight, eigh=eigh)
    solved = {}
    for rank in ranks:
        u, v = solution.factors(rank)
        coef = u if v is None else u @ v
        solved[rank] = (coef, mean_t - mean_x @ coef if fit_intercept else None, u, v)
    return alpha, solved


def _top_right_singular(k: torch.Tensor):
    """Singular values (descending) and right singular vectors of ``k`` from ``eigh(kᵀk)``, each vector
    signed so that its entry of largest magnitude is positive."""
    lam, v = torch.linalg.eigh(k.T @ k)
    lam, v = lam.flip(0).clamp_min(0), v.flip(1)
    n = min(k.shape)
    v = v[:, :n]
    peak = v.abs().argmax(0)
    sign = torch.sign(v[peak, torch.arange(n, device=v.device)])
    v = v * torch.where(sign == 0, 1.0, sign)
    return lam[:n].sqrt(), v


def gcv_alpha(cxx: torch.Tensor, cxy: torch.Tensor, cyy: torch.Tensor, n: int, *, grid=None,
              fit_intercept: bool = True, eigh=None) -> tuple[float, dict]:
    """Choose the ridge penalty by generalised cross-validation, from statistics alone.

    ``GCV(α) = (SSE(α)/n) / (1 - df(α)/n)²`` with ``df(α) = Σ λ_i/(λ_i + α)`` (plus one for an
    intercept), from the eigendecomposition of ``C_xx`` (``eigh``, if given); ``n`` is the number
    of rows. One α, chosen for the full-rank fit, serves every rank.

    Returns
    -------
    alpha : float
        The grid value with the smallest GCV score.
    scores : dict
        ``{alpha: gcv}`` for the whole grid.
    """
    cxx, cxy, cyy = (t.to(torch.float64) for t in (cxx, cxy, cyy))
    lam, q = gram_eigh(cxx) if eigh is None else eigh
    lam = lam.clamp_min(0)
    p2 = ((q.T @ cxy) ** 2).sum(1)  # squared norms of the projected cross-covariance rows
    scale = float(lam.mean())
    grid = grid if grid is not None else [0.0] + [scale * 10.0**e for e in torch.arange(-8, 2.5, 0.5).tolist()]
    scores = {}
    for alpha in grid:
        denom = lam + alpha
        ok = denom > lam.max() * cxx.shape[0] * torch.finfo(torch.float64).eps
        sse = float(torch.trace(cyy) - ((2 / denom[ok] - lam[ok] / denom[ok] ** 2) * p2[ok]).sum())
        df = float((lam[ok] / denom[ok]).sum()) + (1 if fit_intercept else 0)
        if df < n:
            scores[float(alpha)] = (max(sse, 0.0) / n) / (1 - df / n) ** 2
    if not scores:
        raise NJTCError("generalised cross-validation needs more rows than input dimensions")
    best = min(scores, key=scores.get)
    return best, scores
