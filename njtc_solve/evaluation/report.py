"""The report folder of an evaluation: JSON, CSV, Markdown and PNG figures, and the pairwise tables."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: a notebook's plotting backend stays as it is

from njtc_solve.core.outputs import FolderKind, atomic_folder, atomic_output

__all__ = ["PAIRWISE_KIND", "REPORT_FILES", "REPORT_KIND", "markdown_table", "summary_table", "write_csv",
           "write_pairwise_report", "write_report"]

# what write_report and write_pairwise_report put into --out; results.json or pairwise.json marks a report
REPORT_FILES = ("results.json", "results.csv", "report.md", "precision_at_1.png", "surprisal.png", "early_exit.png",
                "rank_sweep.png", "pairwise.json", "pairwise.md")
REPORT_KIND = FolderKind("a report", "results.json", lambda c: {"meta", "records", "early_exit"} <= set(c),
                         REPORT_FILES[:-2], shared=True, lists_files=False)
PAIRWISE_KIND = FolderKind("a pairwise report", "pairwise.json", lambda c: {"meta", "records"} <= set(c),
                           ("pairwise.json", "pairwise.md"), shared=True, lists_files=False)

_COLUMNS = ["method", "layer", "rank", "params", "reduction", "precision@1", "precision@5", "precision@10",
            "surprisal", "kl", "mse", "r2", "n_rows"]


def _fmt(value, column):
    if value is None or (isinstance(value, float) and math.isnan(value)):  # undefined (R² of constant rows)
        return "—"
    if column == "reduction":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.4g}" if column in ("mse",) else f"{value:.3f}"
    return str(value)


def markdown_table(records, columns=_COLUMNS) -> str:
    """All records as one Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c), c) for c in columns) + " |" for r in records]
    return "\n".join(lines)


def summary_table(result, metric="precision@1", layers=None) -> str:
    """Layers as rows, methods as columns, one metric in the cells (Markdown)."""
    methods = list(dict.fromkeys(r["method"] for r in result.records))
    cell = {(r["method"], r["layer"]): r[metric] for r in result.records}
    layers = layers or sorted({r["layer"] for r in result.records})
    lines = ["| layer | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for l in layers:
        lines.append(f"| {l} | " + " | ".join(_fmt(cell.get((m, l)), metric) for m in methods) + " |")
    return "\n".join(lines)


def _by_method(records):
    groups = defaultdict(list)
    for r in records:
        groups[r["method"]].append(r)
    return groups


def _line_plot(result, metric, ylabel, path, reference=None):
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for method, rows in _by_method(result.records).items():
        rows = sorted(rows, key=lambda r: r["layer"])
        style = "--" if method == "identity" else "-"
        ax.plot([r["layer"] for r in rows], [r[metric] for r in rows], style, marker=".", label=method)
    if reference is not None:
        ax.axhline(reference, color="black", lw=0.8, ls=":", label="full model")
    _finish(fig, ax, path, "source layer", ylabel,
            f"{ylabel} against source layer ({result.meta.get('validation_rows')} held-out tokens)", ncol=2)


def _rank_sweep(result, path) -> bool:
    """Mean Precision@1 over layers against parameters per layer, one line per family."""
    groups = _by_method(result.records)
    mean_p1 = {method: sum(r["precision@1"] for r in rows) / len(rows) for method, rows in groups.items()}
    families = defaultdict(list)
    for method, rows in groups.items():
        if rows[0]["rank"] is not None:
            family = "-".join(p for p in method.split("-") if not (p.startswith("r") and p[1:].isdigit()))
            families[family].append((rows[0]["params"], mean_p1[method], rows[0]["rank"]))
    if not any(len(points) > 1 for points in families.values()):
        return False
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for family, points in families.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
        for params, p1, rank in points:
            ax.annotate(f"r={rank}", (params, p1), fontsize=7, xytext=(3, -9), textcoords="offset points")
    for method, rows in groups.items():
        if method == "identity":
            ax.axhline(mean_p1[method], color="gray", ls="--", lw=1, label="identity (0 params)")
        elif rows[0]["rank"] is None:
            ax.scatter([rows[0]["params"]], [mean_p1[method]], marker="s", color="black", zorder=3, label=method)
    ax.set_xscale("log")
    _finish(fig, ax, path, "parameters per layer", "Precision@1 (mean over layers)", "Rank sweep", which="both")
    return True


def _early_exit_plot(result, path):
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for method, curve in result.early_exit.items():
        ax.plot([100 * s for s in curve["saved"]], curve["agreement"], marker=".", label=method)
    _finish(fig, ax, path, "layers saved (%)", "agreement with the full model's top-1",
            "Confidence-based early exit (threshold sweep)")


def _finish(fig, ax, path, xlabel, ylabel, title, *, which="major", ncol=1):
    """Label, grid and legend ``ax``, and write ``fig`` as a PNG at ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which=which)
    ax.legend(fontsize=7, ncol=ncol)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def write_csv(path, records: list[dict]) -> None:
    """Write ``records`` (dicts with the same keys) as a CSV table with a header row; lists and dicts as JSON.

    Examples
    --------
    >>> write_csv("t.csv", [{"method": "jtc", "layer": 3, "topk": ["a", "b"]}])
    >>> print(open("t.csv").read().strip())
    method,layer,topk
    jtc,3,"[""a"", ""b""]"
    """
    cell = lambda v: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, tuple, dict)) else v
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else [], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: cell(v) for k, v in r.items()} for r in records)


def _write_text(path, text):
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text)


def write_report(result, out) -> tuple[dict, str]:
    """Write ``results.json``, ``results.csv``, ``report.md`` and PNG plots into folder ``out``, all or none.

    Returns
    -------
    paths : dict
        Name to path of each file written.
    summary : str
        The Markdown summary (Precision@1 by layer and method, early exit), also in report.md.
    """
    out = Path(out).resolve()
    with atomic_folder(out, REPORT_KIND, parents=True) as tmp:
        paths, summary = _write_files(result, tmp)
    return {key: out / path.name for key, path in paths.items()}, summary


def _write_files(result, out: Path) -> tuple[dict, str]:
    """The report's files, written into the (temporary) folder ``out``."""
    paths = {k: out / v for k, v in [("json", "results.json"), ("csv", "results.csv"), ("markdown", "report.md"),
                                      ("precision_plot", "precision_at_1.png"), ("surprisal_plot", "surprisal.png"),
                                      ("early_exit_plot", "early_exit.png")]}
    _write_text(paths["json"], json.dumps({"meta": result.meta, "records": result.records,
                                           "early_exit": result.early_exit}, indent=1))
    with atomic_output(paths["csv"]) as tmp:
        write_csv(tmp, result.records)
    _line_plot(result, "precision@1", "Precision@1", paths["precision_plot"])
    _line_plot(result, "surprisal", "surprisal (nats)", paths["surprisal_plot"], result.meta.get("model_surprisal"))
    _early_exit_plot(result, paths["early_exit_plot"])
    if _rank_sweep(result, out / "rank_sweep.png"):
        paths["rank_sweep_plot"] = out / "rank_sweep.png"
    meta = result.meta
    exit_rows = ["| method | layers saved at ≥95% agreement | at ≥99% |", "|---|---|---|"]
    exit_rows += [f"| {m} | {100 * c['saved_at_95']:.1f}% | {100 * c['saved_at_99']:.1f}% |"
                  for m, c in result.early_exit.items()]
    summary = "\n\n".join([
        f"Precision@1 against the model's own top-1 ({meta['validation_rows']} held-out tokens, "
        f"model {meta.get('model')}):", summary_table(result),
        "Surprisal (nats" + (f"; the full model's own: {meta['model_surprisal']:.3f}" if "model_surprisal" in meta
                             else "") + "):",
        summary_table(result, "surprisal"), "Early exit:", "\n".join(exit_rows)])
    images = "\n".join(f"![{p.stem}]({p.name})" for k, p in paths.items() if k.endswith("plot"))
    _write_text(paths["markdown"], f"# Shortcut evaluation\n\n{summary}\n\n{images}\n\n## All figures\n\n"
                f"{markdown_table(result.records)}\n")
    return paths, summary


def write_pairwise_report(result, out) -> tuple[dict, str]:
    """Write ``pairwise.json`` and ``pairwise.md`` (one table row per pair) of a
    :class:`~njtc_solve.evaluation.layer_pairs.PairwiseResult` into folder ``out``.

    Returns ``(paths, summary)``: the files written and the table as text.
    """
    out = Path(out)
    skip = any("skip_kl" in r for r in result.records)
    head = "| method | source | target | rel. error | R² | identity R² |" + (
        " skip KL | skip top-1 | drop KL | drop top-1 |" if skip else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(result.records, key=lambda r: (r["method"], r["target"], r["source"])):
        row = (f"| {r['method']} | {r['source']} | {r['target']} | {r['rel_err']:.4f} | {r['r2']:.4f} | "
               f"{r['identity_r2']:.4f} |")
        if skip:
            row += f" {r['skip_kl']:.4f} | {r['skip_top1']:.3f} | {r['drop_kl']:.4f} | {r['drop_top1']:.3f} |"
        lines.append(row)
    summary = "\n".join(lines)
    with atomic_folder(out, PAIRWISE_KIND, parents=True) as tmp:
        (tmp / "pairwise.json").write_text(json.dumps({"meta": result.meta, "records": result.records}, indent=1))
        (tmp / "pairwise.md").write_text(f"# Pairwise maps (held-out rows: {result.meta.get('validation_rows')})\n\n"
                                         + summary + "\n")
    return {"json": out / "pairwise.json", "md": out / "pairwise.md"}, summary
