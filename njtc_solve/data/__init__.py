"""Rows of a model's residual stream: corpus -> split -> sequences (the plan), the forward hooks that
capture layers 0..L, the HDF5 activation store (reader and writer), the row-source protocol and the
live source that runs the model instead of reading a store, and extraction.

Owns the activation store's file format (:mod:`~njtc_solve.data.store`). Imports
:mod:`njtc_solve.core` only.
"""

__all__: list[str] = []
