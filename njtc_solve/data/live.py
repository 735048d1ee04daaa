"""Rows straight from a model's forward pass: the live counterpart of an activation store."""

from __future__ import annotations

import numpy as np
import torch

from njtc_solve.core.decoder import Decoder
from njtc_solve.data.capture import check_head, forward_batches
from njtc_solve.data.corpus import corpus_sha256
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head
from njtc_solve.core.models import model_sha256
from njtc_solve.data.plan import ExtractionPlan, PlanSpec, plan_extraction
from njtc_solve.data.rows import FINAL_TOPK, TRAIN, RowSourceBase, split_code, split_provenance

__all__ = ["LiveSource"]


class LiveSource(RowSourceBase):
    """A :class:`~njtc_solve.data.rows.RowSource` running the model over the extraction plan, never storing a row.

    The same settings give the same rows, split and order as a store extracted with them.

    Parameters
    ----------
    model, tokenizer
        A supported Hugging Face causal LM (any dtype, device or device map) and its tokenizer.
    documents : list of str
        The corpus (:func:`njtc_solve.data.corpus.load_corpus`).
    model_name : str
        Recorded in the provenance of what is fitted.
    seq_len, positions, max_tokens, val_fraction, seed, bos
        The extraction plan (:func:`njtc_solve.data.plan.plan_extraction`).
    batch_size : int
        Sequences per forward pass.
    weights_sha : str, optional
        The model's :func:`~njtc_solve.core.models.model_sha256` when already known.
    progress : bool
        Show a bar while the weights are hashed.

    Examples
    --------
    >>> from njtc_solve.solve.fit import fit_shortcuts
    >>> live = LiveSource(model, tokenizer, documents, seq_len=32, max_tokens=2048)
    >>> [jtc] = fit_shortcuts(live, method="jtc", progress=False)
    >>> sorted(jtc.maps), jtc.provenance["split_id"] == live.provenance["split_id"]
    ([0, 1, 2], True)
    """

    _held_by = "model"

    def __init__(self, model, tokenizer, documents, *, model_name: str = "", seq_len: int = PlanSpec.seq_len,
                 positions: str = PlanSpec.positions, max_tokens: int | None = PlanSpec.max_tokens,
                 val_fraction: float = PlanSpec.val_fraction, seed: int = PlanSpec.seed, bos: str = PlanSpec.bos,
                 batch_size: int = PlanSpec.batch_size, weights_sha: str | None = None,
                 progress: bool = False):
        if batch_size < 1:
            raise NJTCError(f"`batch_size` must be positive, not {batch_size}")
        self.model = model
        self.plan: ExtractionPlan = plan_extraction(tokenizer, documents, seq_len=seq_len, positions=positions,
                                                    max_tokens=max_tokens, val_fraction=val_fraction, seed=seed,
                                                    bos=bos)
        self.batch_size = batch_size
        decoder = Decoder.of(model)
        self.n_layers, self._head = decoder.n_blocks, decoder.head
        self.d_model = self._head.d_model
        self.model_sha256 = weights_sha or model_sha256(model, progress)
        self.path = f"live:{model_name or type(model).__name__}"
        attrs = {"corpus_sha256": corpus_sha256(documents), "seed": seed, "val_fraction": float(val_fraction),
                 "seq_len": seq_len, "positions": positions, "max_tokens": -1 if max_tokens is None else max_tokens,
                 "bos": self.plan.bos}
        self.provenance = split_provenance(attrs, self.plan.validation_documents, self.path)
        self._checked = False
        self._row_split = np.repeat(self.plan.split, self.plan.rows_per_sequence)
        self._row_position = self.plan.row_positions(slice(None))
        self._row_document = self.plan.row_documents()

    def head(self) -> Head:
        """The model's final norm and unembedding (float32, on the CPU)."""
        return self._head

    @property
    def layers(self) -> list[int]:
        """Every layer of the model, 0..L: a forward pass reads them all."""
        return list(range(self.n_layers + 1))

    def selection(self, split=None, skip_positions: int = 0) -> np.ndarray:
        """Boolean mask of the plan's rows in ``split`` at positions ``>= skip_positions``."""
        code = split_code(split)
        keep = self._row_position >= skip_positions
        return keep if code is None else keep & (self._row_split == code)

    def evaluated_documents(self, skip_positions: int = 0) -> np.ndarray:
        """The documents of the validation rows at positions ``>= skip_positions``."""
        return np.unique(self._row_document[self.selection("validation", skip_positions)])

    def iter_chunks(self, layers, split=None, chunk_rows: int = 4096, max_rows: int | None = None,
                    shard: tuple[int, int] = (0, 1), skip_positions: int = 0):
        """Yield ``(row_indices, chunk)`` of ``split``, one forward pass of ``batch_size`` sequences per chunk.

        ``chunk[layer]`` is a float32 tensor on that layer's device; outside the training split
        ``chunk["final_topk"]`` holds the model's own top-k. ``chunk_rows`` is not used; ``shard``
        gives each process a contiguous block of the split's sequences. The first batch checks the head.
        """
        layers = self.check_layers(layers)
        keep = self.selection(split, skip_positions)
        code = split_code(split)
        sequences = np.flatnonzero(self.plan.split == code) if code is not None else np.arange(len(self.plan.split))
        rank, world = shard
        sequences = sequences[rank * len(sequences) // world: (rank + 1) * len(sequences) // world]
        if len(sequences) == 0:
            return
        # the split's sequences are contiguous in the plan: train first, then validation
        first, last = int(sequences[0]), int(sequences[-1]) + 1
        part = self.plan.sequences(slice(first, last))
        offset = first * self.plan.rows_per_sequence
        model_dtype = next(self.model.parameters()).dtype
        taken = 0
        for batch in forward_batches(self.model, part, self.batch_size):
            rows = np.arange(batch.rows.start, batch.rows.stop) + offset
            pick = keep[rows]
            if not self._checked:  # before the long pass: the head must reproduce the model's logits
                check_head(self._head, batch.hidden[self.n_layers][:64], batch.logits[:64], model_dtype)
                self._checked = True
            if max_rows is not None:
                pick &= np.cumsum(pick) <= max_rows - taken
            if not pick.any():
                if max_rows is not None and taken >= max_rows:
                    return
                continue
            index = torch.as_tensor(np.flatnonzero(pick), device=batch.logits.device)
            chunk = {l: batch.hidden[l][index.to(batch.hidden[l].device)].float() for l in layers}
            if code != TRAIN:  # what evaluation compares with; a fit needs no top-k of its rows
                chunk["final_topk"] = batch.logits[index].topk(FINAL_TOPK, -1).indices
            taken += int(pick.sum())
            yield rows[pick], chunk
            if max_rows is not None and taken >= max_rows:
                return
