"""Block pruning to a standard checkpoint: block statistics, the closed-form replacement and its
fold into an existing weight (:mod:`~njtc_solve.prune.folding`), and choosing and scoring the
replacement on held-out documents (:mod:`~njtc_solve.prune.selection`).

``python -m njtc_solve.prune`` runs the command (:mod:`njtc_solve.cli.prune`). Owns the pruned
checkpoint's record. Imports :mod:`njtc_solve.solve`, :mod:`njtc_solve.data` and
:mod:`njtc_solve.core`.
"""

__all__: list[str] = []
