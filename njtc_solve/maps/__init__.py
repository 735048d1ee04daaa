"""Fitted maps as one ``nn.Module`` per layer (:class:`~njtc_solve.maps.shortcuts.Shortcuts`): the
shortcut file format, the check that maps fit a row source, and the tuned-lens folder format
(export and import).

Owns the shortcut file format (:mod:`~njtc_solve.maps.shortcuts`) and the tuned-lens folder
(:mod:`~njtc_solve.maps.tuned_lens`). Imports :mod:`njtc_solve.data` and :mod:`njtc_solve.core`.
"""

__all__: list[str] = []
