"""Statistics accumulation against the machine's own float32 GEMM throughput.

Measures, in one run on one device: the peak float32 (and float64) GEMM rate; the
accumulation rate (rows/s, GFLOP/s) on synthetic data and its ratio to that peak; how time
grows with rows n, width d and the number of source layers; the solve time against d; and,
when a store is given, the rate of a real pass over it (HDF5 reads included).

    python benchmarks/throughput.py                       # CPU, this machine
    python benchmarks/throughput.py --device cuda --d 4096 --rows 1048576   # a GPU

Writes ``benchmarks/results/throughput-{device}.json``; prints the headline ratio last.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from njtc_solve.solve.statistics_pass import accumulate_statistics
from njtc_solve.solve.solvers import solve_reduced_rank
from njtc_solve.solve.stats import MomentAccumulator
from njtc_solve.data.store import ActivationStore
from provenance import measured_at

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gemm(device, dtype, d=576, repeats=10, sizes=(1024, 2048, 4096)) -> float:
    """Best measured GFLOP/s over square GEMMs and the accumulation's own shape (XᵀX, X: 8192×d).

    The practical peak of this machine and library; a ratio against it is what the
    accumulation achieves of what the hardware actually delivers.
    """
    shapes = [(n, n, n) for n in sizes] + [(d, 8192, d), (d, 8192, 2 * d)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(k, m, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a.T @ b
        sync(device)
        for _ in range(3):  # best of three timings of `repeats` products
            t = time.perf_counter()
            for _ in range(repeats):
                a.T @ b
            sync(device)
            best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - t) / 1e9)
    return best


def needed_flops(d, layers) -> float:
    """Multiply-adds ×2 per row that the statistics need: the triangles of XᵀX and YᵀY, all of XᵀY."""
    return layers * (3 * d * d + d) + d * d + d


def accumulate_rate(device, rows, d, layers, chunk=8192, float64=False, full_gram=False) -> dict:
    """Accumulate synthetic chunks generated on the device; GEMM flops per row: 2d²(2·layers+1) for full
    Gram matrices, :func:`needed_flops` for what the statistics need.

    ``full_gram``: the accumulator as it was before the triangular Gram (one ``Xᵀ[X | Y]`` GEMM per
    row block and layer, the whole ``YᵀY``), for a side-by-side comparison.
    """
    acc = MomentAccumulator(range(layers), device=device, float64=float64)
    if full_gram:
        import njtc_solve.solve.stats as stats_module

        saved = stats_module.add_upper_gram
        stats_module.add_upper_gram = lambda total, a: stats_module.add_gram(total, a[:, :total.shape[0]], a)
    try:
        return _accumulate_rate(acc, device, rows, d, layers, chunk)
    finally:
        if full_gram:
            stats_module.add_upper_gram = saved


def _accumulate_rate(acc, device, rows, d, layers, chunk) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    xs = {l: torch.randn(chunk, d, device=device, generator=gen) * 3 + 100 for l in range(layers)}
    y = torch.randn(chunk, d, device=device, generator=gen) * 5 + 50
    acc.update(xs, y)  # warm-up (also fixes the shift)
    sync(device)
    n_chunks = max(1, rows // chunk)
    t = time.perf_counter()
    for _ in range(n_chunks):
        acc.update(xs, y)
    sync(device)
    seconds = time.perf_counter() - t
    n = n_chunks * chunk
    return {"rows": n, "d": d, "layers": layers, "seconds": seconds, "rows_per_s": n / seconds,
            "gflops": 2 * n * d * d * (2 * layers + 1) / seconds / 1e9,
            "gflops_needed": n * needed_flops(d, layers) / seconds / 1e9}


def solve_time(d, device, rank=32) -> float:
    a = torch.randn(2 * d, d, dtype=torch.float64, device=device)
    cxx = a.T @ a
    cxy = cxx @ torch.randn(d, d, dtype=torch.float64, device=device)
    solve_reduced_rank(cxx[:8, :8], cxy[:8]).factors(2)  # warm-up (the device's solver libraries)
    sync(device)
    t = time.perf_counter()
    solve_reduced_rank(cxx, cxy).factors(rank)
    sync(device)
    return time.perf_counter() - t


def read_time(store, layers, chunk_rows=4096) -> float:
    """Seconds to read (and decode and checksum) the training rows of ``layers``, computing nothing."""
    t = time.perf_counter()
    for _ in store.iter_chunks(layers, split="train", chunk_rows=chunk_rows, prefetch=False,
                               skip_positions=store.default_skip_positions):
        pass
    return time.perf_counter() - t


def store_measurements(path, device, peak) -> dict:
    """The real all-layer store pass against the same rows accumulated in memory, and a single-layer fit
    against its IO + GEMM bound, side by side."""
    from njtc_solve.solve.fit import fit_shortcuts

    out = {}
    with ActivationStore(path) as store:
        layers = list(range(store.n_layers))
        stats = accumulate_statistics(store, layers, device=str(device), progress=False)
        rows = stats.n_rows
        memory = accumulate_rate(device, rows, store.d_model, len(layers), chunk=4096)
        memory_seconds = memory["seconds"] * rows / memory["rows"]
        read_all = read_time(store, layers + [store.n_layers])
        out["store_pass"] = {**{k: stats.meta[k] for k in ("seconds", "rows_per_s", "gflops")}, "rows": rows,
                             "layers": len(layers), "fraction_of_float32_peak": stats.meta["gflops"] / peak,
                             "needed_fraction_of_float32_peak":
                                 rows * needed_flops(store.d_model, len(layers)) / stats.meta["seconds"] / 1e9 / peak,
                             "in_memory_seconds_same_rows": memory_seconds, "read_only_seconds": read_all,
                             "over_in_memory": stats.meta["seconds"] / memory_seconds}
        layer = min(5, store.n_layers - 1)
        t = time.perf_counter()
        fit_shortcuts(store, method="njtc", ranks=[32], layers=[layer], device=str(device), progress=False)
        fit_seconds = time.perf_counter() - t
        one = accumulate_rate(device, rows, store.d_model, 1, chunk=4096)
        gemm = one["seconds"] * rows / one["rows"]
        io = read_time(store, [layer, store.n_layers])
        solve = solve_time(store.d_model, device)
        out["single_layer_fit"] = {"layer": layer, "seconds": fit_seconds, "read_seconds": io,
                                   "gemm_seconds": gemm, "solve_seconds": solve, "bound_seconds": io + gemm + solve,
                                   "over_bound": fit_seconds / (io + gemm + solve)}
    s, f = out["store_pass"], out["single_layer_fit"]
    print(f"real store pass ({s['layers']} layers, {rows} rows): {s['seconds']:.2f} s, in memory "
          f"{s['in_memory_seconds_same_rows']:.2f} s ({s['over_in_memory']:.2f}x), reading alone "
          f"{s['read_only_seconds']:.2f} s; {100 * s['needed_fraction_of_float32_peak']:.0f}% of float32 peak "
          f"(needed flops)", flush=True)
    print(f"single-layer fit (layer {f['layer']}, NJTC r32): {f['seconds']:.2f} s against its bound "
          f"{f['bound_seconds']:.2f} s (read {f['read_seconds']:.2f} + GEMM {f['gemm_seconds']:.2f} + solve "
          f"{f['solve_seconds']:.2f}): {f['over_bound']:.2f}x", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--d", type=int, default=576, help="width for the headline measurement (SmolLM2: 576)")
    p.add_argument("--layers", type=int, default=4, help="source layers for the headline measurement")
    p.add_argument("--rows", type=int, default=65536, help="rows for the headline measurement")
    p.add_argument("--widths", default="256,576,1024,2048,4096")
    p.add_argument("--peak-sizes", default="1024,2048,4096", help="square GEMM sizes of the peak measurement")
    p.add_argument("--store", help="also time a real pass over this store")
    p.add_argument("--quick", action="store_true", help="smaller sweeps")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("highest")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    sizes = [int(n) for n in args.peak_sizes.split(",")]
    result["peak_gflops_float32"] = peak_gemm(device, torch.float32, args.d, sizes=sizes)
    result["peak_gflops_float64"] = peak_gemm(device, torch.float64, args.d, repeats=3, sizes=sizes)
    print(f"peak GEMM: float32 {result['peak_gflops_float32']:.1f} GFLOP/s, "
          f"float64 {result['peak_gflops_float64']:.1f} GFLOP/s", flush=True)

    head = accumulate_rate(device, args.rows, args.d, args.layers)
    head["fraction_of_float32_peak"] = head["gflops"] / result["peak_gflops_float32"]
    head["needed_fraction_of_float32_peak"] = head["gflops_needed"] / result["peak_gflops_float32"]
    result["headline"] = head
    full = accumulate_rate(device, args.rows, args.d, args.layers, full_gram=True)
    full["needed_fraction_of_float32_peak"] = full["gflops_needed"] / result["peak_gflops_float32"]
    result["headline_full_gram"] = full
    print(f"accumulation, counting the flops the statistics need: triangular Gram "
          f"{100 * head['needed_fraction_of_float32_peak']:.0f}% of float32 peak, full Gram (before) "
          f"{100 * full['needed_fraction_of_float32_peak']:.0f}%; time ratio full/triangular "
          f"{full['seconds'] / head['seconds']:.2f}", flush=True)
    head64 = accumulate_rate(device, args.rows // 4, args.d, args.layers, float64=True)
    head64["fraction_of_float64_peak"] = head64["gflops"] / result["peak_gflops_float64"]
    result["headline_float64"] = head64
    print(f"accumulation d={args.d}, {args.layers} layers: {head['rows_per_s']:.0f} rows/s, "
          f"{head['gflops']:.1f} GFLOP/s ({100 * head['fraction_of_float32_peak']:.0f}% of float32 peak); "
          f"float64 GEMMs: {100 * head64['fraction_of_float64_peak']:.0f}% of float64 peak", flush=True)

    scale = 4 if args.quick else 1
    base_rows = max(8192, args.rows // (4 * scale))
    result["rows_sweep"] = [accumulate_rate(device, base_rows * k, args.d, args.layers) for k in (1, 2, 4)]
    result["layers_sweep"] = [accumulate_rate(device, base_rows, args.d, k) for k in (1, 4, 16, 30)]
    widths = [int(w) for w in args.widths.split(",")]
    result["width_sweep"] = [accumulate_rate(device, max(8192, base_rows * args.d**2 // w**2), w, 1) for w in widths]
    result["solve_seconds"] = {w: solve_time(w, device) for w in widths if w <= 4096}
    rows_t = [r["seconds"] / r["rows"] for r in result["rows_sweep"]]
    result["time_per_row_spread"] = max(rows_t) / min(rows_t)
    for name in ("rows_sweep", "layers_sweep", "width_sweep"):
        for r in result[name]:
            print(f"{name}: rows={r['rows']} d={r['d']} layers={r['layers']} {r['seconds']:.3f}s "
                  f"{r['gflops']:.1f} GFLOP/s", flush=True)
    print("solve (two eighs, float64) seconds by d:", {k: round(v, 3) for k, v in result["solve_seconds"].items()})

    if args.store:
        result.update(store_measurements(args.store, device, result["peak_gflops_float32"]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"throughput-{device.type}.json").write_text(json.dumps({"measured_at": measured_at(), **result}, indent=1))
    print(f"time per row varies {result['time_per_row_spread']:.2f}x over a 4x range of n (1.00 = linear)")
    print(f"HEADLINE: accumulation at {100 * head['needed_fraction_of_float32_peak']:.0f}% of the measured float32 "
          f"GEMM peak counting the flops the statistics need ({head['gflops_needed']:.1f} of "
          f"{result['peak_gflops_float32']:.1f} GFLOP/s) on {result['device']}")


if __name__ == "__main__":
    main()
