"""Scoring a block replacement on a cached sample: the full model's states, the tail run, held-out KL.

The full model runs once over a set of sequences and its states and log-probabilities are cached
(:func:`collect_reference`, :class:`ReferenceSample`). A replacement of blocks ``S..S+K-1`` is then
scored by running only the blocks after the removed ones on the stream block ``S-1`` writes once
the map is folded in (:func:`replaced_stream`, :func:`tail_logits`): the folded checkpoint's logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from njtc_solve.core.architectures import FoldSpec
from njtc_solve.core.decoder import Decoder
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.metrics import Reference, kl_divergence
from njtc_solve.data.capture import forward_batches
from njtc_solve.prune.replacement import Replacement
from njtc_solve.prune.replacement_statistics import batch_states

__all__ = ["HeldOut", "ReferenceSample", "clustered_se", "collect_held_out", "collect_reference", "replaced_stream",
           "score_replacement", "tail_logits"]


@dataclass
class ReferenceSample:
    """The full model on a sample of sequences (held-out or training), cached to score or train replacements.

    ``token_ids`` (n_seq, seq); ``hidden[l]`` layer ``l``'s stream and ``mlp[i]`` block ``i``'s
    MLP output, ``(n_seq, seq, d)`` float32 on the CPU (``None``: not kept); ``logp`` the full
    model's log-probabilities ``(n_seq, seq, V)``; ``document`` every token's document
    ``(n_seq, seq)`` (``None``: each sequence its own).
    """

    token_ids: torch.Tensor
    hidden: list
    mlp: list
    logp: torch.Tensor
    document: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        """Tokens cached."""
        return self.token_ids.numel()

    def clusters(self) -> tuple[np.ndarray, np.ndarray]:
        """``(cluster of every token, tokens per cluster)``: the documents numbered 0..G-1 in sorted order
        (each sequence its own cluster without ``document``)."""
        shape = tuple(self.token_ids.shape)
        owner = (np.repeat(np.arange(shape[0]), shape[1]) if self.document is None
                 else np.asarray(self.document).reshape(-1))
        _, label, counts = np.unique(owner, return_inverse=True, return_counts=True)
        return label.reshape(-1), counts

    def full_metrics(self) -> dict:
        """Perplexity of the full model itself on the sample's next tokens."""
        nll = -self.logp[:, :-1].float().gather(-1, self.token_ids[:, 1:, None].to(self.logp.device))[..., 0]
        return {"kl": 0.0, "top1": 1.0, "ppl": math.exp(float(nll.double().mean())), "nll": float(nll.double().mean())}

    def check_start(self, start: int) -> None:
        """Refuse a start whose states were not kept."""
        if self.hidden[start] is None or self.mlp[start - 1] is None:
            raise NJTCError(f"the cached sequences do not hold the states of start {start}")


def collect_reference(model, plan, *, batch_size: int = 8, starts=None, fold: FoldSpec | None = None,
                      logp_dtype=torch.float32, bar=None) -> ReferenceSample:
    """Run the full model over ``plan``'s sequences and cache what scoring needs (:class:`ReferenceSample`).

    ``starts`` keeps only the layers those starts read (default: every layer); ``logp_dtype`` is
    the log-probabilities' type; ``bar`` (tqdm) advances by each batch's tokens.
    """
    hidden, mlps, logps = None, None, []
    keep_h = keep_m = None
    if starts is not None:
        keep_h, keep_m = {int(s) for s in starts}, {int(s) - 1 for s in starts}
    with Decoder.of(model).mlp_outputs(fold) as mlp:
        for batch in forward_batches(model, plan, batch_size):
            h, m = batch_states(batch, mlp, plan.seq_len)
            if hidden is None:
                hidden, mlps = [[] for _ in h], [[] for _ in m]
            for store, new, keep in ((hidden, h, keep_h), (mlps, m, keep_m)):
                for i, t in enumerate(new):
                    if keep is None or i in keep:
                        store[i].append(t.detach().float().cpu().clone())
            logps.append(torch.log_softmax(batch.logits.float(), -1).reshape(h[0].shape[0], plan.seq_len, -1)
                         .to("cpu", logp_dtype))
            if bar is not None:
                bar.update(batch.tokens.numel())
    return ReferenceSample(torch.as_tensor(plan.token_ids), [torch.cat(t) if t else None for t in hidden],
                           [torch.cat(t) if t else None for t in mlps], torch.cat(logps), np.asarray(plan.document))


HeldOut = ReferenceSample
collect_held_out = collect_reference


def tail_logits(model, token_ids: torch.Tensor, stream: torch.Tensor, *, first_block: int,
                grad: bool = False) -> torch.Tensor:
    """The model's logits when ``stream`` (batch, seq, d) enters block ``first_block`` and only the rest run.

    ``first_block`` past the last block sends ``stream`` to the final norm; ``grad`` keeps the
    graph (:meth:`njtc_solve.core.decoder.Decoder.run_from`).
    """
    return Decoder.of(model).run_from(token_ids, stream, first_block=first_block, grad=grad)


def replaced_stream(sample: ReferenceSample, replacement: Replacement, seqs: slice) -> torch.Tensor:
    """``h_S + m_{S-1}(T - I) + c``: the stream block ``S-1`` writes once the map is folded in."""
    s = replacement.start
    sample.check_start(s)
    h = sample.hidden[s][seqs]
    if replacement.name == "drop":
        return h
    m = sample.mlp[s - 1][seqs].double()
    eye = torch.eye(m.shape[-1], dtype=torch.float64)
    out = h.double() + m @ (replacement.T.double().cpu() - eye)
    if replacement.c is not None:
        out = out + replacement.c.double().cpu()
    return out.float()


def clustered_se(sums, counts) -> float:
    """Standard error of a mean over tokens whose values are correlated within clusters (documents).

    Parameters
    ----------
    sums, counts : array
        Per cluster, the sum of its tokens' values and the number of its tokens.

    Returns
    -------
    float
        The cluster-robust standard error of ``sum(sums) / sum(counts)``,
        ``sqrt(G / (G-1) · Σ_g (S_g − n_g·mean)²) / n`` for ``G`` clusters; ``nan`` below two.
    """
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    groups = len(sums)
    if groups < 2:
        return math.nan
    n = counts.sum()
    residual = sums - counts * (sums.sum() / n)
    return float(math.sqrt(groups / (groups - 1) * float((residual ** 2).sum())) / n)


def score_replacement(model, sample: ReferenceSample, replacement: Replacement, *, chunk_sequences: int = 4) -> dict:
    """KL(full ‖ replaced) and top-1 agreement over every position, and perplexity on the next tokens.

    Also ``kl_per_sequence`` (each sequence's mean KL), ``kl_by_document`` (each document's sum,
    in :meth:`ReferenceSample.clusters` order) and ``kl_se`` (clustered by document, :func:`clustered_se`).
    """
    agree = nll = 0.0
    per_seq, per_token = [], []
    n_rows = n_next = 0
    first = replacement.start + replacement.remove
    for s0 in range(0, len(sample.token_ids), chunk_sequences):
        seqs = slice(s0, s0 + chunk_sequences)
        ids = sample.token_ids[seqs]
        logits = tail_logits(model, ids, replaced_stream(sample, replacement, seqs), first_block=first).float().cpu()
        logp = sample.logp[seqs].float()
        flat = logp.reshape(-1, logp.shape[-1])
        rows = kl_divergence(Reference(flat, flat.exp(), None), logits.reshape(-1, logits.shape[-1])).double()
        per_seq += rows.reshape(ids.shape).mean(1).tolist()
        per_token.append(rows.numpy())
        logq = torch.log_softmax(logits, -1)
        agree += float((logq.argmax(-1) == logp.argmax(-1)).sum())
        nll -= float(logq[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].double().sum())
        n_rows += ids.numel()
        n_next += ids[:, 1:].numel()
    label, counts = sample.clusters()
    by_document = np.bincount(label, weights=np.concatenate(per_token), minlength=len(counts))
    return {"kl": float(by_document.sum() / counts.sum()), "kl_se": clustered_se(by_document, counts),
            "top1": agree / n_rows, "ppl": math.exp(nll / n_next), "nll": nll / n_next, "kl_per_sequence": per_seq,
            "kl_by_document": by_document.tolist()}
