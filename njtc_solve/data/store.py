"""The activation store (HDF5, docs/reference/file-formats.md): format constants, the row codec and the
streaming reader (:class:`ActivationStore`). The writer is :mod:`njtc_solve.data.store_writer`."""

from __future__ import annotations

import os
import queue
import threading
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head
from njtc_solve.core.outputs import is_locked, temporary_path
from njtc_solve.data.rows import RowSourceBase, split_code, split_provenance

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "STORE_DTYPES", "ActivationStore", "being_written",
           "check_chunk_index", "decode_rows", "encode_rows", "opened", "prefetched"]

FORMAT = "njtc-activations"
FORMAT_VERSION = 2  # 2: the head group describes a logit scale, a soft-cap and a norm without gain
READABLE_VERSIONS = (1, 2)  # a format-1 head has none of those (see Head.from_group)
# how the activations are stored; bfloat16 (which HDF5 lacks) as its 16 bits, in uint16
STORE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}


class ActivationStore(RowSourceBase):
    """A read-only activation store: a :class:`~njtc_solve.data.rows.RowSource` streaming row chunks.

    Opening refuses a missing, truncated, foreign, damaged or incomplete file with a one-line :class:`NJTCError`.

    Examples
    --------
    >>> with ActivationStore("activations.h5") as store:
    ...     for rows, chunk in store.iter_chunks([1, store.n_layers], split="train", skip_positions=1):
    ...         x, y = chunk[1], chunk[store.n_layers]
    ...     print(store.n_layers, store.d_model, x.shape == y.shape)
    3 32 True
    """

    def __init__(self, path, allow_incomplete: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            if temporary_path(self.path).is_file():
                raise NJTCError(f"store {self.path} not found: {temporary_path(self.path).name} is being written by "
                                "extract (or was left by an interrupted run: finish it with extract --resume, "
                                "or extract_activations(..., resume=True))")
            raise NJTCError(f"store {self.path} not found (create it with python -m njtc_solve.extract)")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            if being_written(self.path, err):
                raise NJTCError(f"{self.path} is being written by another process (it holds the file open); wait "
                                "for it to finish, then try again") from None
            raise NJTCError(f"{self.path} is not a readable HDF5 file (truncated or corrupt?)") from err
        try:
            self._open(allow_incomplete)
        except NJTCError:
            self.close()
            raise
        except _DAMAGE as err:  # a corrupt object header, chunk index or checksum
            self.close()
            raise NJTCError(f"{self.path} is damaged ({_first_line(err)}); extract it again") from err

    def _open(self, allow_incomplete: bool) -> None:
        """Read and check the root attributes and the datasets' shapes, once, where damage is caught."""
        self._attrs = {k: (v.item() if isinstance(v, np.generic) else v.tolist() if isinstance(v, np.ndarray) else v)
                       for k, v in self.file.attrs.items()}
        attrs = self._attrs
        if attrs.get("format") != FORMAT:
            raise NJTCError(f"{self.path} is not an njtc activation store (format attribute missing)")
        if int(attrs.get("format_version", -1)) not in READABLE_VERSIONS:
            version = attrs.get("format_version")
            raise NJTCError(f"{self.path} has store format version {version}; this library reads "
                            f"{' and '.join(map(str, READABLE_VERSIONS))}")
        if not allow_incomplete and not bool(attrs.get("complete", False)):
            if being_written(self.path):
                raise NJTCError(f"{self.path} is being written by another process (it holds "
                                f"{self.path.name}.lock); wait for it to finish, then try again")
            written, total = int(attrs.get("rows_written", 0)), int(self.file["tokens"].shape[0])
            raise NJTCError(f"{self.path} is incomplete ({written} of {total} rows written); finish it with extract "
                            "--resume (extract_activations(..., resume=True) in Python)")
        self.n_layers = int(attrs["n_layers"])
        self.d_model = int(attrs["d_model"])
        # a store of some source layers (extract --layers) lists them; older stores hold all
        self.layers = [int(l) for l in attrs.get("layers", range(self.n_layers + 1))]
        self.dtype = str(attrs.get("dtype", "float32"))
        if self.dtype not in STORE_DTYPES:
            raise NJTCError(f"{self.path} stores its activations as {self.dtype!r}, which this library cannot read")
        missing = [f"hidden/{l}" for l in self.layers if f"hidden/{l}" not in self.file]
        if missing or "split" not in self.file or "head" not in self.file:
            raise NJTCError(f"{self.path} lacks {missing[0] if missing else 'split or head'}; the file is damaged")
        total = int(self.file["tokens"].shape[0])
        wrong = [name for name in [f"hidden/{l}" for l in self.layers] + ["split", "position"]
                 if name in self.file and self.file[name].shape[0] != total]
        wrong += [f"hidden/{l}" for l in self.layers if self.file[f"hidden/{l}"].shape[1:] != (self.d_model,)]
        if wrong:
            raise NJTCError(f"{self.path}: {wrong[0]} has the wrong shape; the file is damaged")
        if not allow_incomplete:
            check_chunk_index(self.file)
        self.n_rows = int(attrs["rows_written"]) if allow_incomplete else total
        self._split = self._read("split", slice(0, self.n_rows))
        self._position = self._read("position", slice(0, self.n_rows)) if "position" in self.file else None

    @property
    def attrs(self) -> dict:
        """Root attributes as plain Python values."""
        return dict(self._attrs)

    @property
    def model_sha256(self) -> str:
        return str(self._attrs["model_sha256"])

    @property
    def split(self) -> np.ndarray:
        """Per-row split codes: 0 train, 1 validation."""
        return self._split

    _held_by = "store"  # how the shared checks of RowSourceBase speak of it

    @cached_property
    def validation_documents(self) -> np.ndarray | None:
        """Every document the extraction assigned to validation (``None`` for a store split by sequence)."""
        if "validation_documents" not in self.file:
            return None
        return np.asarray(self._read("validation_documents", slice(None)), dtype=np.int64)

    @cached_property
    def provenance(self) -> dict:
        """What identifies this store's rows and split (:func:`~njtc_solve.data.rows.split_provenance`)."""
        return split_provenance(self.attrs, self.validation_documents, str(self.path))

    def evaluated_documents(self, skip_positions: int = 0) -> np.ndarray:
        """The documents of the validation rows at positions ``>= skip_positions``."""
        return np.unique(self.read("document")[self.selection("validation", skip_positions)])

    def head(self) -> Head:
        """The model's final norm and unembedding."""
        try:
            return Head.from_group(self.file["head"])
        except _DAMAGE as err:
            raise NJTCError(f"cannot read the head from {self.path} ({_first_line(err)}); the file is damaged") from err

    def read(self, name: str, rows=None) -> np.ndarray:
        """A per-row dataset (``"tokens"``, ``"final_topk"`` …) at ``rows``: all, a slice, a mask or indices."""
        if rows is None:
            return self._read(name, slice(0, self.n_rows))
        if isinstance(rows, slice):
            return self._read(name, rows)
        rows = np.asarray(rows)
        if rows.dtype == bool:
            return self._read(name, slice(0, self.n_rows))[rows]
        if rows.size == 0:
            return self._read(name, slice(0, 0))
        low = int(rows.min())
        return self._read(name, slice(low, int(rows.max()) + 1))[rows - low]

    def _read(self, name: str, rows: slice) -> np.ndarray:
        """``file[name][rows]``; damage becomes a one-line error."""
        try:
            return self.file[name][rows]
        except _DAMAGE as err:
            raise NJTCError(f"cannot read {name} rows {rows.start}-{rows.stop} from {self.path} "
                            f"({_first_line(err)}); the file is damaged: extract it again") from err

    def split_code(self, split) -> int | None:
        """:func:`njtc_solve.data.rows.split_code`."""
        return split_code(split)

    def selection(self, split=None, skip_positions: int = 0, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Boolean mask of the rows ``start:stop`` in ``split`` at positions ``>= skip_positions``."""
        code = self.split_code(split)
        stop = self.n_rows if stop is None else stop
        keep = np.ones(stop - start, bool) if code is None else self._split[start:stop] == code
        if skip_positions > 0 and self._position is not None:
            keep &= self._position[start:stop] >= skip_positions
        return keep

    def iter_chunks(self, layers, split=None, chunk_rows: int = 4096, max_rows: int | None = None,
                    shard: tuple[int, int] = (0, 1), skip_positions: int = 0, prefetch: bool = True):
        """Yield ``(row_indices, {layer: float32 array (rows, d)})`` in row order.

        Parameters
        ----------
        layers : iterable of int
            Layers to read; each is read once per chunk.
        split : {"train", "validation", None}
            Keep only this split's rows.
        chunk_rows : int
            Rows read per window (memory is bounded by ``chunk_rows × d × len(layers)``).
        max_rows : int, optional
            Stop after this many selected rows.
        shard : (rank, world)
            Read only every ``world``-th window, starting at ``rank`` (for scale-out).
        skip_positions : int
            Leave out rows at positions ``< skip_positions`` (the BOS / attention-sink row).
        prefetch : bool
            Read the next chunk in a background thread while the caller works on this one
            (the caller's GEMMs release the GIL, so reading and computing overlap).
        """
        layers = self.check_layers(layers)
        self.split_code(split)  # an unknown split is an error before any read
        chunks = self._chunks(layers, split, chunk_rows, max_rows, shard, skip_positions)
        return prefetched(chunks) if prefetch else chunks

    def _chunks(self, layers, split, chunk_rows, max_rows, shard, skip_positions):
        rank, world = shard
        taken = 0
        for number, start in enumerate(range(0, self.n_rows, chunk_rows)):
            if number % world != rank:
                continue
            stop = min(start + chunk_rows, self.n_rows)
            rows = np.arange(start, stop)[self.selection(split, skip_positions, start, stop)]
            if rows.size == 0:
                continue
            if max_rows is not None and taken + rows.size > max_rows:
                rows = rows[: max_rows - taken]
            pick = slice(None) if rows.size == stop - start else rows - start
            chunk = {}
            for layer in layers:
                data = self._read(f"hidden/{layer}", slice(start, stop))
                chunk[layer] = decode_rows(data[pick], self.dtype)
            taken += rows.size
            yield rows, chunk
            if max_rows is not None and taken >= max_rows:
                return

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        if getattr(self, "file", None) is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, rows={self.n_rows}, layers=0..{self.n_layers}, d={self.d_model})"


_DAMAGE = (KeyError, OSError, ValueError, RuntimeError, TypeError)  # what h5py raises for a damaged file


@contextmanager
def opened(source):
    """``source`` for the block: a path as an :class:`ActivationStore` closed after it, else as it is.

    >>> with opened("activations.h5") as store:
    ...     store.n_layers
    3
    """
    if not isinstance(source, (str, Path)):
        yield source
        return
    with ActivationStore(source) as store:
        yield store


def being_written(path, err: OSError | None = None) -> bool:
    """Whether another process writes ``path``: HDF5's own lock (``err``) or ``PATH.lock`` is held."""
    if err is not None and (isinstance(err, BlockingIOError) or "unable to lock file" in str(err)):
        return True
    return is_locked(path)


def _datasets(group):
    """Every dataset under ``group``, depth first."""
    for item in group.values():
        if isinstance(item, h5py.Group):
            yield from _datasets(item)
        else:
            yield item


def _chunk_coverage(ds, file_size: int | None) -> tuple[int, int, list]:
    """``(grid points indexed, grid points, offsets of chunks out of place or indexed twice)`` of a dataset."""
    grid = [-(-n // c) for n, c in zip(ds.shape, ds.chunks)]
    found, bad = set(), []

    def visit(info):
        offset = tuple(o // c for o, c in zip(info.chunk_offset, ds.chunks))
        if (info.byte_offset is None or info.size == 0
                or (file_size is not None and info.byte_offset + info.size > file_size)
                or any(o % c for o, c in zip(info.chunk_offset, ds.chunks))
                or any(not 0 <= o < g for o, g in zip(offset, grid)) or offset in found):
            bad.append(info.chunk_offset)
        found.add(offset)

    ds.id.chunk_iter(visit)
    return len(found), int(np.prod(grid)), bad


def check_chunk_index(file) -> None:
    """Refuse a store whose chunk index does not cover every chunked dataset's extent.

    HDF5 checksums chunks but not their index, where a damaged entry reads its rows as zeros
    without an error. Every chunked dataset needs one chunk at each point of its grid, inside the file.

    Raises
    ------
    NJTCError
        ``PATH is damaged: the chunk index of hidden/3 covers 27 of its 28 chunks; ...``
    """
    size = os.fstat(file.id.get_vfd_handle()).st_size if file.driver == "sec2" else None
    for ds in _datasets(file):
        if ds.chunks is None or ds.is_virtual or ds.size == 0:
            continue
        found, expected, bad = _chunk_coverage(ds, size)
        if bad or found != expected:
            what = (f"has a chunk at {tuple(bad[0])} outside the dataset or the file, or twice" if bad else
                    f"covers {found} of its {expected} chunks")
            raise NJTCError(f"{file.filename} is damaged: the chunk index of {ds.name.lstrip('/')} {what} (rows "
                            "would read as zeros); extract it again")


def prefetched(items, depth: int = 1):
    """Iterate over ``items`` produced ``depth`` ahead by a background thread.

    An exception in the producer is raised here, in the consumer, unchanged. Closing the
    iterator early (``break``, an error in the consumer) stops the producer and waits for it,
    so nothing reads a file after its owner has moved on.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(kind, value) -> bool:
        while not stop.is_set():
            try:
                ready.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not hand_over("item", item):
                    return
            hand_over("end", None)
        except BaseException as err:  # handed to the consumer, raised there
            hand_over("error", err)

    worker = threading.Thread(target=produce, name="njtc-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()


def encode_rows(values, dtype: str) -> np.ndarray:
    """Rows (a float32 tensor) as stored in ``dtype`` (see :data:`STORE_DTYPES`), rounded to nearest."""
    if dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return np.ascontiguousarray(values.cpu().numpy(), dtype=STORE_DTYPES[dtype])


def decode_rows(data: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows back as float32 (exact: every stored value is a float32 value).

    >>> import torch
    >>> x = torch.tensor([[1.0, -2.5, 0.1]])
    >>> decode_rows(encode_rows(x, "bfloat16"), "bfloat16").tolist()
    [[1.0, -2.5, 0.10009765625]]
    """
    if dtype == "bfloat16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(data, dtype=np.float32)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]

