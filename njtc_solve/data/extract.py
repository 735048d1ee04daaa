"""Stage 1: run a causal LM over a corpus and cache every layer's residual stream to HDF5.

Command line::

    python -m njtc_solve.extract [--model M] [--corpus C] [--out activations.h5] ...

Layer 0 is the input to the first block (the embedding output), layer ``l`` the output of
block ``l`` and layer ``L`` the last block's output *before* the final norm. The model's
head and its own top-1 prediction per row are stored too, so later stages never need the
model. Output is written to ``OUT.partial`` and renamed when complete; an interrupted run
continues with ``--resume``.

The plan (which sequences, split, positions) comes from njtc_solve.data.plan, the file from
njtc_solve.data.store_writer.StoreWriter; this module runs the model between them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from njtc_solve.core.decoder import Decoder
from njtc_solve.data.capture import forward_batches
from njtc_solve.data.corpus import corpus_sha256
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.models import model_sha256
from njtc_solve.data.plan import PlanSpec, plan_extraction
from njtc_solve.data.store_writer import StoreWriter, stored_layers

if TYPE_CHECKING:
    from njtc_solve.data.plan import ExtractionPlan

__all__ = ["extract_activations"]


def _sample_logits(model, plan: ExtractionPlan, rows: int = 64) -> tuple[int, torch.Tensor]:
    """``(0, logits)``: the model's logits at the first rows, for a run that had no batch left to write."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(plan.token_ids[:1], device=device)).logits[0]
    positions = plan.row_positions(slice(0, 1))[:rows]
    return 0, logits[torch.as_tensor(positions)].float().cpu()


def _write_rows(model, plan: ExtractionPlan, writer: StoreWriter, batch_size: int, progress: bool) -> None:
    """Run the model over the plan's batches not yet written and hand their rows to ``writer``."""
    first_batch = writer.rows_written // (batch_size * plan.rows_per_sequence)
    seq_len = plan.seq_len
    with tqdm(leave=False, total=len(plan.sequence) * seq_len, initial=first_batch * batch_size * seq_len,
              unit="tok", unit_scale=True, desc="extract", disable=not progress) as bar:
        for batch in forward_batches(model, plan, batch_size, first_batch):
            writer.write(batch.rows, batch.hidden, batch.tokens, batch.logits)
            bar.update(batch.tokens.numel() if plan.position is None else len(batch.tokens) * seq_len)
    if not writer.head_checked:  # nothing was left to write (a resumed run): check the rows written
        writer.check_head(*_sample_logits(model, plan))


def extract_activations(model, tokenizer, documents, out, *, model_name: str = "", corpus_name: str = "",
                        seq_len: int = PlanSpec.seq_len, positions: str = PlanSpec.positions,
                        max_tokens: int | None = PlanSpec.max_tokens, val_fraction: float = PlanSpec.val_fraction,
                        seed: int = PlanSpec.seed, dtype: str = "float32", batch_size: int = PlanSpec.batch_size,
                        resume: bool = False, overwrite: bool = False, progress: bool = True,
                        corpus_sha: str | None = None, weights_sha: str | None = None,
                        shard: tuple[int, int] = (0, 1), bos: str = PlanSpec.bos, layers: list[int] | None = None) -> Path:
    """Cache a model's residual stream at every layer, its head and its own predictions.

    Parameters
    ----------
    model, tokenizer
        A supported Hugging Face causal LM and its tokenizer.
    documents : list of str
        The corpus (:func:`njtc_solve.data.corpus.load_corpus`).
    out : path
        The store, written as ``out.partial`` under its output lock
        (:class:`~njtc_solve.data.store_writer.StoreWriter`).
    model_name, corpus_name : str
        Recorded in the store.
    seq_len, positions, max_tokens, val_fraction, seed, bos
        The plan (:func:`njtc_solve.data.plan.plan_extraction`).
    dtype : {"float32", "float16", "bfloat16"}
        Storage type of the activations; float16 refuses values beyond its range.
    batch_size : int
        Sequences per forward pass (part of the resume contract).
    resume, overwrite : bool
        Continue ``out.partial`` (start afresh when there is none); replace an existing output.
    progress : bool
        Show progress bars.
    corpus_sha, weights_sha : str, optional
        The corpus's and the model's sha256 when already known.
    shard : (rank, world)
        Extract only the ``rank``-th contiguous block of the sequences (:mod:`~njtc_solve.data.shards`).
    layers : list of int, optional
        Source layers to store (default: all); the target layer ``L`` is always kept.

    Returns
    -------
    Path
        The completed store.

    Examples
    --------
    >>> out = extract_activations(model, tokenizer, documents, "small.h5", seq_len=32, max_tokens=512,
    ...                           progress=False)
    >>> out.name
    'small.h5'
    """
    out = Path(out)
    StoreWriter.check_settings(dtype=dtype, batch_size=batch_size)
    with StoreWriter.reserve(out, resume=resume, overwrite=overwrite):
        decoder = Decoder.of(model)
        head, n_layers = decoder.head, decoder.n_blocks
        stored = stored_layers(layers, n_layers)
        plan = plan_extraction(tokenizer, documents, seq_len=seq_len, positions=positions, max_tokens=max_tokens,
                                val_fraction=val_fraction, seed=seed, bos=bos)
        if shard[1] > 1:
            plan = plan.block(*shard)
            if len(plan.sequence) == 0:
                raise NJTCError(f"process {shard[0]} of {shard[1]} has no sequences; use fewer processes")
        provenance = {"model": model_name, "architecture": model.config.model_type, "n_layers": n_layers,
                      "corpus": corpus_name, "corpus_sha256": corpus_sha or corpus_sha256(documents),
                      "model_sha256": weights_sha or model_sha256(model, progress), "seed": seed,
                      "val_fraction": float(val_fraction), "max_tokens": -1 if max_tokens is None else int(max_tokens),
                      "n_documents": len(documents)}
        with StoreWriter(out, plan, head, provenance=provenance, layers=stored, dtype=dtype, batch_size=batch_size,
                         shard=shard, model_dtype=next(model.parameters()).dtype, resume=resume,
                         overwrite=overwrite) as writer:
            _write_rows(model, plan, writer, batch_size, progress)
            return writer.finish()

