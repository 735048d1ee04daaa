"""Rows straight from a model's forward pass: the live counterpart of an activation store.

A row source is what the fit, evaluation and the trainer read: ``n_layers``, ``d_model``,
``model_sha256``, ``provenance``, ``default_skip_positions``, ``head()``,
``check_layers(layers)``, ``count(split, skip_positions)``, ``evaluated_documents(skip)``
and ``iter_chunks(layers, split, chunk_rows, max_rows, shard, skip_positions)`` yielding
``(row_indices, {layer: rows (n, d)})``. :class:`~njtc_solve.store.ActivationStore` is one,
reading a cache; :class:`LiveSource` is the other, running the model over the same
extraction plan (same split, seed, positions and row order as ``python -m
njtc_solve.extract``) and never writing an activation. Its chunks also hold the model's own
top-k at every validation row under ``"final_topk"``.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from .architectures import resolve_parts
from .capture import check_head, forward_batches
from .corpus import corpus_sha256
from .errors import NJTCError
from .head import Head
from .models import model_sha256
from .plan import ExtractionPlan, plan_extraction
from .store import DEFAULT_SKIP_POSITIONS, FINAL_TOPK, SPLITS, TRAIN, ActivationStore, split_provenance

__all__ = ["LiveSource", "live_source_from_args", "rows_from_args"]

class LiveSource:
    """Training or validation rows of a live model over a corpus, one forward pass per batch.

    Parameters
    ----------
    model, tokenizer
        A supported Hugging Face causal LM (any dtype, device or device map) and its tokenizer.
    documents : list of str
        The corpus (see :func:`njtc_solve.corpus.load_corpus`).
    model_name : str
        Recorded in the provenance of what is fitted.
    seq_len, positions, max_tokens, val_fraction, seed, bos
        The extraction plan (see :func:`njtc_solve.plan.plan_extraction`); the same values
        give the same rows as a store extracted with them.
    batch_size : int
        Sequences per forward pass.
    weights_sha : str, optional
        The model's :func:`~njtc_solve.models.model_sha256` when already known.
    progress : bool
        Show a bar while the weights are hashed.

    Examples
    --------
    >>> from njtc_solve.fit import fit_shortcuts
    >>> live = LiveSource(model, tokenizer, documents, seq_len=32, max_tokens=2048)
    >>> [jtc] = fit_shortcuts(live, method="jtc", progress=False)
    >>> sorted(jtc.maps), jtc.provenance["split_id"] == live.provenance["split_id"]
    ([0, 1, 2], True)
    """

    default_skip_positions = DEFAULT_SKIP_POSITIONS

    def __init__(self, model, tokenizer, documents, *, model_name: str = "", seq_len: int = 128,
                 positions: str = "all", max_tokens: int | None = None, val_fraction: float = 0.25,
                 seed: int = 0, bos: str = "auto", batch_size: int = 8, weights_sha: str | None = None,
                 progress: bool = False):
        if batch_size < 1:
            raise NJTCError(f"`batch_size` must be positive, not {batch_size}")
        self.model = model
        self.plan: ExtractionPlan = plan_extraction(tokenizer, documents, seq_len=seq_len, positions=positions,
                                                    max_tokens=max_tokens, val_fraction=val_fraction, seed=seed,
                                                    bos=bos)
        self.batch_size = batch_size
        self.n_layers = len(resolve_parts(model)[1])
        self._head = Head.from_model(model)
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
    def source_layers(self) -> list[int]:
        """Every layer a shortcut can start from, 0..L-1."""
        return list(range(self.n_layers))

    def check_layers(self, layers) -> list[int]:
        """Validate layer indices against the model; returns them as a list of ints."""
        layers = [int(l) for l in layers]
        bad = [l for l in layers if not 0 <= l <= self.n_layers]
        if bad:
            raise NJTCError(f"layer {bad[0]} is not in the model (layers 0..{self.n_layers})")
        return layers

    def _selection(self, split, skip_positions: int) -> np.ndarray:
        if split is not None and split not in SPLITS:
            raise NJTCError(f"unknown split {split!r}; use 'train' or 'validation'")
        keep = self._row_position >= skip_positions
        return keep if split is None else keep & (self._row_split == SPLITS[split])

    def count(self, split=None, skip_positions: int = 0) -> int:
        """Rows of ``split`` at positions ``>= skip_positions``."""
        return int(self._selection(split, skip_positions).sum())

    def evaluated_documents(self, skip_positions: int = 0) -> np.ndarray:
        """The documents of the validation rows at positions ``>= skip_positions``."""
        return np.unique(self._row_document[self._selection("validation", skip_positions)])

    def iter_chunks(self, layers, split=None, chunk_rows: int = 4096, max_rows: int | None = None,
                    shard: tuple[int, int] = (0, 1), skip_positions: int = 0):
        """Run the model over the plan's sequences of ``split`` and yield their rows batch by batch.

        Yields ``(row_indices, chunk)`` like :meth:`ActivationStore.iter_chunks`, with
        ``chunk[layer]`` a float32 tensor on the model's device (of that layer, under a
        device map) and, outside the training split, ``chunk["final_topk"]`` the model's own
        top-k. ``chunk_rows`` is not
        used: a chunk is one forward pass of ``batch_size`` sequences. ``shard`` gives each
        process a contiguous block of the split's sequences. The first batch checks the
        head against the model's own logits (:func:`njtc_solve.capture.check_head`).
        """
        layers = self.check_layers(layers)
        keep = self._selection(split, skip_positions)
        code = None if split is None else SPLITS[split]
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



@contextmanager
def rows_from_args(args, provenance: dict | None = None, verb: str = "read", device=None, progress=None):
    """The rows a command reads: the store of ``--store`` (default ``activations.h5``), or with
    ``--model`` the model's forward pass over the plan of ``provenance`` (see
    :func:`live_source_from_args`), on ``device`` (default ``--device``)."""
    if args.model is None:
        with ActivationStore(args.store or "activations.h5") as store:
            yield store
        return
    if args.store is not None:
        raise NJTCError(f"--model and --store exclude each other: {verb} on the model or on a store")
    if args.batch_size < 1:
        raise NJTCError("--batch-size must be positive")
    yield live_source_from_args(args, args.device if device is None else device,
                                not args.no_progress if progress is None else progress, provenance)


def live_source_from_args(args, device, progress: bool = True, provenance: dict | None = None) -> LiveSource:
    """The live source a command's parsed arguments describe: model, corpus and plan.

    Arguments left unset take their value from ``provenance`` (a shortcut's), so that
    evaluation runs the plan the shortcut was fitted with (see
    :func:`njtc_solve.extract.plan_settings`).
    """
    from .corpus import load_corpus
    from .extract import PLAN_DEFAULTS, plan_settings
    from .models import load_model_from_args

    settings = plan_settings(args, provenance)  # bad settings fail before the model loads
    corpus = args.corpus if args.corpus is not None else PLAN_DEFAULTS["corpus"]
    _, documents = load_corpus(corpus, args.text_field or PLAN_DEFAULTS["text_field"])
    fitted_on = (provenance or {}).get("corpus_sha256")
    if args.corpus is None and fitted_on and fitted_on != corpus_sha256(documents):
        raise NJTCError(f"the shortcut was fitted on another corpus than {corpus} (corpus_sha256 {fitted_on[:12]}…); "
                        "pass --corpus to name its corpus, or another to evaluate on")
    model, tokenizer, name = load_model_from_args(args, device, progress=progress)
    return LiveSource(model, tokenizer, documents, model_name=name, batch_size=args.batch_size, progress=progress,
                      **settings)
