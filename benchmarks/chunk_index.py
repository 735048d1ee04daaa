"""Cost of the chunk-index check that opening a store runs (issue 19).

HDF5 does not checksum its chunk index, so :class:`njtc_solve.data.store.ActivationStore` walks
every chunked dataset's index on opening (:func:`njtc_solve.data.store.check_chunk_index`). This
times that walk on a store (``--store``) and on synthetic stores with the chunk grid of the
demo store (28,672 rows x 31 layers, 1,024-row chunks) and of Llama-2-7B at 1M tokens
(33 layers, 256-row chunks; d = 1, since the cost is per chunk, not per byte).

    python benchmarks/chunk_index.py [--store runs/demo/activations.h5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from njtc_solve.data.store import check_chunk_index


def _synthetic(path: Path, n: int, d: int, layers: int, chunk_rows: int) -> None:
    with h5py.File(path, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # as extraction allocates them
        dcpl.set_fletcher32()
        group = f.create_group("hidden")
        for layer in range(layers):
            group.create_dataset(str(layer), shape=(n, d), dtype=np.float32, chunks=(chunk_rows, d), dcpl=dcpl.copy())
        for name in ("tokens", "sequence", "position", "split", "document", "final_top1"):
            f.create_dataset(name, data=np.zeros(n, np.int32), chunks=(min(n, 65536),), fletcher32=True)


def _time(path: Path, repeats: int = 3) -> tuple[int, float]:
    best = float("inf")
    with h5py.File(path, "r") as f:
        chunks = sum(ds.id.get_num_chunks() for ds in f["hidden"].values() if ds.chunks)
        for _ in range(repeats):
            start = time.perf_counter()
            check_chunk_index(f)
            best = min(best, time.perf_counter() - start)
    return chunks, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="also time this store")
    args = p.parse_args()
    if args.store:
        chunks, seconds = _time(Path(args.store))
        print(f"{args.store}: {chunks} chunks of hidden states, check {1e3 * seconds:.1f} ms (best of 3)")
    layouts = [("demo grid: 28,672 rows x 31 layers, d=576, 1,024-row chunks", 28672, 576, 31, 1024),
               ("Llama-2-7B grid at 1M tokens: 33 layers, 256-row chunks (d=1)", 1_000_000, 1, 33, 256)]
    with tempfile.TemporaryDirectory() as tmp:
        for label, n, d, layers, chunk_rows in layouts:
            path = Path(tmp) / "store.h5"
            _synthetic(path, n, d, layers, chunk_rows)
            chunks, seconds = _time(path)
            print(f"{label}: {chunks} chunks, check {1e3 * seconds:.1f} ms "
                  f"({1e6 * seconds / chunks:.1f} us per chunk, best of 3)")
            path.unlink()


if __name__ == "__main__":
    main()
