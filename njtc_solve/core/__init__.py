"""Shared foundations: errors and atomic outputs, the one table of supported model families, model
loading and identity, the model's head (final norm + unembedding), the decoder (the one room that
hooks, replays, passes through or removes a live model's blocks), the pure metrics, process groups.

Owns: :mod:`~njtc_solve.core.errors`, :mod:`~njtc_solve.core.outputs`,
:mod:`~njtc_solve.core.architectures`, :mod:`~njtc_solve.core.models`,
:mod:`~njtc_solve.core.head`, :mod:`~njtc_solve.core.decoder`, :mod:`~njtc_solve.core.metrics`,
:mod:`~njtc_solve.core.distributed`. Imports nothing else of the package: every other stage
imports from here.
"""

__all__: list[str] = []
