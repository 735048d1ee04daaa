"""Evaluation of fitted maps: held-out Precision@k, surprisal and KL, any-layer heatmaps, the run of a
model's remaining blocks after a replaced range, reports (tables and plots) and the live lens.

Owns the report's files (:mod:`~njtc_solve.evaluation.report`). Imports :mod:`njtc_solve.maps`,
:mod:`njtc_solve.data` and :mod:`njtc_solve.core`.
"""

__all__: list[str] = []
