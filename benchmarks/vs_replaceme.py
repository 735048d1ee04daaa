"""Block replacement side by side: ReplaceMe's solver, ours, plain dropping and the full model.

For each K (blocks removed) on the default SmolLM2-135M (30 blocks), on held-out documents of
``pydoc_data.topics``:

- **full**: the model itself;
- **drop**: the K blocks removed with no replacement, at the start with the lowest KL on the
  scoring documents (the best a drop can do);
- **ReplaceMe**: its solver as published (arXiv 2505.02819, ``lstsq.py``): raw Gram matrices
  ``Σ mᵀm`` and ``Σ mᵀ(h_{S+K} − h_S + m)`` over every token row in float64, ``T =
  torch.linalg.inv(Σ mᵀm) Σ mᵀ(…)``, no centring, no intercept, folded into block S−1's
  ``down_proj``; its start chosen by the angular distance ``acos(cos(h_S, h_{S+K}))/π`` at
  the last token of each sequence, as its code does. There is no padding here (every
  sequence is full), so the comparison is about the solver and the choice of start;
- **ours**: what ``python -m njtc_solve.prune --auto`` writes (every start; plain dropping,
  least squares plain and weighted by 1/mean(h_S²), each without an intercept and with
  Llama's ``mlp_bias``; the lowest KL on the scoring documents wins).

Selection (ours, drop) uses the first validation sequences (``--score-tokens``); every figure
reported is measured on the next ones (``--eval-tokens``), which no choice has seen. One
forward pass over the training sequences gives the statistics of every start and K.
ReplaceMe's raw Grams are formed from the same float64 statistics (``C + n x̄x̄ᵀ``; its own
code accumulates them with float64 GEMMs: the two differ by float32 rounding, ~1e-7).

    python benchmarks/vs_replaceme.py            # every start; over an hour on a loaded 2-core CPU
    python benchmarks/vs_replaceme.py --train-tokens 4096 --score-tokens 128 --eval-tokens 512 \
        --gen-tokens 8 --gen-repeats 1 --start-stride 4 --forward-tokens 1024   # the README's run: 19 min

Writes ``benchmarks/results/vs_replaceme.json`` and ``docs/prune/vs_replaceme.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from njtc_solve.data.corpus import load_corpus
from njtc_solve.core.models import load_model
from njtc_solve.data.plan import plan_extraction
from njtc_solve.prune.replacement_statistics import replacement_statistics
from njtc_solve.prune.scoring import collect_reference, replaced_stream, score_replacement, tail_logits
from njtc_solve.prune.selection import choose_replacement
from njtc_solve.prune.replacement import Replacement, apply_replacement
from njtc_solve.data.rows import TRAIN, VALIDATION

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURE = ROOT / "docs" / "prune" / "vs_replaceme.png"
METHODS = ("drop", "ReplaceMe", "ours")


def replaceme_map(stats, start: int, k: int) -> Replacement:
    """ReplaceMe's T: inv(Σ mᵀm) Σ mᵀ(h_{S+K} − h_S + m) from raw (uncentred) float64 Grams."""
    gxx, gxt = stats.raw(start, k, "plain")
    T = torch.linalg.inv(gxx) @ (gxt + gxx)
    return Replacement(start, k, T, None, "replaceme", "plain", 0.0, "none")


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def generation_speed(model, ids, new_tokens: int, repeats: int = 2) -> float:
    """Greedy tokens per second with the KV cache (best of ``repeats``)."""
    best = 0.0
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=0)
            best = max(best, (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="2,4,6,8")
    p.add_argument("--train-tokens", type=int, default=8192)
    p.add_argument("--score-tokens", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--gen-repeats", type=int, default=2)
    p.add_argument("--start-stride", type=int, default=1,
                   help="score every n-th start only (1: every start, as prune --auto does)")
    p.add_argument("--intercepts", default="none,mlp_bias", help="intercept candidates of ours")
    p.add_argument("--forward-tokens", type=int, default=None,
                   help="tokens of the bare forward pass that is timed (default: the training tokens)")
    p.add_argument("--out", default=str(RESULTS / "vs_replaceme.json"))
    args = p.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    torch.manual_seed(0)
    t_load = time.perf_counter()
    model, tok, name = load_model(None, progress=False)
    load_s = time.perf_counter() - t_load
    _, docs = load_corpus()
    n_blocks = model.config.num_hidden_layers
    n_val = -(-(args.score_tokens + args.eval_tokens) // args.seq_len)
    budget = args.train_tokens + n_val * args.seq_len
    plan = plan_extraction(tok, docs, seq_len=args.seq_len, max_tokens=budget, val_fraction=n_val * args.seq_len / budget)
    train, val = np.flatnonzero(plan.split == TRAIN), np.flatnonzero(plan.split == VALIDATION)
    n_score = -(-args.score_tokens // args.seq_len)
    train_plan = plan.sequences(slice(int(train[0]), int(train[-1]) + 1))
    score_plan = plan.sequences(slice(int(val[0]), int(val[0]) + n_score))
    eval_plan = plan.sequences(slice(int(val[0]) + n_score, int(val[-1]) + 1))
    print(f"train {train_plan.n_rows} tokens, score {score_plan.n_rows}, eval {eval_plan.n_rows}; "
          f"{len(plan.validation_documents)} held-out documents")

    # the bare forward pass over the training sequences, then the pass with every statistic
    t = time.perf_counter()
    n_fwd = len(train_plan.token_ids) if args.forward_tokens is None else -(-args.forward_tokens // args.seq_len)
    with torch.no_grad():
        for b in range(0, n_fwd, 8):
            model(input_ids=torch.as_tensor(train_plan.token_ids[b:min(b + 8, n_fwd)]))
    forward_s = (time.perf_counter() - t) * len(train_plan.token_ids) / n_fwd  # scaled to the training tokens
    pairs = {s: [k for k in ks if s + k <= n_blocks] for s in range(1, n_blocks)}
    pairs = {s: v for s, v in pairs.items() if v}
    t = time.perf_counter()
    stats = replacement_statistics(model, train_plan, pairs)
    stats_pass_s = time.perf_counter() - t
    t = time.perf_counter()
    score_set = collect_reference(model, score_plan)
    eval_set = collect_reference(model, eval_plan)
    cache_s = time.perf_counter() - t
    print(f"forward {forward_s:.1f}s, statistics pass {stats_pass_s:.1f}s, held-out cache {cache_s:.1f}s")

    full = eval_set.full_metrics()
    full_params = n_params(model)
    prompt = torch.as_tensor(eval_plan.token_ids[:1, :16])
    speed_full = [generation_speed(model, prompt, args.gen_tokens, args.gen_repeats)]
    rows, choices = [], {}
    for k in ks:
        starts = sorted(s for s, v in pairs.items() if k in v)
        cos_start = min(starts, key=lambda s: stats.cosine[(s, k)]["angular_last"])
        scored = sorted(set(starts[::args.start_stride]) | {cos_start})
        t = time.perf_counter()
        ours, candidates, _ = choose_replacement(model, stats, score_set, remove=k, starts=scored,
                                              intercepts=tuple(args.intercepts.split(",")))
        choose_s = time.perf_counter() - t
        drops = [c for c in candidates if c["name"] == "drop"]
        drop_start = min(drops, key=lambda c: c["kl"])["start"]
        maps = {"drop": Replacement.drop(drop_start, k, stats.moments[(drop_start, k, "plain")]["cxx"].shape[0]),
                "ReplaceMe": replaceme_map(stats, cos_start, k), "ours": ours}
        choices[k] = {"ours": ours.describe(), "replaceme_start": cos_start, "drop_start": drop_start,
                      "scored_starts": scored,
                      "choose_s": choose_s, "candidates": candidates,
                      "cosine": {s: stats.cosine[(s, k)] for s in starts}}
        for method, rep in maps.items():
            score = score_replacement(model, eval_set, rep)
            pruned = copy.deepcopy(model)
            apply_replacement(pruned, rep)
            speed = generation_speed(pruned, prompt, args.gen_tokens, args.gen_repeats)
            rows.append({"k": k, "method": method, "start": rep.start, "map": rep.name, **score,
                         "params": n_params(pruned), "gen_tok_s": speed})
            if method == "ours":  # the folded model itself against the cached tail evaluation
                ids = torch.as_tensor(eval_plan.token_ids[:1])
                with torch.no_grad():
                    folded = pruned(input_ids=ids).logits
                tail = tail_logits(model, ids, replaced_stream(eval_set, rep, slice(0, 1)), first_block=rep.start + k)
                choices[k]["folded_vs_tail_max_abs"] = float((folded - tail).abs().max())
            del pruned
            print(f"K={k} {method:>9} start {rep.start:>2} {rep.name:<18} ppl {score['ppl']:8.2f} "
                  f"KL {score['kl']:.4f} top-1 {score['top1']:.3f} {speed:.1f} tok/s", flush=True)
    speed_full.append(generation_speed(model, prompt, args.gen_tokens, args.gen_repeats))
    full_speed = float(np.mean(speed_full))
    for r in rows:
        r["gen_speedup"] = r["gen_tok_s"] / full_speed
        r["params_fraction"] = r["params"] / full_params
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"model": name, "n_blocks": n_blocks, "commit": commit, "corpus": "pydoc_data.topics",
              "budgets": {"train_tokens": train_plan.n_rows, "score_tokens": score_plan.n_rows,
                          "eval_tokens": eval_plan.n_rows, "seq_len": args.seq_len, "gen_tokens": args.gen_tokens,
                          "gen_repeats": args.gen_repeats, "start_stride": args.start_stride,
                          "intercepts": args.intercepts, "bare_forward_tokens_timed": n_fwd * args.seq_len},
              "full": {**full, "params": full_params, "gen_tok_s": speed_full},
              "timings_s": {"load_model": load_s, "bare_forward_train": forward_s, "statistics_pass": stats_pass_s,
                            "held_out_cache": cache_s},
              "rows": rows, "choices": {str(k): v for k, v in choices.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    figure(result)
    print(table(result))
    print(f"wrote {out} and {FIGURE}")


def table(result) -> str:
    lines = ["| K | method | start | map | perplexity | KL to full | top-1 agreement | parameters | generation speed |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = result["full"]
    lines.append(f"| 0 | full | | | {f['ppl']:.2f} | 0 | 1 | {f['params'] / 1e6:.1f}M | 1.00× |")
    for r in result["rows"]:
        lines.append(f"| {r['k']} | {r['method']} | {r['start']} | {r['map']} | {r['ppl']:.2f} | {r['kl']:.3f} | "
                     f"{r['top1']:.3f} | {r['params'] / 1e6:.1f}M | {r['gen_speedup']:.2f}× |")
    return "\n".join(lines)


def figure(result) -> None:
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "ppl", "held-out perplexity"), (axes[1], "kl", "KL to the full model (nats)")):
        for method in METHODS:
            pts = [(r["k"], r[metric]) for r in result["rows"] if r["method"] == method]
            ax.plot(*zip(*pts), marker="o", label=method)
        if metric == "ppl":
            ax.axhline(result["full"]["ppl"], color="gray", ls="--", label="full model")
            ax.set_yscale("log")
        ax.set_xlabel("blocks removed (of 30)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"SmolLM2-135M, pydoc held-out documents ({result['budgets']['eval_tokens']} tokens)")
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=120)


if __name__ == "__main__":  # a missing default model or bad input: one line, exit 2
    from njtc_solve.cli import run_cli

    raise SystemExit(run_cli(lambda argv: main()))
