"""Every layer to every later layer on the default model: the pairwise heatmap, and the memory of ``all``.

    python benchmarks/pairs.py                     # SmolLM2-135M, CPU, ~10 minutes on 2 cores

1. Memory and time: one live pass fitting JTC maps to the last layer alone (the single-target
   fit), then one live pass fitting every pair ``l < l'`` (``fit_all_targets``): the statistics'
   bytes and the process's peak resident memory above what it held before each fit (the peak
   is reset through ``/proc/self/clear_refs`` before each).
2. R² and relative error of every pair (465 for 30 blocks) on ``--eval-tokens`` held-out tokens,
   beside the identity (the blocks between the two layers removed).
3. Skip quality on a subset of pairs (every ``--skip-stride``-th layer as source and target):
   the model run with blocks ``l..l'-1`` replaced by the JTC map, KL to the full model and top-1
   agreement on ``--skip-tokens`` held-out tokens, beside dropping those blocks.

Writes ``benchmarks/results/pairs.json`` (with the git commit) and ``docs/pairs/heatmap.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from njtc_solve.data.corpus import load_corpus
from njtc_solve.solve.fit import fit_all_targets, fit_shortcuts
from njtc_solve.core.models import load_model
from njtc_solve.solve.pair_statistics import pair_memory_bytes
from njtc_solve.evaluation.layer_pairs import evaluate_pairs
from njtc_solve.maps.shortcuts import Shortcuts
from njtc_solve.data.live import LiveSource

ROOT = Path(__file__).resolve().parents[1]


def _rss(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _measured(fn):
    """``(result, seconds, peak bytes above the resident memory before)``."""
    _reset_peak()
    before = _rss("VmRSS")
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start, _rss("VmHWM") - before


def _subset(sc: Shortcuts, sources) -> Shortcuts:
    return sc.replace(maps={l: m for l, m in sc.maps.items() if l in sources})


def _grid(records, key, n):
    grid = np.full((n + 1, n + 1), np.nan)  # [target, source]
    for r in records:
        grid[r["target"], r["source"]] = r[key]
    return grid


def plot(records, skip_records, n_layers, path: Path, meta: dict) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    extent = (-0.5, n_layers + 0.5, n_layers + 0.5, -0.5)
    for ax, key, title in [(axes[0], "r2", "JTC map: held-out R²"), (axes[1], "identity_r2",
                                                                      "identity (blocks removed): R²")]:
        grid = _grid(records, key, n_layers)
        cmap = plt.get_cmap("viridis").copy()
        cmap.set_under("red")  # R² < 0 (worse than the mean) is not the colour of 0
        im = ax.imshow(grid, vmin=0, vmax=1, cmap=cmap, extent=extent)
        negative = grid[np.isfinite(grid) & (grid < 0)]
        if len(negative):
            title += f"\nred: {len(negative)} pairs with R² < 0 (down to {negative.min():.3g})"
        ax.set(title=title, xlabel="source layer l", ylabel="target layer l'")
        fig.colorbar(im, ax=ax, shrink=0.85, extend="min" if len(negative) else "neither")
    grid = _grid(skip_records, "skip_kl", n_layers)
    finite = grid[np.isfinite(grid)]
    im = axes[2].imshow(grid, cmap="magma_r", extent=extent,
                        norm=LogNorm(vmin=max(finite.min(), 1e-3), vmax=finite.max()))
    axes[2].set(title=f"JTC replacing blocks l..l'-1: KL to the full model (nats)\n"
                      f"layers 0, {meta['skip_stride']}, {2 * meta['skip_stride']}, ..., {meta['skip_rows']} held-out tokens",
                xlabel="source layer l", ylabel="target layer l'")
    fig.colorbar(im, ax=axes[2], shrink=0.85)
    fig.suptitle(f"SmolLM2-135M, every pair l < l' from one pass ({meta['train_rows']} training tokens; "
                 f"R² on {meta['eval_rows']} held-out tokens)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=10240, help="corpus tokens (3/4 training)")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--skip-tokens", type=int, default=512)
    p.add_argument("--skip-stride", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pairs.json"))
    p.add_argument("--figure", default=str(ROOT / "docs" / "pairs" / "heatmap.png"))
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from --out's JSON")
    args = p.parse_args()
    if args.plot_only:
        saved = json.loads(Path(args.out).read_text())
        plot(saved["pairs"], saved["skips"], saved["meta"]["n_layers"], Path(args.figure), saved["meta"])
        return
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer, name = load_model(progress=False)
    live = LiveSource(model, tokenizer, load_corpus()[1], model_name=name, max_tokens=args.max_tokens)
    n, d = live.n_layers, live.d_model

    [single], single_s, single_peak = _measured(lambda: fit_shortcuts(live, method="jtc", progress=False))
    solved, pass_s, pass_peak = _measured(lambda: fit_all_targets(live, method="jtc", progress=False))
    fits, solve_s, solve_peak = _measured(lambda: [sc for _, scs in solved for sc in scs])
    n_pairs = sum(len(sc.maps) for sc in fits)
    memory = {"single_statistics_bytes": 8 * d * d * (2 * n + 1), "all_statistics_bytes":
              pair_memory_bytes(n_sources=n, n_targets=n, n_pairs=n_pairs, d=d),
              "single_fit_peak_rss_above_before": single_peak, "all_pass_peak_rss_above_before": pass_peak,
              "all_solves_peak_rss_above_before": solve_peak,
              "note": "the solves' peak includes the 465 JTC maps this script keeps in memory (465 x d^2 x 4 B)"}
    print(f"single target: {single_s:.1f}s, peak +{single_peak / 1e9:.2f} GB; all {n_pairs} pairs: pass "
          f"{pass_s:.1f}s, peak +{pass_peak / 1e9:.2f} GB (statistics {memory['all_statistics_bytes'] / 1e9:.2f} GB), "
          f"solves {solve_s:.1f}s, peak +{solve_peak / 1e9:.2f} GB")

    start = time.perf_counter()
    errors = evaluate_pairs(live, fits, max_rows=args.eval_tokens, skip_model=False, progress=False)
    errors_s = time.perf_counter() - start
    layers = set(range(0, n + 1, args.skip_stride))
    subset = [_subset(sc, layers) for sc in fits if sc.target_layer in layers]
    start = time.perf_counter()
    skips = evaluate_pairs(live, subset, max_rows=args.skip_tokens, skip_rows=args.skip_tokens, progress=False)
    skip_s = time.perf_counter() - start
    print(f"pair errors: {len(errors.records)} pairs in {errors_s:.1f}s; skip: {len(skips.records)} pairs in "
          f"{skip_s:.1f}s")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    meta = {"model": name, "commit": commit, "n_layers": n, "d_model": d, "max_tokens": args.max_tokens,
            "train_rows": single.stats["layers"][0]["n_train"], "eval_rows": errors.meta["validation_rows"],
            "skip_rows": skips.records[0]["skip_rows"], "skip_stride": args.skip_stride, "seconds": {
                "single_fit": single_s, "all_pass": pass_s, "all_solves": solve_s, "pair_errors": errors_s,
                "skips": skip_s, "total": time.perf_counter() - t0}, "memory": memory,
            "torch_threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps({"meta": meta, "pairs": errors.records, "skips": skips.records}, indent=1))
    plot(errors.records, skips.records, n, Path(args.figure), meta)
    best = sorted(skips.records, key=lambda r: r["skip_kl"])[:5]
    print("lowest skip KL: " + ", ".join(f"{r['source']}->{r['target']} {r['skip_kl']:.3f} (drop {r['drop_kl']:.3f})"
                                          for r in best))
    print(f"wrote {args.out}, {args.figure}; total {meta['seconds']['total']:.0f}s")


if __name__ == "__main__":  # a missing default model or bad input: one line, exit 2
    from njtc_solve.cli import run_cli

    raise SystemExit(run_cli(lambda argv: main()))
