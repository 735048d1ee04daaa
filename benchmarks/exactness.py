"""The default float32 accumulation against float64 GEMMs on a real store, every layer.

For LayerNorm N-NJTC (and JTC on the same inputs) fitted twice from the same store, once with
the default shifted float32 GEMMs and once with ``--float64``, prints the relative difference
of the factors ``U``, ``V``, the map ``U·V`` and the full JTC map, per source layer, and the
worst over layers last.

    python benchmarks/exactness.py --store runs/demo/activations.h5 [--rank 32]

Writes ``benchmarks/results/exactness.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from njtc_solve.solve.fit import fit_from_statistics
from njtc_solve.solve.statistics_pass import accumulate_statistics
from njtc_solve.data.store import ActivationStore
from provenance import measured_at

RESULTS = Path(__file__).resolve().parent / "results"


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/demo/activations.h5")
    p.add_argument("--rank", type=int, default=32)
    args = p.parse_args()
    fits, seconds = {}, {}
    with ActivationStore(args.store) as store:
        layers = list(range(store.n_layers))
        for f64 in (False, True):
            start = time.perf_counter()
            stats = accumulate_statistics(store, layers, input_norm="layer", float64=f64, progress=False)
            seconds[f64] = time.perf_counter() - start
            [narrow] = fit_from_statistics(stats, method="nnjtc", ranks=[args.rank], normalize="layer")
            [full] = fit_from_statistics(stats, method="jtc", ranks=None, normalize="layer")
            fits[f64] = (narrow, full)
    rows = []
    print("layer  U          V          U·V        JTC")
    for layer in layers:
        a, b = fits[False][0].maps[layer], fits[True][0].maps[layer]
        row = {"layer": layer, "U": rel(a.U, b.U), "V": rel(a.V, b.V), "UV": rel(a.U @ a.V, b.U @ b.V),
               "jtc": rel(fits[False][1].maps[layer].weight, fits[True][1].maps[layer].weight)}
        rows.append(row)
        print(f"{layer:5d}  {row['U']:.2e}   {row['V']:.2e}   {row['UV']:.2e}   {row['jtc']:.2e}")
    RESULTS.mkdir(exist_ok=True)
    out = {"store": args.store, "rank": args.rank, "layers": rows, "seconds_float32": seconds[False],
           "seconds_float64": seconds[True], "rows": stats.n_rows}
    (RESULTS / "exactness.json").write_text(json.dumps({"measured_at": measured_at(), **out}, indent=1))
    worst = {k: max(r[k] for r in rows) for k in ("U", "V", "UV", "jtc")}
    above = [r["layer"] for r in rows if max(r["U"], r["V"], r["UV"]) > 1e-5]
    print(f"pass: float32 {seconds[False]:.1f}s, float64 {seconds[True]:.1f}s over {stats.n_rows} rows")
    print(f"worst relative difference, float32 vs float64 accumulation (LayerNorm N-NJTC r{args.rank}): "
          f"U {worst['U']:.1e}, V {worst['V']:.1e}, U·V {worst['UV']:.1e}, JTC {worst['jtc']:.1e}; "
          f"layers above 1e-5: {above or 'none'}")


if __name__ == "__main__":
    main()
