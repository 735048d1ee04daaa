"""Block skipping: run a decoder with blocks ``[start, end)`` replaced by a map on the residual stream.

``h_end ≈ f(h_start)``, then the model's own blocks ``end..L-1`` and head. One forward pass per batch
records every block's input and call arguments; each replacement reruns only the blocks after ``end``.

Examples
--------
>>> import torch
>>> from njtc_solve.evaluation.block_skip import SkipRunner
>>> runner = SkipRunner(model)
>>> ids = torch.tensor([[5, 17, 42, 7]])
>>> runner.record(ids)
>>> exact = runner.logits(1, 2, lambda h: runner.run_blocks(h, 1, 2))   # the true block as the map
>>> bool(torch.allclose(exact, model(input_ids=ids).logits, atol=1e-5))
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from njtc_solve.core.decoder import Decoder, Recording
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.metrics import Reference, kl_divergence

__all__ = ["SkipRunner", "skip_scores"]


class SkipRunner:
    """A decoder (a transformers causal LM) whose blocks ``[start, end)`` can be replaced by a callable."""

    def __init__(self, model):
        self.decoder = Decoder.of(model)
        self.n_layers, self.head = self.decoder.n_blocks, self.decoder.head
        self.recording: Recording | None = None  # the last recorded batch
        self.hidden = []  # its layers 0..L (block inputs, the last output)
        self._references: dict = {}  # (from_position, chunk_rows) -> the full model's distributions

    def record(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Run the model once on a batch and keep every block's input and call arguments."""
        self.recording = self.decoder.record(input_ids, attention_mask)
        self.hidden = self.recording.hidden
        self._references = {}

    def references(self, from_position: int = 0, chunk_rows: int = 256) -> list:
        """The full model's distributions at positions ``>= from_position`` of the recorded batch, in chunks of
        ``chunk_rows`` rows; computed once per batch."""
        key = (from_position, chunk_rows)
        if key not in self._references:
            full = self.hidden[-1][:, from_position:].reshape(-1, self.hidden[-1].shape[-1])
            head = self.head.to(full.device)
            with torch.no_grad():
                self._references[key] = [Reference.from_logits(head.logits(full[i:i + chunk_rows].float()))
                                         for i in range(0, len(full), chunk_rows)]
        return self._references[key]

    def run_blocks(self, h: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run the model's own blocks ``start..end-1`` on ``h`` (batch, seq, d), with the recorded arguments."""
        if self.recording is None:
            raise NJTCError("call record() first")
        return self.decoder.run_blocks(self.recording, h, start, end)

    def last_layer(self, start: int, end: int, replace: Callable, keep_positions: int = 0) -> torch.Tensor:
        """Layer ``L`` with blocks ``[start, end)`` replaced: ``replace(h_start)`` (batch, seq, d) stands for
        ``h_end``, but at the first ``keep_positions`` positions."""
        if not 0 <= start < end <= self.n_layers:
            raise NJTCError(f"cannot replace blocks [{start}, {end}): need 0 <= start < end <= {self.n_layers}")
        if not self.hidden:
            raise NJTCError("call record() first")
        with torch.no_grad():
            h = replace(self.hidden[start]).to(self.hidden[end].dtype)
            if keep_positions > 0:
                h = torch.cat([self.hidden[end][:, :keep_positions], h[:, keep_positions:]], dim=1)
            return self.run_blocks(h, end, self.n_layers)

    def logits(self, start: int, end: int, replace: Callable, keep_positions: int = 0) -> torch.Tensor:
        """The model's logits with blocks ``[start, end)`` replaced (float32, through :class:`Head`)."""
        h = self.last_layer(start, end, replace, keep_positions)
        head = self.head.to(h.device)
        return head.logits(h.float())


def skip_scores(runner: SkipRunner, start: int, end: int, replace: Callable, *, keep_positions: int = 0,
                from_position: int = 0, chunk_rows: int = 256) -> dict:
    """``{"kl": sum, "agree": count, "n": rows}``: KL(full ‖ skipped) and top-1 agreements of a replacement
    over the recorded batch's positions ``>= from_position``."""
    last = runner.last_layer(start, end, replace, keep_positions)[:, from_position:]
    last = last.reshape(-1, last.shape[-1])
    head = runner.head.to(last.device)
    kl = agree = 0.0
    with torch.no_grad():
        for i, ref in zip(range(0, len(last), chunk_rows), runner.references(from_position, chunk_rows)):
            got = head.logits(last[i:i + chunk_rows].float())
            kl += float(kl_divergence(ref, got).sum())
            agree += float((ref.logp.argmax(-1) == got.argmax(-1)).sum())
    return {"kl": kl, "agree": agree, "n": len(last)}
