"""One jump for every exit against one map per layer, on SmolLM2-135M's demo store.

    python benchmarks/one_jump.py --store runs/demo/activations.h5     # ~10 minutes on 2 cores

1. One statistics pass over the store's training rows (every source layer against the last),
   saved under ``--work`` and reused by a later run.
2. From those statistics alone: per-layer NJTC and N-NJTC (LayerNorm, and batch) maps of rank
   ``--rank``; the pooled one jump (N-NJTC batch, ranks ``--rank`` and ``--wide-rank``, with and
   without ``residual``; N-NJTC LayerNorm, which holds no per-layer number at all, at both ranks);
   the selected one jump (the per-layer map whose loss over every layer is lowest). Each solve is
   timed. A second pass accumulates the LayerNorm-ed inputs' statistics.
3. Every file and the identity evaluated on the first ``--max-rows`` held-out rows of every
   layer: Precision@1, surprisal, KL (nats). Every number a file holds counted once
   (:attr:`~njtc_solve.maps.shortcuts.Shortcuts.total_params`).

Writes ``benchmarks/results/one_jump.json`` (with the git commit), ``benchmarks/results/one_jump.md``
(the tables of ``docs/one-jump.md``) and ``docs/one-jump/precision_at_1.png``, and prints the headline: the best one jump of at least
15x fewer numbers than the per-layer N-NJTC maps against their mean Precision@1, and the
layers from 1 on where it keeps less than 90 % of theirs.

    python benchmarks/one_jump.py --store runs/demo/activations.h5 --recheck 1-5 --max-rows 2048

re-evaluates the per-layer N-NJTC maps and the best one jump (saved under ``--work`` by a full
run) on more held-out rows at the layers given, where a 512-row figure is within its noise;
writes ``benchmarks/results/one_jump_recheck.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from njtc_solve.data.store import ActivationStore
from njtc_solve.evaluation.evaluate import evaluate_shortcuts
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.solve.statistics_pass import accumulate_statistics
from njtc_solve.solve.stats import Statistics

ROOT = Path(__file__).resolve().parents[1]


def variants(rank: int, wide: int) -> dict[str, dict]:
    """The fits compared, by label: keywords of :func:`~njtc_solve.solve.fit.fit_shortcuts`."""
    batch = {"method": "nnjtc", "normalize": "batch"}
    layer = {"method": "nnjtc", "normalize": "layer"}  # per-token LayerNorm: no per-layer numbers at all
    return {
        f"NJTC r{rank} per layer": {"method": "njtc", "ranks": [rank]},
        f"N-NJTC r{rank} per layer": {**layer, "ranks": [rank]},
        f"N-NJTC batch r{rank} per layer": {**batch, "ranks": [rank]},
        f"one jump LayerNorm r{rank}": {**layer, "ranks": [rank], "one_jump": "pooled"},
        f"one jump LayerNorm r{wide}": {**layer, "ranks": [wide], "one_jump": "pooled"},
        f"one jump r{rank}": {**batch, "ranks": [rank], "one_jump": "pooled"},
        f"one jump r{wide}": {**batch, "ranks": [wide], "one_jump": "pooled"},
        f"one jump r{rank} residual": {**batch, "ranks": [rank], "one_jump": "pooled", "residual": True},
        f"one jump r{wide} residual": {**batch, "ranks": [wide], "one_jump": "pooled", "residual": True},
        f"one jump r{rank} select": {**batch, "ranks": [rank], "one_jump": "select"},
    }


def statistics(store: Path, work: Path, input_norm: str) -> tuple[Statistics, float]:
    """A pass's statistics of raw (``none``) or LayerNorm-ed (``layer``) inputs, read from ``work`` when an
    earlier run saved them, and the pass's seconds."""
    path = work / ("stats.safetensors" if input_norm == "none" else f"stats-{input_norm}.safetensors")
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        with ActivationStore(store) as rows:
            accumulate_statistics(rows, rows.source_layers, input_norm=input_norm).save(path, rows.head())
    stats = Statistics.load(path)
    return stats, float(stats.meta.get("seconds") or float("nan"))


def fit_all(stats: dict[str, Statistics], work: Path, rank: int, wide: int) -> dict[str, dict]:
    """Every variant solved from ``stats`` (by input normalisation), saved under ``work``:
    ``{label: {file, seconds, params, ...}}``."""
    fits = {}
    for label, settings in variants(rank, wide).items():
        start = time.perf_counter()
        [sc] = fit_shortcuts(statistics=stats["layer" if settings.get("normalize") == "layer" else "none"],
                             progress=False, **settings)
        seconds = time.perf_counter() - start
        sc.label = label.replace(" ", "-")
        path = work / f"{sc.label}.safetensors"
        sc.save(path)
        fits[label] = {"file": str(path), "name": sc.label, "solve_s": seconds, "params": sc.total_params,
                       "maps": 1 if sc.one_jump else len(sc.maps), "one_jump": sc.stats.get("one_jump", {})}
        print(f"{label}: {fits[label]['maps']} map(s), {sc.total_params:,} numbers, solved in {seconds:.2f}s")
    return fits


def summarise(records: list[dict], fits: dict, reference: str) -> dict:
    """Per method: mean P@1, surprisal and KL over the layers, each layer's P@1, and its ratio to ``reference``."""
    by = {}
    for r in records:
        by.setdefault(r["method"], {})[r["layer"]] = r
    names = {f["name"]: label for label, f in fits.items()}
    ref = by[fits[reference]["name"]]
    out = {}
    for method, rows in by.items():
        label = names.get(method, "identity (logit lens)")
        layers = sorted(rows)
        p1 = [rows[l]["precision@1"] for l in layers]
        ratio = {l: rows[l]["precision@1"] / ref[l]["precision@1"] for l in layers if l >= 1 and l in ref}
        out[label] = {"layers": layers, "precision@1": p1, "mean_precision@1": float(np.mean(p1)),
                      "mean_surprisal": float(np.mean([rows[l]["surprisal"] for l in layers])),
                      "mean_kl": float(np.mean([rows[l]["kl"] for l in layers])),
                      "min_ratio_from_layer_1": min(ratio.values()), "worst_layer": min(ratio, key=ratio.get),
                      "short_layers": {l: v for l, v in ratio.items() if v < 0.9},
                      **({k: fits[label][k] for k in ("params", "solve_s", "maps")} if label in fits else
                         {"params": 0, "solve_s": 0.0, "maps": 0})}
    return out


def table(summary: dict, reference: str, pass_s: float, n_rows: int) -> str:
    """The Markdown tables of ``benchmarks/results/one_jump.md``."""
    ref = summary[reference]
    lines = [f"Held-out rows per layer: {n_rows}. Statistics passes (raw and LayerNorm-ed inputs, each shared by "
             f"the fits of its inputs): {pass_s:.1f} s in all. Ratios (P@1 and numbers) against {reference}.", "",
             "| method | maps | numbers | vs per-layer N-NJTC | mean P@1 | mean surprisal | mean KL | "
             "min P@1 ratio (layer ≥ 1) | layers < 90 % | solve s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, s in summary.items():
        fewer = f"{ref['params'] / s['params']:.1f}x fewer" if s["params"] else "—"
        short = ", ".join(f"{l} ({100 * v:.0f} %)" for l, v in s["short_layers"].items()) or "none"
        lines.append(f"| {label} | {s['maps']} | {s['params']:,} | {fewer} | {s['mean_precision@1']:.4f} | "
                     f"{s['mean_surprisal']:.3f} | {s['mean_kl']:.3f} | {s['min_ratio_from_layer_1']:.3f} "
                     f"(layer {s['worst_layer']}) | {short} | {s['solve_s']:.2f} |")
    labels = list(summary)
    lines += ["", "Precision@1 by source layer:", "", "| layer | " + " | ".join(labels) + " |",
              "|---" * (len(labels) + 1) + "|"]
    for i, layer in enumerate(ref["layers"]):
        lines.append(f"| {layer} | " + " | ".join(f"{summary[m]['precision@1'][i]:.3f}" for m in labels) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, s in summary.items():
        style = "--" if "per layer" in label else ":" if "identity" in label else "-"
        ax.plot(s["layers"], s["precision@1"], style, marker=".", label=f"{label} ({s['params']:,})")
    ax.set_xlabel("source layer")
    ax.set_ylabel("Precision@1 (held-out)")
    ax.set_title("SmolLM2-135M: one jump for every exit vs one map per layer (numbers held)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/demo/activations.h5")
    p.add_argument("--work", default="runs/one_jump", help="statistics and map files (default: runs/one_jump)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--wide-rank", type=int, default=64)
    p.add_argument("--max-rows", type=int, default=512, help="held-out rows per layer (default: 512)")
    p.add_argument("--recheck", help="layers (e.g. 1-5): re-evaluate the per-layer N-NJTC maps and the best one "
                   "jump of an earlier run there, on --max-rows rows")
    args = p.parse_args(argv)
    work = Path(args.work)
    if args.recheck:
        return recheck(args, work)
    passes = {norm: statistics(Path(args.store), work, norm) for norm in ("none", "layer")}
    pass_s = sum(seconds for _, seconds in passes.values())
    fits = fit_all({norm: stats for norm, (stats, _) in passes.items()}, work, args.rank, args.wide_rank)
    start = time.perf_counter()
    result = evaluate_shortcuts(args.store, [f["file"] for f in fits.values()], max_rows=args.max_rows)
    print(f"evaluated in {time.perf_counter() - start:.0f}s")
    reference = f"N-NJTC r{args.rank} per layer"
    summary = summarise(result.records, fits, reference)
    n_rows = result.records[0]["n_rows"]
    (ROOT / "benchmarks/results/one_jump.md").write_text(table(summary, reference, pass_s, n_rows))
    plot(summary, ROOT / "docs/one-jump/precision_at_1.png")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    (ROOT / "benchmarks/results/one_jump.json").write_text(json.dumps(
        {"commit": commit, "store": str(args.store), "pass_s": pass_s, "n_rows": n_rows, "summary": summary,
         "select_table": {k: f["one_jump"] for k, f in fits.items() if f["one_jump"].get("mode") == "select"}},
        indent=1, default=str))
    ref = summary[reference]
    small = {k: s for k, s in summary.items() if "one jump" in k and ref["params"] / s["params"] >= 15}
    best = max(small, key=lambda k: small[k]["mean_precision@1"])
    s = small[best]
    print(f"{reference}: {ref['maps']} maps, {ref['params']:,} numbers, mean P@1 {ref['mean_precision@1']:.4f}")
    print(f"best one jump with >= 15x fewer numbers: {best}: {s['params']:,} numbers "
          f"({ref['params'] / s['params']:.1f}x fewer), mean P@1 {s['mean_precision@1']:.4f}; worst layer >= 1: "
          f"{s['worst_layer']} at {100 * s['min_ratio_from_layer_1']:.1f} % of the per-layer maps; "
          f"layers below 90 %: {sorted(s['short_layers']) or 'none'}")


def recheck(args, work: Path) -> None:
    """The reference and the best one jump of the saved run (``one_jump.json``) on more rows at some layers."""
    first, _, last = args.recheck.partition("-")
    layers = list(range(int(first), int(last or first) + 1))
    saved = json.loads((ROOT / "benchmarks/results/one_jump.json").read_text())
    reference = f"N-NJTC r{args.rank} per layer"
    summary = saved["summary"]
    small = [k for k, s in summary.items() if "one jump" in k and summary[reference]["params"] / s["params"] >= 15]
    best = max(small, key=lambda k: summary[k]["mean_precision@1"])
    files = {label: work / f"{label.replace(' ', '-')}.safetensors" for label in (reference, best)}
    result = evaluate_shortcuts(args.store, list(files.values()), layers=layers, max_rows=args.max_rows)
    p1 = {(r["method"], r["layer"]): r["precision@1"] for r in result.records}
    rows = {l: {label: p1[path.stem, l] for label, path in files.items()} for l in layers}
    for l, row in rows.items():
        print(f"layer {l}: {reference} {row[reference]:.4f}, {best} {row[best]:.4f} "
              f"({100 * row[best] / row[reference]:.1f} %)")
    (ROOT / "benchmarks/results/one_jump_recheck.json").write_text(json.dumps(
        {"store": str(args.store), "n_rows": result.records[0]["n_rows"], "precision@1": rows}, indent=1))


if __name__ == "__main__":
    main()
