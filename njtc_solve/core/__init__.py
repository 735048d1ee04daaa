"""Shared foundations: errors and outputs, the family table, model loading, the head, the decoder,
metrics, process groups and parameter checks. Imports nothing else of the package."""

__all__: list[str] = []
