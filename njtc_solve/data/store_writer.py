"""The activation store's writer (:class:`StoreWriter`): a pre-allocated ``OUT.partial``, written batch by
batch under the output lock, resumable, renamed to ``OUT`` when complete."""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head
from njtc_solve.core.outputs import check_writable, output_lock, temporary_path, write_failure
from njtc_solve.data.capture import check_head
from njtc_solve.data.rows import FINAL_TOPK
from njtc_solve.data.store import FORMAT, FORMAT_VERSION, STORE_DTYPES, decode_rows, encode_rows

__all__ = ["StoreWriter", "bytes_per_token", "check_output", "stored_layers"]


def check_output(out, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse a store output that cannot be written, or would replace a file without ``overwrite``."""
    out = Path(out)
    partial = temporary_path(out)
    if resume and overwrite:
        raise NJTCError("`resume` and `overwrite` exclude each other")
    if out.is_dir():
        raise NJTCError(f"{out} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise NJTCError(f"{out} exists; pass `overwrite=True` to replace it")
    if partial.exists() and not (resume or overwrite):
        raise NJTCError(f"{partial} is left from an interrupted run; pass `resume=True` or `overwrite=True`")
    check_writable(out.parent, out)


def stored_layers(layers, n_layers: int) -> list[int]:
    """The layers a store keeps: the source ``layers`` asked for (all by default) and always ``L``."""
    if layers is None:
        return list(range(n_layers + 1))
    layers = sorted({int(l) for l in layers})
    bad = [l for l in layers if not 0 <= l <= n_layers]
    if bad:
        raise NJTCError(f"`layers`: layer {bad[0]} is not in the model (layers 0..{n_layers})")
    if not [l for l in layers if l < n_layers]:
        raise NJTCError(f"`layers`: no source layer below the target layer {n_layers}; a shortcut needs one")
    return sorted(set(layers) | {n_layers})


def bytes_per_token(n_stored: int, d_model: int, dtype: str = "float32") -> int:
    """Bytes a store takes per token: ``n_stored`` layers of ``d_model`` values plus the row index."""
    return n_stored * d_model * STORE_DTYPES[dtype].itemsize + 4 * (6 + FINAL_TOPK)


_FLOAT16_MAX = float(np.finfo(np.float16).max)
# no chunk cache: a write fails (a full disk) inside its call, not later in a flush where HDF5 only prints it
_WRITE_CACHE = {"rdcc_nbytes": 0}
_WRITE_ERRORS = (OSError, ValueError, RuntimeError)  # what h5py raises when the file system refuses a write
# the settings a resumed run must share with the one that began the file
_RESUME_KEYS = ("model_sha256", "corpus_sha256", "seq_len", "positions", "seed", "val_fraction",
                "batch_size", "dtype", "n_rows", "shard", "bos", "layers")
# the root attributes a StoreWriter's caller gives
_PROVENANCE = ("model", "architecture", "n_layers", "corpus", "corpus_sha256", "model_sha256", "seed",
               "val_fraction", "max_tokens", "n_documents")
# every root attribute, in the order written (the order is part of the file's bytes)
_ROOT_ATTRIBUTES = ("format", "format_version", "model", "architecture", "n_layers", "d_model", "vocab_size", "dtype",
                    "seq_len", "positions", "corpus", "corpus_sha256", "model_sha256", "seed", "val_fraction",
                    "batch_size", "max_tokens", "n_rows", "n_sequences", "rows_written", "complete", "shard", "bos",
                    "layers", "split_by", "n_documents")
_HEAD_CHECK = ("head_check_max_abs_err", "head_check_rel_err", "head_check_top1_agreement")
_HELD: set[str] = set()  # outputs whose lock this process holds through StoreWriter.lock


class _Untrusted(Exception):
    """A failed fsync: the kernel may have dropped pages the file's counters already count."""


def _sync(f) -> None:
    """Flush and fsync the store; a failure is :class:`_Untrusted` (the file must not be resumed)."""
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


def _chunk_rows(rows_per_batch: int, n: int, row_bytes: int, limit: int = 4 << 20) -> int:
    """Rows per HDF5 chunk: a divisor of a batch's rows (each write fills whole chunks), ≤ 4 MiB."""
    rows = min(rows_per_batch, n)
    while rows > 1 and rows * row_bytes > limit:
        rows = rows // 2 if rows % 2 == 0 else max(1, limit // row_bytes)
    return max(1, rows)


def _check_values(layer, values: torch.Tensor, dtype: str) -> None:
    # one reduction, no boolean temporary: a float64 sum is NaN/Inf iff an element is
    if not bool(torch.isfinite(values.sum(dtype=torch.float64))):
        raise NJTCError(f"layer {layer} has NaN or Inf activations; the model's forward pass is broken")
    if dtype == "float16":  # bfloat16 has float32's range
        peak = float(values.abs().max())
        if peak > _FLOAT16_MAX:
            raise NJTCError(f"layer {layer} has an activation of {peak:.4g}, beyond float16's range (65504); "
                            "use `dtype` bfloat16 or float32")


class StoreWriter:
    """Write one activation store: ``OUT.partial``, renamed to ``OUT`` when every row is in.

    Opening takes the output lock until :meth:`finish` or :meth:`abort`, checks the output and the free
    space, and creates the pre-allocated file (or with ``resume`` reopens ``OUT.partial``). As a context
    manager, an :class:`NJTCError` or a failed fsync removes the partial file; a failed write (a one-line
    :class:`NJTCError`), an interruption or leaving without :meth:`finish` keep it for ``resume``.

    Parameters
    ----------
    out : path
        The store to write.
    plan : ExtractionPlan
        The rows, their split and positions (:func:`njtc_solve.data.plan.plan_extraction`).
    head : Head
        The model's head, stored with the rows and checked on the first batch.
    provenance : dict
        Root attributes: ``model``, ``architecture``, ``n_layers``, ``corpus``, ``corpus_sha256``,
        ``model_sha256``, ``seed``, ``val_fraction``, ``max_tokens`` (-1 for none), ``n_documents``.
    layers : list of int, optional
        Source layers to store (default: all); the last layer ``n_layers`` is always stored.
    dtype : {"float32", "float16", "bfloat16"}
        Storage type of the activations (see :data:`STORE_DTYPES`).
    batch_size : int
        Sequences per :meth:`write` (the chunk shape and the resume contract follow it).
    shard : (rank, world)
        Which block of a sharded extraction ``plan`` is (recorded).
    model_dtype : torch.dtype
        The model's dtype, which sets the head check's tolerance.
    resume, overwrite : bool
        Continue ``OUT.partial``; replace an existing ``OUT``.

    Examples
    --------
    >>> from njtc_solve.data.capture import forward_batches
    >>> from njtc_solve.data.plan import plan_extraction
    >>> plan = plan_extraction(tokenizer, documents, seq_len=32, max_tokens=256)
    >>> provenance = {"model": "tiny", "architecture": model.config.model_type, "n_layers": 3, "corpus": "",
    ...               "corpus_sha256": "", "model_sha256": "", "seed": 0, "val_fraction": 0.25, "max_tokens": 256,
    ...               "n_documents": len(documents)}
    >>> with StoreWriter("tiny.h5", plan, Head.from_model(model), provenance=provenance, batch_size=4) as writer:
    ...     for batch in forward_batches(model, plan, 4, writer.rows_written // (4 * 32)):
    ...         writer.write(batch.rows, batch.hidden, batch.tokens, batch.logits)
    ...     out = writer.finish()
    >>> out.name, writer.rows_written, writer.layers
    ('tiny.h5', 256, [0, 1, 2, 3])
    """

    def __init__(self, out, plan, head: Head, *, provenance: dict, layers=None, dtype: str = "float32",
                 batch_size: int = 8, shard: tuple[int, int] = (0, 1), model_dtype: torch.dtype = torch.float32,
                 resume: bool = False, overwrite: bool = False):
        StoreWriter.check_settings(dtype=dtype, batch_size=batch_size)
        missing = [key for key in _PROVENANCE if key not in provenance]
        if missing:
            raise NJTCError(f"`provenance` lacks {', '.join(missing)}")
        self.out, self.partial = Path(out), temporary_path(Path(out))
        self.plan, self.head, self.dtype, self.model_dtype = plan, head, dtype, model_dtype
        self.n_layers = int(provenance["n_layers"])
        self.layers = stored_layers(layers, self.n_layers)
        self.head_checked = False
        self._file = None
        self._held = ExitStack()
        self._held.enter_context(StoreWriter.reserve(self.out, resume=resume, overwrite=overwrite))
        try:
            self._open(self._attributes(provenance, batch_size, shard), resume and self.partial.exists())
        except BaseException:
            self.abort()
            raise
        self._hidden = {layer: self._file[f"hidden/{layer}"] for layer in self.layers}  # open for the whole run
        self.rows_written = int(self._file.attrs["rows_written"])

    @staticmethod
    def check_settings(*, dtype: str = "float32", batch_size: int = 8) -> None:
        """Refuse a storage type or batch size the writer cannot use (before any work)."""
        if dtype not in STORE_DTYPES:
            raise NJTCError(f"`dtype` must be one of {', '.join(STORE_DTYPES)}, not {dtype!r}")
        if batch_size < 1:
            raise NJTCError(f"`batch_size` must be positive, not {batch_size}")

    @staticmethod
    @contextmanager
    def lock(out):
        """Hold the output lock of ``out`` for the block; a nested hold in this process is the same hold."""
        key = os.path.abspath(out)
        if key in _HELD:
            yield
            return
        with output_lock(out):
            _HELD.add(key)
            try:
                yield
            finally:
                _HELD.discard(key)

    @staticmethod
    @contextmanager
    def reserve(out, *, resume: bool = False, overwrite: bool = False):
        """Hold the lock of ``out`` for the block, and check it can be written (:func:`check_output`).

        A command reserves its output before any work; a :class:`StoreWriter` opened inside keeps the hold.

        >>> with StoreWriter.reserve("new.h5"):
        ...     Path("new.h5.lock").exists()
        True
        """
        if not Path(out).parent.is_dir():  # the lock file goes beside `out`
            raise NJTCError(f"cannot write {out}: folder {Path(out).parent} does not exist")
        with StoreWriter.lock(out):  # first: a run writing `out` now is named as such, not as a leftover
            check_output(out, resume=resume, overwrite=overwrite)
            yield Path(out)

    def _attributes(self, provenance: dict, batch_size: int, shard: tuple[int, int]) -> dict:
        plan = self.plan
        attrs = {**provenance, "format": FORMAT, "format_version": FORMAT_VERSION, "d_model": self.head.d_model,
                 "vocab_size": self.head.vocab_size, "dtype": self.dtype, "seq_len": plan.seq_len,
                 "positions": "all" if plan.position is None else "one-per-sequence", "batch_size": batch_size,
                 "n_rows": plan.n_rows, "n_sequences": len(plan.sequence), "rows_written": 0, "complete": False,
                 "shard": f"{shard[0]}/{shard[1]}", "bos": plan.bos, "layers": self.layers, "split_by": "document"}
        ordered = {key: attrs[key] for key in _ROOT_ATTRIBUTES}
        ordered.update(attrs)  # any further provenance after
        return ordered

    def _open(self, attrs: dict, resume: bool) -> None:
        """Reopen the partial file to resume, check the free space, else create the file."""
        if resume:
            self._reopen(attrs)
        written = 0 if self._file is None else int(self._file.attrs["rows_written"])
        needed = (self.plan.n_rows - written) * bytes_per_token(len(self.layers), self.head.d_model, self.dtype)
        needed += 0 if resume else self.head.unembed.numel() * 4
        free = shutil.disk_usage(self.out.parent).free
        if needed > free:
            raise NJTCError(f"{self.out} needs about {needed / 1e9:.2f} GB more, and {self.out.parent} has "
                            f"{free / 1e9:.2f} GB free")
        if self._file is None:
            try:
                self.partial.unlink(missing_ok=True)
                self._create(attrs)
            except _WRITE_ERRORS as err:
                if write_failure(err) is None:
                    raise
                raise NJTCError(f"cannot write {self.partial}: {write_failure(err)}") from err

    def _reopen(self, attrs: dict) -> None:
        try:
            self._file = h5py.File(self.partial, "r+", **_WRITE_CACHE)
        except OSError as err:
            raise NJTCError(f"cannot resume: {self.partial} is not a readable HDF5 file; start again with "
                            "`overwrite=True`") from err
        for key in _RESUME_KEYS:
            stored = self._file.attrs.get(key)
            stored = stored.item() if isinstance(stored, np.generic) else stored
            if isinstance(stored, np.ndarray):
                stored = stored.tolist()
            if key == "layers" and stored is None:  # a partial store begun before `layers` kept every layer
                stored = list(range(self.n_layers + 1))
            if stored != attrs[key]:
                raise NJTCError(f"cannot resume: {key} differs (file has {stored!r}, this run {attrs[key]!r})")

    def _create(self, attrs: dict) -> None:
        """Create the pre-allocated file; a half-created one holds nothing to resume and is removed."""
        self._file = h5py.File(self.partial, "w", **_WRITE_CACHE)
        try:
            self._layout(attrs)
        except BaseException:  # a failed write, an interruption
            _close_quietly(self._file)  # never leave it to h5py's garbage collection
            self._file = None
            self.partial.unlink(missing_ok=True)
            raise

    def _layout(self, attrs: dict) -> None:
        f, plan = self._file, self.plan
        # every attribute written later exists from the start, so later writes never grow the file
        for key in _HEAD_CHECK:
            f.attrs[key] = float("nan")
        for key, value in attrs.items():
            f.attrs[key] = value
        n, d = plan.n_rows, self.head.d_model
        store_dtype = STORE_DTYPES[self.dtype]
        chunk_rows = _chunk_rows(attrs["batch_size"] * plan.rows_per_sequence, n, d * store_dtype.itemsize)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # a kill mid-run only leaves raw data behind
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every row is written before the file is complete
        dcpl.set_fletcher32()
        hidden = f.create_group("hidden")
        for layer in self.layers:
            hidden.create_dataset(str(layer), shape=(n, d), dtype=store_dtype, chunks=(chunk_rows, d), dcpl=dcpl.copy())
        repeat = plan.rows_per_sequence
        index = {"tokens": np.zeros(n, np.int32), "sequence": np.repeat(plan.sequence, repeat).astype(np.int32),
                 "position": plan.row_positions(slice(None)).astype(np.int32),
                 "split": np.repeat(plan.split, repeat).astype(np.uint8),
                 "document": plan.row_documents().astype(np.int32),
                 "validation_documents": plan.validation_documents.astype(np.int32),
                 "final_top1": np.zeros(n, np.int32), "final_topk": np.zeros((n, FINAL_TOPK), np.int32)}
        for name, data in index.items():
            if len(data) == 0:  # no validation documents (val_fraction 0): nothing to chunk or checksum
                f.create_dataset(name, data=data)
            else:
                f.create_dataset(name, data=data, chunks=(min(len(data), 65536),) + data.shape[1:], fletcher32=True)
        self.head.write_group(f.create_group("head"))
        f.flush()

    def write(self, rows: slice, hidden, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Write rows ``rows`` (a slice starting at :attr:`rows_written`): ``hidden[l]`` of every stored
        layer, the input ``tokens`` and the top-k of the model's ``logits``; the first batch checks the head."""
        if rows.start != self.rows_written:
            raise ValueError(f"rows are written in order: the next row is {self.rows_written}, not {rows.start}")
        with self._aborting_on_error():
            r0, r1 = rows.start, rows.stop
            for layer, dataset in self._hidden.items():
                values = hidden[layer].float()
                _check_values(layer, values, self.dtype)
                dataset.write_direct(encode_rows(values, self.dtype), dest_sel=np.s_[r0:r1])
            f = self._file
            f["tokens"][r0:r1] = tokens.cpu().numpy()
            f["final_topk"][r0:r1] = logits.topk(FINAL_TOPK, -1).indices.cpu().numpy()
            f["final_top1"][r0:r1] = logits.argmax(-1).cpu().numpy()
            f.flush()
            if not self.head_checked:  # before the long pass: the head must reproduce the model's own logits
                self.check_head(r0, logits[:64].float().cpu())
            f.attrs["rows_written"] = r1
            f.flush()
            self.rows_written = r1

    def check_head(self, first_row: int, model_logits: torch.Tensor) -> None:
        """Check the head on the stored last layer of rows ``first_row…`` against ``model_logits`` there
        (:func:`njtc_solve.data.capture.check_head`) and record the figures as ``head_check_*`` attributes."""
        with self._aborting_on_error():
            f = self._file
            rows = f[f"hidden/{self.n_layers}"][first_row: first_row + len(model_logits)]
            stored = torch.from_numpy(decode_rows(rows, self.dtype))
            figures = {}
            try:
                check_head(self.head, stored, model_logits, self.model_dtype, self.dtype, record=figures)
            finally:
                for key, value in figures.items():
                    f.attrs[f"head_check_{key}"] = value
            self.head_checked = True

    def finish(self) -> Path:
        """Put every row on disk, mark the file complete, rename it to ``OUT`` and release the lock."""
        with self._aborting_on_error():
            if not self.head_checked:
                raise NJTCError(f"{self.partial}: the head was never checked against the model's logits")
            if self.rows_written != self.plan.n_rows:
                raise NJTCError(f"{self.partial} holds {self.rows_written} of {self.plan.n_rows} rows")
            _sync(self._file)  # every row on disk before the file says it is complete
            self._file.attrs["complete"] = True
            _sync(self._file)
            self._file.close()
            os.replace(self.partial, self.out)
        self._file = None
        self._held.close()
        return self.out

    def abort(self, *, keep: bool = True) -> None:
        """Close the file and release the lock, keeping ``OUT.partial`` to resume unless ``keep=False``."""
        if self._file is not None:
            _close_quietly(self._file)
            self._file = None
            if not keep:
                self.partial.unlink(missing_ok=True)
        self._held.close()

    def _failed(self, err: BaseException) -> None:
        """Abort after ``err``; raise the one-line error that replaces it, if any."""
        if self._file is None:  # already ended: handled where it was first raised
            return
        if isinstance(err, _Untrusted):  # after a failed fsync, what the file holds on disk is unknown
            self.abort(keep=False)
            message = (f"cannot write {self.partial}: {err} (fsync failed); what was written cannot be trusted, so "
                       "the partial file is removed: run again without `resume=True`")
            raise NJTCError(message) from err.__cause__
        self.abort(keep=not isinstance(err, NJTCError))
        reason = write_failure(err) if isinstance(err, _WRITE_ERRORS) else None
        if reason is not None:  # a write failed (disk full, quota, I/O error): rows_written counts flushed batches
            raise NJTCError(f"cannot write {self.partial}: {reason}; the partial file is kept: free space, "
                            "then run again with `resume=True`") from err

    @contextmanager
    def _aborting_on_error(self):
        try:
            yield
        except BaseException as err:
            self._failed(err)
            raise

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind, err, traceback) -> None:
        if err is None:
            self.abort(keep=True)  # left without finish(): the partial file stays, to resume
        else:
            self._failed(err)

    def __repr__(self) -> str:
        state = "open" if self._file is not None else "closed"
        return f"StoreWriter({str(self.out)!r}, rows={self.rows_written}/{self.plan.n_rows}, {state})"
