"""Inference with the shortcuts: lossless self-speculative decoding and its calibration.

This stage owns drafting with a shortcut map as an early exit (:mod:`njtc_solve.infer.speculative`:
the first ℓ blocks, the map at layer ℓ and the model's head propose tokens; the full model,
sharing the lower blocks' KV cache, verifies them in one pass, so that the output is the model's
own greedy output) and the choice of the exit layer and the draft length from measured acceptance
and cost (:mod:`njtc_solve.infer.calibrate`). It may import :mod:`njtc_solve.core`,
:mod:`njtc_solve.data`, :mod:`njtc_solve.maps` and :mod:`njtc_solve.evaluation`, never the command
layer nor the fitting stage (maps arrive fitted, as :class:`~njtc_solve.maps.shortcuts.Shortcuts`).
"""

__all__: list[str] = []
