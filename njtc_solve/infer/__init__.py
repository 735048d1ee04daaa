"""Inference with the shortcuts: lossless self-speculative decoding (:mod:`njtc_solve.infer.speculative`)
and the choice of its exit layer and draft length (:mod:`njtc_solve.infer.calibrate`).

Maps arrive fitted (:class:`~njtc_solve.maps.shortcuts.Shortcuts`): this stage never imports the fitting stage.
"""

__all__: list[str] = []
