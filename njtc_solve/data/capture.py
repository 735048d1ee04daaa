"""The residual stream of a live model, the one capture every consumer uses, and the head check.

Layer 0 is the input of the first block (the embedding output, after any scaling or projection),
layer ``l`` the output of block ``l``, and layer ``L`` the last block's output *before* the final norm.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from njtc_solve.core.decoder import Decoder
from njtc_solve.core.errors import NJTCError

__all__ = ["CapturedBatch", "capture_residual_stream", "check_head", "forward_batches", "head_check_tolerance"]


@contextmanager
def capture_residual_stream(model):
    """Hook ``model`` so each forward pass records the residual stream at every layer.

    Yields a list that, after a forward pass, holds the ``L + 1`` layers' ``(batch, seq, d)`` tensors.

    Examples
    --------
    >>> import torch
    >>> with capture_residual_stream(model) as hidden, torch.no_grad():
    ...     _ = model(input_ids=torch.tensor([[5, 17, 42]]))
    >>> len(hidden) == model.config.num_hidden_layers + 1, tuple(hidden[0].shape)
    (True, (1, 3, 32))
    """
    decoder = Decoder.of(model)
    captured: list[torch.Tensor] = []

    def before_first(h, args, kwargs):
        captured.clear()
        captured.append(h)

    points = {"block_in.0": before_first}
    points.update({f"block_out.{i}": lambda h, output: captured.append(h) for i in range(decoder.n_blocks)})
    with decoder.hooks(points):
        yield captured


@dataclass
class CapturedBatch:
    """The rows of one forward pass over a batch of a plan's sequences (``rows``: their slice in the plan).

    ``hidden[l]`` holds layer ``l``'s rows ``(rows, d)``, ``logits`` and ``tokens`` the model's logits and
    the input token at each row.
    """

    sequences: slice
    rows: slice
    hidden: list[torch.Tensor]
    logits: torch.Tensor
    tokens: torch.Tensor


def _rows(t: torch.Tensor, pick) -> torch.Tensor:
    """Rows of a (batch, seq, ...) tensor: all positions as a view, or ``t[pick]``."""
    return t.reshape(-1, *t.shape[2:]) if pick is None else t[pick]


def forward_batches(model, plan, batch_size: int, first_batch: int = 0) -> Iterator[CapturedBatch]:
    """Run the model over ``plan``'s sequences, ``batch_size`` at a time, yielding their rows.

    Each batch's tensors are the model's own, valid until the next batch is asked for.
    """
    device = next(model.parameters()).device
    n_batches = -(-len(plan.sequence) // batch_size)
    with capture_residual_stream(model) as captured, torch.no_grad():
        for b in range(first_batch, n_batches):
            seqs = slice(b * batch_size, min((b + 1) * batch_size, len(plan.sequence)))
            ids = torch.as_tensor(plan.token_ids[seqs], device=device)
            logits = model(input_ids=ids).logits
            # rows of this batch: every position (a view), or one per sequence (a gather)
            pick = None if plan.position is None else (
                torch.arange(ids.shape[0], device=device),
                torch.as_tensor(plan.row_positions(seqs), device=device))
            r0 = seqs.start * plan.rows_per_sequence
            rows = slice(r0, r0 + ids.shape[0] * plan.rows_per_sequence)
            yield CapturedBatch(seqs, rows, [_rows(h, pick) for h in captured], _rows(logits, pick),
                                _rows(ids, pick))


def head_check_tolerance(model_dtype: torch.dtype, store_dtype: str = "float32") -> tuple[float, float]:
    """``(max relative logit error, min top-1 agreement)`` that the head check accepts.

    16-bit storage or a 16-bit model round the logits and may flip a near-tie top-1; a wrong head is
    off by far more.
    """
    if model_dtype == torch.bfloat16 or store_dtype == "bfloat16":
        return 5e-2, 0.9
    if model_dtype == torch.float16 or store_dtype != "float32":
        return 2e-2, 0.9
    return 1e-4, 0.99


def check_head(head, last_layer: torch.Tensor, model_logits: torch.Tensor, model_dtype=torch.float32,
               store_dtype: str = "float32", record: dict | None = None) -> dict:
    """Check that ``head(last_layer)`` reproduces the model's own logits on a sample of rows.

    Returns ``max_abs_err``, ``rel_err`` (over the largest absolute logit) and ``top1_agreement``, also
    put into ``record``; raises :class:`NJTCError` when they are beyond :func:`head_check_tolerance`.
    """
    model_logits = model_logits.float().cpu()
    head_logits = head.logits(last_layer.float().cpu())
    err = (head_logits - model_logits).abs().max().item()
    rel = err / max(model_logits.abs().max().item(), 1e-30)
    agreement = float((head_logits.argmax(-1) == model_logits.argmax(-1)).float().mean())
    figures = {"max_abs_err": err, "rel_err": rel, "top1_agreement": agreement}
    if record is not None:
        record.update(figures)
    tolerance, min_agreement = head_check_tolerance(model_dtype, store_dtype)
    if rel > tolerance or agreement < min_agreement:
        raise NJTCError(f"the head does not reproduce the model's logits (relative error {rel:.2e}, top-1 "
                        f"agreement {agreement:.3f}); the architecture table is wrong for this model")
    return figures
