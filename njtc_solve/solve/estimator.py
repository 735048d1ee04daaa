"""A scikit-learn estimator for reduced-rank (ridge) regression, fitted from streamed statistics."""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, MultiOutputMixin, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from njtc_solve.solve.solvers import solve_reduced_rank
from njtc_solve.solve.stats import MomentAccumulator

__all__ = ["ReducedRankRegressor"]


class ReducedRankRegressor(MultiOutputMixin, RegressorMixin, BaseEstimator):
    """Multi-output linear regression whose coefficient matrix has rank at most ``rank``: the exact
    minimiser of ``‖Y - XB - b‖² + α‖B‖²``, from streamed statistics (``partial_fit`` adds a batch).

    Parameters
    ----------
    rank : int or None, default=None
        Maximum rank of the coefficient matrix; ``None`` for full rank.
    alpha : float, default=0.0
        Ridge penalty.
    fit_intercept : bool, default=True
        Fit a bias ``b``.

    Attributes
    ----------
    coef_ : ndarray of shape (n_targets, n_features) or (n_features,)
        The coefficients (scikit-learn's orientation).
    intercept_ : ndarray of shape (n_targets,) or float
    left_factor_ : ndarray of shape (n_features, r)
    right_factor_ : ndarray of shape (r, n_targets)
        ``coef_.T == left_factor_ @ right_factor_`` when ``rank`` is set.
    singular_values_ : ndarray
        Singular values of the whitened cross-covariance (loss reduction per rank, squared).
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from njtc_solve.solve.estimator import ReducedRankRegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 6)); Y = X @ rng.normal(size=(6, 2)) @ rng.normal(size=(2, 5))
    >>> ReducedRankRegressor(rank=2).fit(X, Y).score(X, Y) > 0.999
    True
    """

    def __init__(self, rank=None, alpha=0.0, fit_intercept=True):
        self.rank = rank
        self.alpha = alpha
        self.fit_intercept = fit_intercept

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    def fit(self, X, y):
        """Fit on all of ``X`` and ``y``; returns ``self``."""
        for attr in ("_acc", "_y_1d"):
            self.__dict__.pop(attr, None)
        return self.partial_fit(X, y)

    def partial_fit(self, X, y):
        """Add a batch of rows to the statistics and re-solve; returns ``self`` (a bad ``rank`` or ``alpha``
        is refused before anything changes)."""
        self._check_params()
        first = not hasattr(self, "_acc")
        X, y = validate_data(self, X, y, reset=first, multi_output=True, y_numeric=True,
                             dtype=[np.float64, np.float32])
        y_1d = y.ndim == 1
        y2 = y.reshape(-1, 1) if y_1d else y
        if first:
            self._acc = MomentAccumulator([0], float64=True)
            self._y_1d = y_1d
        elif y2.shape[1] != self._acc.sums["syy"].shape[0]:
            raise ValueError(f"y has {y2.shape[1]} targets; earlier batches had {self._acc.sums['syy'].shape[0]}")
        self._acc.update({0: np.asarray(X, np.float64)}, np.asarray(y2, np.float64))
        self._solve()
        return self

    def _check_params(self) -> None:
        """Refuse a bad ``rank`` or ``alpha``."""
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, Integral)
                                      or self.rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, Real) or not (math.isfinite(self.alpha)
                                                                                  and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite non-negative number, got {self.alpha!r}")

    def _solve(self):
        """Solve from the statistics so far."""
        stats = self._acc.finalize()
        m = stats.layers[0]
        if self.fit_intercept:
            cxx, cxy = m.cxx, m.cxy
        else:
            cxx, cxy, _ = stats.raw(0)
        solution = solve_reduced_rank(cxx, cxy, float(self.alpha))
        u, v = solution.factors(self.rank)
        coef = u if v is None else u @ v
        intercept = stats.mean_y - m.mean_x @ coef if self.fit_intercept else torch.zeros_like(stats.mean_y)
        self.singular_values_ = solution.singular_values.numpy()
        if v is not None:
            self.left_factor_, self.right_factor_ = u.numpy(), v.numpy()
        self.coef_ = coef.T.numpy()
        self.intercept_ = intercept.numpy()
        if self._y_1d:
            self.coef_, self.intercept_ = self.coef_[0], float(self.intercept_[0])

    def predict(self, X):
        """Predict targets for ``X``."""
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return np.asarray(X, np.float64) @ self.coef_.T + self.intercept_
