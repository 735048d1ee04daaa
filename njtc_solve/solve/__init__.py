"""Solvers: one streaming pass of sufficient statistics, the closed-form solves (least squares,
reduced rank, logit-weighted, ridge by GCV), any-layer statistics, the fit of a store or a live
model, the scikit-learn estimator, and gradient training and refinement of maps on KL or MSE.

Owns the statistics file format (:mod:`~njtc_solve.solve.stats`). Imports
:mod:`njtc_solve.maps`, :mod:`njtc_solve.data` and :mod:`njtc_solve.core`.
"""

__all__: list[str] = []
