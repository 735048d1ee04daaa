"""Fitted maps as modules and their files: shortcut files, saved-maps folders, tuned-lens and Jacobian-lens
folders, and the check that maps belong to a model. Imports :mod:`njtc_solve.data` and :mod:`njtc_solve.core`."""

__all__: list[str] = []
