"""Block pruning to a standard checkpoint: block statistics (:mod:`~njtc_solve.prune.replacement_statistics`),
the closed-form replacement and its fold (:mod:`~njtc_solve.prune.replacement`), the checkpoint
(:mod:`~njtc_solve.prune.checkpoint`), scoring and choosing on held-out documents
(:mod:`~njtc_solve.prune.scoring`, :mod:`~njtc_solve.prune.selection`).

``python -m njtc_solve.prune`` runs the command (:mod:`njtc_solve.cli.prune`).
"""

__all__: list[str] = []
