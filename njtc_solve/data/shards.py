"""Sharded extraction: each process's shard file, joined into one store of HDF5 virtual datasets."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import atomic_output
from njtc_solve.data.store import ActivationStore

__all__ = ["combine_shards", "shard_path"]


def shard_path(out, rank: int, world: int) -> Path:
    """File name of one process's shard of a sharded extraction (beside ``out``)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard{rank}-of-{world}{out.suffix}")


_SAME_ACROSS_SHARDS = ("format", "format_version", "model", "architecture", "n_layers", "d_model", "vocab_size",
                       "dtype", "seq_len", "positions", "corpus", "corpus_sha256", "model_sha256", "seed",
                       "val_fraction", "max_tokens", "bos")


def combine_shards(out, shards, overwrite: bool = True) -> Path:
    """Join complete shard stores, in order, into one store of HDF5 virtual datasets.

    The shards stay beside ``out`` (relative links); the result reads like a single-process store.
    """
    out = Path(out)
    opened = [ActivationStore(p) for p in shards]
    try:
        first = opened[0].file
        for store in opened[1:]:
            for key in _SAME_ACROSS_SHARDS:
                if store.file.attrs.get(key) != first.attrs.get(key):
                    raise NJTCError(f"shard {store.path} differs from {opened[0].path} in {key}")
        sizes = [s.n_rows for s in opened]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        names = ["hidden/" + str(l) for l in opened[0].layers]
        names += ["tokens", "sequence", "position", "split", "final_top1"]
        names += [name for name in ("document", "final_topk") if name in first]
        with atomic_output(out, overwrite) as tmp, h5py.File(tmp, "w") as f:
            for key, value in first.attrs.items():
                f.attrs[key] = value
            f.attrs["n_rows"] = f.attrs["rows_written"] = int(offsets[-1])
            f.attrs["n_sequences"] = sum(int(s.file.attrs["n_sequences"]) for s in opened)
            f.attrs["shard"] = "0/1"
            f.attrs["shards"] = [str(Path(s.path).name) for s in opened]
            for name in names:
                ref = first[name]
                layout = h5py.VirtualLayout(shape=(int(offsets[-1]),) + ref.shape[1:], dtype=ref.dtype)
                for store, a, b in zip(opened, offsets[:-1], offsets[1:]):
                    source = h5py.VirtualSource(Path(store.path).name, name, shape=store.file[name].shape)
                    layout[int(a):int(b)] = source
                f.create_virtual_dataset(name, layout)
            first.copy("head", f)
            if "validation_documents" in first:
                first.copy("validation_documents", f)
    finally:
        for store in opened:
            store.close()
    return out

