"""Evaluation of fitted maps: held-out metrics, maps between any two layers, block skipping, reports and the
live lens. Imports :mod:`njtc_solve.maps`, :mod:`njtc_solve.data` and :mod:`njtc_solve.core`."""

__all__: list[str] = []
