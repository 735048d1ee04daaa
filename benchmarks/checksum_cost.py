"""What HDF5's fletcher32 checksums cost a store, side by side in one run.

Writes the same rows into two stores laid out as extraction lays them out (early allocation,
no chunk cache, one dataset per layer), one with checksums and one without, then reads both
back in the fit's chunks. With ``--store``, also copies that store with checksums and times
the 30-layer statistics pass over both.

    python benchmarks/checksum_cost.py [--rows 8192] [--store runs/demo/activations.h5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from njtc_solve.solve.statistics_pass import accumulate_statistics
from njtc_solve.data.store import ActivationStore


def write(path, rows, d, layers, checksum) -> float:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    if checksum:
        dcpl.set_fletcher32()
    block = np.random.default_rng(0).normal(size=(1024, d)).astype(np.float32)
    start = time.perf_counter()
    with h5py.File(path, "w", rdcc_nbytes=0) as f:
        sets = [f.create_dataset(f"hidden/{l}", shape=(rows, d), dtype="f4", chunks=(1024, d), dcpl=dcpl.copy())
                for l in range(layers)]
        for i in range(0, rows, 1024):
            for s in sets:
                s.write_direct(block, dest_sel=np.s_[i:i + 1024])
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    return time.perf_counter() - start


def read(path, rows, layers) -> float:
    start = time.perf_counter()
    with h5py.File(path, "r") as f:
        for i in range(0, rows, 4096):
            for l in range(layers):
                f[f"hidden/{l}"][i:i + 4096]
    return time.perf_counter() - start


def checksummed_copy(src, dst) -> None:
    with h5py.File(src) as a, h5py.File(dst, "w") as b:
        b.attrs.update(a.attrs)

        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):
                b.create_dataset(name, data=obj[...], chunks=obj.chunks or True, fletcher32=True)
            else:
                b.require_group(name).attrs.update(obj.attrs)

        a.visititems(copy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--layers", type=int, default=31)
    p.add_argument("--store", help="also time the statistics pass over this store and a checksummed copy")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        plain, summed = Path(tmp) / "plain.h5", Path(tmp) / "checksum.h5"
        w0, w1 = write(plain, args.rows, args.d, args.layers, False), write(summed, args.rows, args.d, args.layers, True)
        r0, r1 = read(plain, args.rows, args.layers), read(summed, args.rows, args.layers)
        gb = args.rows * args.layers * args.d * 4 / 1e9
        print(f"{gb:.2f} GB: write {w1:.2f} s with checksums, {w0:.2f} s without; read {r1:.2f} s, {r0:.2f} s")
        if args.store:
            copy = Path(tmp) / "store-checksum.h5"
            checksummed_copy(args.store, copy)
            times = {}
            for name, path in (("without", args.store), ("with", copy), ("without", args.store), ("with", copy)):
                with ActivationStore(path) as s:
                    start = time.perf_counter()
                    accumulate_statistics(s, list(range(s.n_layers)), progress=False)
                    times.setdefault(name, []).append(time.perf_counter() - start)
            print(f"statistics pass over {args.store}: {min(times['with']):.2f} s with checksums, "
                  f"{min(times['without']):.2f} s without (best of 2)")


if __name__ == "__main__":
    main()
