"""The metrics of a shortcut's logits against the model's own: pure functions of ``(rows, vocab)``
logits giving one value per row, used by evaluation, the lens and the KL trainer.

Examples
--------
>>> import torch
>>> final = torch.tensor([[2.0, 0.0, -1.0]])
>>> float(kl_divergence(final, final))
0.0
>>> bool(kl_divergence(final, torch.zeros(1, 3)) > 0)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Reference", "entropy", "hits_at_k", "kl_divergence", "surprisal"]


@dataclass
class Reference:
    """The model's own distribution over a chunk of rows: ``logp``, ``p`` and ``neg_entropy`` (``Σ p log p``)."""

    logp: torch.Tensor
    p: torch.Tensor
    neg_entropy: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> Reference:
        """The reference distribution of the model's final ``logits``."""
        logp = torch.log_softmax(logits, -1)
        p = logp.exp()
        return cls(logp, p, torch.einsum("rv,rv->r", p, logp))


def kl_divergence(reference, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref ‖ softmax(logits))`` per row as ``Σ p (log p − log q)`` (small terms, no cancellation),
    differentiable in ``logits``; ``reference``: the model's final logits or their :class:`Reference`."""
    if not isinstance(reference, Reference):
        reference = Reference.from_logits(reference)
    log_q = torch.log_softmax(logits, -1)
    if log_q.requires_grad:  # the trainer: log_softmax's backward needs its output untouched
        return (reference.p * (reference.logp - log_q)).sum(-1)
    # evaluation: one vocabulary-sized temporary, reused in place, and a fused reduction
    return torch.einsum("rv,rv->r", reference.p, log_q.neg_().add_(reference.logp))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` per row."""
    return -Reference.from_logits(logits).neg_entropy


def surprisal(reference: Reference, predicted: torch.Tensor) -> torch.Tensor:
    """``-log p_ref(predicted)`` per row: how surprised the model is by the shortcut's top-1."""
    return -reference.logp.gather(1, predicted[:, None])[:, 0]


def hits_at_k(model_topk: torch.Tensor, predicted: torch.Tensor, k: int) -> torch.Tensor:
    """Whether the shortcut's top-1 ``predicted`` is among the model's own top-``k`` (per row)."""
    return (model_topk[:, :k] == predicted[:, None]).any(1)
