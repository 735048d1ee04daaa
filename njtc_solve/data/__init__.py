"""Rows of a model's residual stream: the corpus and its plan, the capture hooks, the HDF5 activation
store (its format, reader, writer and shards), the row-source protocol, the live source and extraction.
Imports :mod:`njtc_solve.core` only."""

__all__: list[str] = []
