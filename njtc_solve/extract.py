"""Stage 1: run a causal LM over a corpus and cache every layer's residual stream to HDF5.

Command line::

    python -m njtc_solve.extract [--model M] [--corpus C] [--out activations.h5] ...

Layer 0 is the input to the first block (the embedding output), layer ``l`` the output of
block ``l`` and layer ``L`` the last block's output *before* the final norm. The model's
head and its own top-1 prediction per row are stored too, so later stages never need the
model. Output is written to ``OUT.partial`` and renamed when complete; an interrupted run
continues with ``--resume``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .architectures import resolve_parts
from .capture import check_head, forward_batches, head_check_tolerance
from .corpus import DEFAULT_CORPUS, corpus_sha256
from .errors import NJTCError, temporary_path, write_failure
from .head import Head
from .models import model_sha256
from .store import (DEFAULT_SKIP_POSITIONS, FINAL_TOPK, FORMAT, FORMAT_VERSION, STORE_DTYPES, TRAIN, VALIDATION,
                    decode_rows, encode_rows)

__all__ = ["PLAN_DEFAULTS", "ExtractionPlan", "bos_token", "check_output", "extract_activations",
           "head_check_tolerance", "plan_extraction"]

_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class ExtractionPlan:
    """Which sequences are read, in which row order, with which split and positions.

    Everything here follows from the corpus, the tokenizer and the seed alone, so a resumed
    or sharded run sees exactly the same plan as a single uninterrupted one. Rows are ordered
    training sequences first, then validation sequences. The split is by document: every
    sequence is cut from the documents of one split only.
    """

    token_ids: np.ndarray  # (n_sequences, seq_len) int64, in row order
    sequence: np.ndarray  # (n_sequences,) index of each sequence among the windows of the corpus
    split: np.ndarray  # (n_sequences,) uint8
    position: np.ndarray | None  # (n_sequences,) chosen position, one-per-sequence only
    seq_len: int
    document: np.ndarray  # (n_sequences, seq_len) document of each token (a BOS takes the next token's)
    validation_documents: np.ndarray  # every document assigned to validation, sorted
    bos: bool = False  # each sequence starts with the tokenizer's BOS token

    @property
    def rows_per_sequence(self) -> int:
        return self.seq_len if self.position is None else 1

    @property
    def n_rows(self) -> int:
        return len(self.sequence) * self.rows_per_sequence

    def block(self, rank: int, world: int) -> ExtractionPlan:
        """The ``rank``-th of ``world`` contiguous blocks of sequences (one process's share)."""
        n = len(self.sequence)
        return self.sequences(slice(rank * n // world, (rank + 1) * n // world))

    def sequences(self, part: slice) -> ExtractionPlan:
        """The plan of the sequences ``part`` (a slice of the row-ordered sequences)."""
        return ExtractionPlan(self.token_ids[part], self.sequence[part], self.split[part],
                              None if self.position is None else self.position[part], self.seq_len,
                              self.document[part], self.validation_documents, self.bos)

    def row_positions(self, seqs: slice) -> np.ndarray:
        """Positions of the rows of sequences ``seqs`` (a slice of row-ordered sequences)."""
        n = len(self.sequence[seqs])
        if self.position is None:
            return np.tile(np.arange(self.seq_len), n)
        return self.position[seqs]

    def row_documents(self) -> np.ndarray:
        """The document of every row, in row order."""
        if self.position is None:
            return self.document.reshape(-1)
        return self.document[np.arange(len(self.sequence)), self.position]


def bos_token(tokenizer, bos: str = "auto") -> int | None:
    """The BOS token id to start every sequence with, or ``None``.

    ``auto`` adds it where the tokenizer itself would (``add_special_tokens=True`` puts it
    first: Llama-2, Mistral …; SmolLM2 and GPT-2 have none), ``always`` wherever the tokenizer
    has one, ``never`` not at all.
    """
    if bos not in ("auto", "always", "never"):
        raise NJTCError(f"--bos must be auto, always or never, not {bos!r}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos == "never":
        return None
    if bos == "always":
        if bos_id is None:
            raise NJTCError("--bos always: the tokenizer has no BOS token")
        return bos_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos_id if bos_id is not None and list(ids[:1]) == [bos_id] else None


def _split_documents(lengths: np.ndarray, val_fraction: float, rng) -> np.ndarray:
    """Which documents are validation: whole documents in a seeded random order until they
    hold ``val_fraction`` of the tokens (at least one document each way)."""
    is_val = np.zeros(len(lengths), dtype=bool)
    if val_fraction == 0:
        return is_val
    if len(lengths) < 2:
        raise NJTCError("the split is by document and the corpus holds one; use more documents "
                        "(e.g. one per line of a .txt) or --val-fraction 0")
    order = rng.permutation(len(lengths))
    cumulative = np.cumsum(lengths[order])
    n_val = int(np.abs(cumulative - val_fraction * cumulative[-1]).argmin()) + 1  # nearest the fraction
    is_val[order[:min(n_val, len(lengths) - 1)]] = True
    return is_val


def plan_extraction(tokenizer, documents, seq_len=128, positions="all", max_tokens=None,
                    val_fraction=0.25, seed=0, bos="auto") -> ExtractionPlan:
    """Tokenise documents into sequences and fix the split and sampled positions.

    The documents are split first, whole (a seeded random set holding ``val_fraction`` of the
    tokens is held out), so no document is on both sides. Each split's documents are then
    tokenised without special tokens, joined with the end-of-text token and cut into
    non-overlapping windows; with a BOS token (see :func:`bos_token`) each sequence is the BOS
    followed by ``seq_len - 1`` tokens. ``max_tokens`` bounds the rows written, keeping a
    seeded random subset of whole sequences of each split in proportion.
    """
    if seq_len < 2:
        raise NJTCError("--seq-len must be at least 2")
    if positions not in ("all", "one-per-sequence"):
        raise NJTCError("--positions must be 'all' or 'one-per-sequence'")
    if not 0.0 <= val_fraction < 1.0:
        raise NJTCError("--val-fraction must be in [0, 1)")
    bos_id = bos_token(tokenizer, bos)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "sequence longer than the model's maximum"
    try:
        encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    lengths = np.array([len(ids) + len(separator) for ids in encoded])
    rng = np.random.default_rng(seed)
    is_val_doc = _split_documents(lengths, val_fraction, rng)
    body = seq_len - (bos_id is not None)
    windows = {}
    for code, wanted in ((TRAIN, False), (VALIDATION, True)):
        docs = np.flatnonzero(is_val_doc == wanted)
        stream = np.fromiter((t for d in docs for t in list(encoded[d]) + separator), dtype=np.int64)
        owner = np.repeat(docs, lengths[docs])
        n_windows = len(stream) // body
        windows[code] = (stream[: n_windows * body].reshape(n_windows, body),
                         owner[: n_windows * body].reshape(n_windows, body))
    n_train, n_val = len(windows[TRAIN][0]), len(windows[VALIDATION][0])
    if n_train + n_val == 0:
        raise NJTCError(f"the corpus has {lengths.sum()} tokens, fewer than one sequence of {seq_len}")
    if val_fraction > 0 and n_val == 0:
        raise NJTCError(f"the validation documents hold fewer tokens than one sequence of {seq_len}; "
                        "lower --seq-len or raise --val-fraction")
    if n_train == 0:
        raise NJTCError(f"the training documents hold fewer tokens than one sequence of {seq_len}; "
                        "lower --seq-len or --val-fraction, or use more documents")
    rows_per_sequence = seq_len if positions == "all" else 1
    take_train, take_val = n_train, n_val
    if max_tokens is not None:
        if max_tokens < rows_per_sequence:
            raise NJTCError(f"--max-tokens {max_tokens} is below one sequence ({rows_per_sequence} rows)")
        total = max_tokens // rows_per_sequence
        take_val = min(n_val, max(1, int(round(val_fraction * total)))) if val_fraction > 0 else 0
        take_train = min(n_train, total - take_val)
        if take_train == 0:
            raise NJTCError(f"--max-tokens {max_tokens} leaves no training sequence beside the validation one; "
                            "raise it")
    chosen = {TRAIN: np.sort(rng.choice(n_train, size=take_train, replace=False)),
              VALIDATION: np.sort(rng.choice(n_val, size=take_val, replace=False))}
    tokens = np.concatenate([windows[c][0][chosen[c]] for c in (TRAIN, VALIDATION)])
    document = np.concatenate([windows[c][1][chosen[c]] for c in (TRAIN, VALIDATION)])
    if bos_id is not None:
        tokens = np.concatenate([np.full((len(tokens), 1), bos_id, np.int64), tokens], axis=1)
        document = np.concatenate([document[:, :1], document], axis=1)
    sequence = np.concatenate([chosen[TRAIN], n_train + chosen[VALIDATION]])
    split = np.repeat(np.array([TRAIN, VALIDATION], np.uint8), [take_train, take_val])
    position = None
    if positions == "one-per-sequence":  # never the BOS row, nor rows that fits skip by default
        position = rng.integers(max(int(bos_id is not None), DEFAULT_SKIP_POSITIONS), seq_len, size=len(sequence))
    return ExtractionPlan(tokens, sequence, split, position, seq_len, document,
                          np.flatnonzero(is_val_doc), bos_id is not None)


def _chunk_rows(rows_per_batch: int, n: int, row_bytes: int, limit: int = 4 << 20) -> int:
    """Rows per HDF5 chunk: a divisor of a batch's rows (each write fills whole chunks), ≤ 4 MiB."""
    rows = min(rows_per_batch, n)
    while rows > 1 and rows * row_bytes > limit:
        rows = rows // 2 if rows % 2 == 0 else max(1, limit // row_bytes)
    return max(1, rows)


# No chunk cache while writing: a chunk is written (and fails, on a full disk) inside the call
# that writes it, never later from a cache flushed where HDF5 can only print the error.
_WRITE_CACHE = {"rdcc_nbytes": 0}


def _create_store(path, plan, head, stored, d_model, dtype, attrs):
    """Create the pre-allocated store file with its index datasets and head, every dataset
    chunked with a fletcher32 checksum (a flipped byte is then a read error, not a wrong value)."""
    f = h5py.File(path, "w", **_WRITE_CACHE)
    try:
        _layout(f, plan, head, stored, d_model, dtype, attrs)
    except BaseException:  # a failed write, an interruption: a half-created file holds nothing to resume
        _close_quietly(f)  # never leave it to h5py's garbage collection
        Path(path).unlink(missing_ok=True)
        raise
    return f


def _layout(f, plan, head, stored, d_model, dtype, attrs):
    # every attribute written later exists from the start, so later writes never grow the file
    for key in ("head_check_max_abs_err", "head_check_rel_err", "head_check_top1_agreement"):
        f.attrs[key] = float("nan")
    for key, value in attrs.items():
        f.attrs[key] = value
    n = plan.n_rows
    itemsize = STORE_DTYPES[dtype].itemsize
    chunk_rows = _chunk_rows(attrs["batch_size"] * plan.rows_per_sequence, n, d_model * itemsize)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # a kill mid-run only leaves raw data behind
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every row is written before the file is complete
    dcpl.set_fletcher32()
    hidden = f.create_group("hidden")
    for layer in stored:
        hidden.create_dataset(str(layer), shape=(n, d_model), dtype=STORE_DTYPES[dtype], chunks=(chunk_rows, d_model),
                              dcpl=dcpl.copy())
    repeat = plan.rows_per_sequence
    index = {"tokens": np.zeros(n, np.int32), "sequence": np.repeat(plan.sequence, repeat).astype(np.int32),
             "position": plan.row_positions(slice(None)).astype(np.int32),
             "split": np.repeat(plan.split, repeat).astype(np.uint8),
             "document": plan.row_documents().astype(np.int32),
             "validation_documents": plan.validation_documents.astype(np.int32),
             "final_top1": np.zeros(n, np.int32), "final_topk": np.zeros((n, FINAL_TOPK), np.int32)}
    for name, data in index.items():
        if len(data) == 0:  # no validation documents (--val-fraction 0): nothing to chunk or checksum
            f.create_dataset(name, data=data)
        else:
            f.create_dataset(name, data=data, chunks=(min(len(data), 65536),) + data.shape[1:], fletcher32=True)
    head.write_group(f.create_group("head"))
    f.flush()


_RESUME_KEYS = ("model_sha256", "corpus_sha256", "seq_len", "positions", "seed", "val_fraction",
                "batch_size", "dtype", "n_rows", "shard", "bos", "layers")


def _open_for_resume(path, attrs):
    try:
        f = h5py.File(path, "r+", **_WRITE_CACHE)
    except OSError as err:
        raise NJTCError(f"cannot resume: {path} is not a readable HDF5 file; start again with --overwrite") from err
    for key in _RESUME_KEYS:
        stored = f.attrs.get(key)
        stored = stored.item() if isinstance(stored, np.generic) else stored
        if isinstance(stored, np.ndarray):
            stored = stored.tolist()
        if key == "layers" and stored is None:  # a partial store begun before --layers kept every layer
            stored = list(range(attrs["n_layers"] + 1))
        if stored != attrs[key]:
            f.close()
            raise NJTCError(f"cannot resume: {key} differs (file has {stored!r}, this run {attrs[key]!r})")
    return f


def stored_layers(layers, n_layers: int) -> list[int]:
    """The layers a store keeps: the source ``layers`` asked for (all by default) and always ``L``."""
    if layers is None:
        return list(range(n_layers + 1))
    layers = sorted({int(l) for l in layers})
    bad = [l for l in layers if not 0 <= l <= n_layers]
    if bad:
        raise NJTCError(f"--layers: layer {bad[0]} is not in the model (layers 0..{n_layers})")
    if not [l for l in layers if l < n_layers]:
        raise NJTCError(f"--layers: no source layer below the target layer {n_layers}; a shortcut needs one")
    return sorted(set(layers) | {n_layers})


def bytes_per_token(n_stored: int, d_model: int, dtype: str = "float32") -> int:
    """Bytes a store takes per token: ``n_stored`` layers of ``d_model`` values plus the row index."""
    return n_stored * d_model * STORE_DTYPES[dtype].itemsize + 4 * (6 + FINAL_TOPK)


def _check_values(layer, values: torch.Tensor, dtype):
    # one reduction, no boolean temporary: a float64 sum is NaN/Inf iff an element is
    if not bool(torch.isfinite(values.sum(dtype=torch.float64))):
        raise NJTCError(f"layer {layer} has NaN or Inf activations; the model's forward pass is broken")
    if dtype == "float16":  # bfloat16 has float32's range
        peak = float(values.abs().max())
        if peak > _FLOAT16_MAX:
            raise NJTCError(
                f"layer {layer} has an activation of {peak:.4g}, beyond float16's range (65504); "
                "use --store-dtype bfloat16 or float32"
            )


def _head_check(head, f, sample, model_dtype) -> None:
    """Check the head on the stored last layer of a sample of rows and record the figures.

    ``sample`` is ``(first_row, model_logits)`` for consecutive rows, taken from the
    extraction's own forward pass; the stored (possibly float16) rows are what every later
    reader applies the head to. See :func:`njtc_solve.capture.check_head`.
    """
    start, model_logits = sample
    n_layers = int(f.attrs["n_layers"])
    stored = torch.from_numpy(decode_rows(f[f"hidden/{n_layers}"][start: start + len(model_logits)],
                                          str(f.attrs["dtype"])))
    figures = {}
    try:
        check_head(head, stored, model_logits, model_dtype, str(f.attrs["dtype"]), record=figures)
    finally:
        for key, value in figures.items():
            f.attrs[f"head_check_{key}"] = value


class _Untrusted(Exception):
    """A failed fsync: the kernel may have dropped pages the file's counters already count."""


def _sync(f) -> None:
    """Flush the store and have the operating system put it on disk.

    A failure is :class:`_Untrusted`: after a failed fsync the pages it could not write may be
    dropped from the cache, so ``rows_written`` may count rows that are not on disk, and the
    file must not be resumed.
    """
    try:
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    except _WRITE_ERRORS as err:
        raise _Untrusted(write_failure(err) or str(err)) from err


def _close_quietly(f) -> None:
    """Close a store whose writes may have failed; the failure has already been reported."""
    try:
        f.close()
    except Exception:  # closing a broken file may fail again; the first error is the one reported
        pass


_WRITE_ERRORS = (OSError, ValueError, RuntimeError)  # what h5py raises when the file system refuses a write


def _sample_logits(model, plan, device, rows=64):
    """Model logits of the first rows, for a run that had no batch left to extract."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(plan.token_ids[:1], device=device)).logits[0]
    positions = plan.row_positions(slice(0, 1))[:rows]
    return 0, logits[torch.as_tensor(positions)].float().cpu()


def check_output(out, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse a store output that cannot be written or would replace a file without ``overwrite``
    (run before the model loads, and again by :func:`extract_activations`)."""
    from .outputs import check_writable

    out = Path(out)
    partial = temporary_path(out)
    if resume and overwrite:
        raise NJTCError("--resume and --overwrite exclude each other")
    if out.is_dir():
        raise NJTCError(f"{out} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise NJTCError(f"{out} exists; pass --overwrite to replace it")
    if partial.exists() and not (resume or overwrite):
        raise NJTCError(f"{partial} is left from an interrupted run; pass --resume or --overwrite")
    check_writable(out.parent, out)


def extract_activations(model, tokenizer, documents, out, *, model_name="", corpus_name="",
                        seq_len=128, positions="all", max_tokens=None, val_fraction=0.25, seed=0,
                        dtype="float32", batch_size=8, resume=False, overwrite=False,
                        progress=True, corpus_sha=None, weights_sha=None, shard=(0, 1), bos="auto",
                        layers=None) -> Path:
    """Cache a model's residual stream at every layer, its head and its own predictions.

    Parameters
    ----------
    model, tokenizer
        A Hugging Face causal LM (architecture in :data:`njtc_solve.architectures.ARCHITECTURES`)
        and its tokenizer.
    documents : list of str
        The corpus (see :func:`njtc_solve.corpus.load_corpus`).
    out : path
        The HDF5 store to write (written as ``out.partial``, renamed when complete).
    seq_len, positions, max_tokens, val_fraction, seed, bos
        See :func:`plan_extraction` (the split is by document; ``bos`` is ``auto``, ``always``
        or ``never``).
    dtype : {"float32", "float16", "bfloat16"}
        Storage type of the activations: 4, 2 or 2 bytes per value (see :data:`STORE_DTYPES`);
        float16 refuses values beyond its range, bfloat16 keeps float32's range with 8 bits of
        mantissa. Readers upcast to float32.
    layers : list of int, optional
        Source layers to store (default: all, 0..L-1); the target layer ``L`` is always kept.
    batch_size : int
        Sequences per forward pass (part of the resume contract).
    resume, overwrite : bool
        Continue ``out.partial`` from ``rows_written`` (start afresh when there is none);
        replace an existing output.
    shard : (rank, world)
        Extract only the ``rank``-th contiguous block of the sequences (scale-out; see
        :func:`combine_shards`).

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
    partial = temporary_path(out)
    if dtype not in STORE_DTYPES:
        raise NJTCError(f"--store-dtype must be one of {', '.join(STORE_DTYPES)}")
    if batch_size < 1:
        raise NJTCError("--batch-size must be positive")
    check_output(out, resume, overwrite)
    if resume and not partial.exists():  # a script may always pass --resume: start afresh
        resume = False

    head = Head.from_model(model)
    device = next(model.parameters()).device
    n_layers = len(resolve_parts(model)[1])
    stored = stored_layers(layers, n_layers)
    plan = plan_extraction(tokenizer, documents, seq_len, positions, max_tokens, val_fraction, seed, bos)
    if shard[1] > 1:
        plan = plan.block(*shard)
        if len(plan.sequence) == 0:
            raise NJTCError(f"process {shard[0]} of {shard[1]} has no sequences; use fewer processes")
    attrs = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": model_name,
        "architecture": model.config.model_type, "n_layers": n_layers, "d_model": head.d_model,
        "vocab_size": head.vocab_size, "dtype": dtype, "seq_len": seq_len, "positions": positions,
        "corpus": corpus_name, "corpus_sha256": corpus_sha or corpus_sha256(documents),
        "model_sha256": weights_sha or model_sha256(model, progress), "seed": seed,
        "val_fraction": float(val_fraction), "batch_size": batch_size,
        "max_tokens": -1 if max_tokens is None else int(max_tokens), "n_rows": plan.n_rows,
        "n_sequences": len(plan.sequence), "rows_written": 0, "complete": False,
        "shard": f"{shard[0]}/{shard[1]}", "bos": plan.bos, "layers": stored, "split_by": "document", "n_documents": len(documents),
    }
    f = _open_for_resume(partial, attrs) if resume else None  # opened once, kept open for the run
    written = 0 if f is None else int(f.attrs["rows_written"])
    row_bytes = bytes_per_token(len(stored), head.d_model, dtype)
    needed = (plan.n_rows - written) * row_bytes + (0 if resume else head.unembed.numel() * 4)
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        if f is not None:
            f.close()
        raise NJTCError(f"{out} needs about {needed / 1e9:.2f} GB more, and {out.parent} has {free / 1e9:.2f} GB free")
    if f is None:
        try:
            partial.unlink(missing_ok=True)
            f = _create_store(partial, plan, head, stored, head.d_model, dtype, attrs)
        except _WRITE_ERRORS as err:
            if write_failure(err) is None:
                raise
            raise NJTCError(f"cannot write {partial}: {write_failure(err)}") from err

    per_batch = batch_size * plan.rows_per_sequence
    hidden_sets = {layer: f[f"hidden/{layer}"] for layer in stored}  # open for the whole run
    model_dtype = next(model.parameters()).dtype
    checked = False
    rows_written = int(f.attrs["rows_written"])
    first_batch = rows_written // per_batch
    bar = tqdm(leave=False, total=len(plan.sequence) * seq_len, initial=first_batch * batch_size * seq_len,
               unit="tok", unit_scale=True, desc="extract", disable=not progress)
    try:
        with bar:
            for batch in forward_batches(model, plan, batch_size, first_batch):
                r0, r1 = batch.rows.start, batch.rows.stop
                for layer, dataset in hidden_sets.items():
                    values = batch.hidden[layer].float()
                    _check_values(layer, values, dtype)
                    dataset.write_direct(encode_rows(values, dtype), dest_sel=np.s_[r0:r1])
                f["tokens"][r0:r1] = batch.tokens.cpu().numpy()
                f["final_topk"][r0:r1] = batch.logits.topk(FINAL_TOPK, -1).indices.cpu().numpy()
                f["final_top1"][r0:r1] = batch.logits.argmax(-1).cpu().numpy()
                f.flush()
                if not checked:  # before the long pass: the head must reproduce the model's own logits
                    _head_check(head, f, (r0, batch.logits[:64].float().cpu()), model_dtype)
                    checked = True
                f.attrs["rows_written"] = r1
                f.flush()
                bar.update(batch.tokens.numel() if plan.position is None else len(batch.tokens) * seq_len)
        if not checked:
            _head_check(head, f, _sample_logits(model, plan, device), model_dtype)
        if int(f.attrs["rows_written"]) != plan.n_rows:
            raise NJTCError(f"{partial} holds {int(f.attrs['rows_written'])} of {plan.n_rows} rows")
        _sync(f)  # every row on disk before the file says it is complete
        f.attrs["complete"] = True
        _sync(f)
        f.close()
        os.replace(partial, out)
    except _Untrusted as err:  # after a failed fsync, what the file holds on disk is unknown: never resume it
        _close_quietly(f)
        partial.unlink(missing_ok=True)
        raise NJTCError(f"cannot write {partial}: {err} (fsync failed); what was written cannot be trusted, so "
                        "the partial file is removed: run again without --resume") from err.__cause__
    except NJTCError:
        _close_quietly(f)
        partial.unlink(missing_ok=True)
        raise
    except _WRITE_ERRORS as err:
        _close_quietly(f)
        if write_failure(err) is None:
            raise
        # a write failed (disk full, quota, I/O error): rows_written counts only flushed batches
        raise NJTCError(f"cannot write {partial}: {write_failure(err)}; the partial file is kept: free space, "
                        "then run again with --resume") from err
    except BaseException:
        _close_quietly(f)  # keep the partial file: --resume continues it
        raise
    return out


PLAN_DEFAULTS = {"corpus": DEFAULT_CORPUS, "text_field": "text", "seq_len": 128, "positions": "all",
                 "max_tokens": None, "val_fraction": 0.25, "seed": 0, "bos": "auto", "batch_size": 8}


if __name__ == "__main__":  # `python -m njtc_solve.extract` is the command njtc_solve.cli.extract
    from njtc_solve.cli.extract import run

    raise SystemExit(run())
