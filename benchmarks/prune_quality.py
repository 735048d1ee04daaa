"""Pruning quality side by side: full, drop, ReplaceMe, a LinearPatch-style patch, ours closed form, ours + KL.

For each K (blocks removed) on the default SmolLM2-135M (30 blocks), on held-out documents of
``pydoc_data.topics``:

- **full**: the model itself;
- **drop**: the K blocks removed with no replacement, at the start with the lowest KL on the
  scoring tokens;
- **ReplaceMe** (arXiv 2505.02819): its solver (raw float64 Grams, ``T = inv(Σ mᵀm) Σ mᵀ(h_{S+K} −
  h_S + m)``, no intercept, folded into block S−1's ``down_proj``) at its start rule (the
  smallest angular distance ``acos(cos(h_S, h_{S+K}))/π`` at the last token of each sequence);
- **LinearPatch** (arXiv 2505.24680, closed form, no distillation): the stream entering block
  S+K is ``h_S·P`` with ``P = H·diag(s)·Hᵀ``, ``H`` a normalised Hadamard matrix
  (576 = 36·16: Paley II of order 36 ⊗ Sylvester of order 16) and ``s_j`` the ratio of the
  mean absolute rotated activations after and before the removed blocks,
  ``E|h_{S+K}H|_j / E|h_S H|_j`` over the training tokens, at the same start rule. The patch
  is an extra d×d matrix at the interface (not foldable into a standard checkpoint's
  weights: its parameters are counted and its generation speed measured with the matmul in);
- **ours**: what ``prune --auto`` chooses (plain dropping, least squares plain and weighted
  by 1/mean(h_S²), with and without Llama's ``mlp_bias`` intercept; the lowest KL on the
  scoring tokens wins);
- **ours + KL**: ours refined by ``refine_fold`` (Adam on T and c, KL to the full model on
  training sequences through the frozen rest, early stopping on the scoring tokens, never
  worse than its start there).

Every figure is measured on the evaluation tokens, which no choice and no early stop has
seen; ``± se`` is the standard error clustered by document (windows of one document are not
independent). The scoring, evaluation and refinement sequences are disjoint seeded samples
spread across documents (``ExtractionPlan.spread_order``), as ``prune`` takes them. Generation speed: greedy with
the KV cache, every model of a K and the full model interleaved, best of ``--gen-repeats``.
Ranking criteria (cosine distance, angular distance, the map's residual, scoring KL) are
compared with each scored start's evaluation KL by Spearman's rank correlation.

    python benchmarks/prune_quality.py --ks 4,8 --seq-len 64 --start-stride 4   # the docs' run (see
                                                # docs/pruning-refine.md for its budgets)
    python benchmarks/prune_quality.py --table benchmarks/results/prune_quality.json   # its table again

Writes ``benchmarks/results/prune_quality.json`` and ``benchmarks/results/prune_quality.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_replaceme import n_params, replaceme_map

from njtc_solve.core.architectures import resolve_parts
from njtc_solve.core.models import load_model
from njtc_solve.data.corpus import load_corpus
from njtc_solve.data.plan import plan_extraction
from njtc_solve.data.rows import TRAIN, VALIDATION
from njtc_solve.prune.replacement import Replacement, apply_replacement
from njtc_solve.prune.refine_fold import RefineFoldSpec, refine_fold
from njtc_solve.prune.replacement_statistics import replacement_statistics
from njtc_solve.prune.scoring import ReferenceSample, collect_reference, score_replacement
from njtc_solve.prune.selection import choose_replacement, spearman

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("drop", "ReplaceMe", "LinearPatch", "ours", "ours+KL")


def paley2_hadamard(q: int) -> np.ndarray:
    """A Hadamard matrix of order 2(q+1) for a prime q ≡ 1 (mod 4) (Paley's second construction)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.vectorize(lambda a: 0 if a % q == 0 else (1 if a % q in squares else -1))
    idx = np.arange(q)
    c = np.zeros((q + 1, q + 1), dtype=int)
    c[0, 1:] = c[1:, 0] = 1
    c[1:, 1:] = chi(idx[None, :] - idx[:, None])
    zero, one = np.array([[1, -1], [-1, -1]]), np.array([[1, 1], [1, -1]])
    return np.block([[zero if v == 0 else v * one for v in row] for row in c])


def hadamard(d: int) -> torch.Tensor:
    """A normalised (orthogonal) Hadamard matrix of order ``d`` = 2^k or 36·2^k, float64."""
    base = np.ones((1, 1), dtype=int)
    rest = d
    if d % 36 == 0 and (d // 36) & (d // 36 - 1) == 0:
        base, rest = paley2_hadamard(17), d // 36
    if rest & (rest - 1):
        raise ValueError(f"no Hadamard construction here for d = {d}")
    h = base
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    h = torch.tensor(h, dtype=torch.float64) / math.sqrt(d)
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    return h


class RotatedAbs:
    """Per layer, Σ |h_l H| over every training row (the LinearPatch scales' statistics)."""

    def __init__(self, H: torch.Tensor):
        self.H, self.sums, self.n = H.float(), None, 0

    def __call__(self, hidden, mlp):
        rows = [h.reshape(-1, h.shape[-1]).float() for h in hidden]
        if self.sums is None:
            self.sums = [torch.zeros(h.shape[-1], dtype=torch.float64) for h in rows]
        for i, h in enumerate(rows):
            self.sums[i] += (h @ self.H).abs().double().sum(0)
        self.n += rows[0].shape[0]

    def patch(self, start: int, k: int) -> torch.Tensor:
        """``P = H diag(E|h_{S+K}H| / E|h_S H|) Hᵀ`` (float64)."""
        s = self.sums[start + k] / self.sums[start].clamp_min(1e-30)
        H = self.H.double()
        return H @ torch.diag(s) @ H.T


def patched(held: ReferenceSample, start: int, P: torch.Tensor) -> ReferenceSample:
    """The cached sequences with ``h_S`` replaced by ``h_S·P`` (scored as a drop of the blocks after)."""
    hidden = list(held.hidden)
    hidden[start] = (held.hidden[start].double() @ P).float()
    return ReferenceSample(held.token_ids, hidden, held.mlp, held.logp, held.document)


def with_patch(model, start: int, P: torch.Tensor) -> None:
    """Insert ``h ↦ h·P`` before the block that follows the removed ones (already removed), in place."""
    _, blocks, final_norm, _ = resolve_parts(model)
    entry = blocks[start] if start < len(blocks) else final_norm
    P32 = P.float()

    def hook(module, args, kwargs):
        if args:
            return (args[0] @ P32.to(args[0].dtype),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] @ P32}

    entry.register_forward_pre_hook(hook, with_kwargs=True)
    model._njtc_patch_params = P.numel()


def speeds(models: dict, prompt, new_tokens: int, repeats: int) -> dict:
    """Greedy tokens/s with the KV cache, the models interleaved, best of ``repeats`` each."""
    best = dict.fromkeys(models, 0.0)
    with torch.no_grad():
        for _ in range(repeats):
            for name, model in models.items():
                t = time.perf_counter()
                out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     use_cache=True, pad_token_id=0)
                best[name] = max(best[name], (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t))
    return best


def brief(score: dict) -> dict:
    return {k: score[k] for k in ("kl", "kl_se", "top1", "ppl", "nll")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="2,4,6,8")
    p.add_argument("--train-tokens", type=int, default=8192)
    p.add_argument("--score-tokens", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--start-stride", type=int, default=3, help="score every n-th start (and the cosine rule's)")
    command = RefineFoldSpec()  # the prune command's refinement by default
    p.add_argument("--refine-steps", type=int, default=command.steps)
    p.add_argument("--refine-lr", type=float, default=command.lr)
    p.add_argument("--refine-tokens", type=int, default=command.train_tokens)
    p.add_argument("--refine-batch", type=int, default=command.batch_sequences)
    p.add_argument("--check-every", type=int, default=command.check_every)
    p.add_argument("--patience", type=int, default=command.patience)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--model", default=None, help="the model (default: SmolLM2-135M)")
    p.add_argument("--out", default=str(RESULTS / "prune_quality.json"))
    p.add_argument("--table", metavar="JSON", help="only print the markdown table of an earlier run's JSON")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    ks = [int(k) for k in args.ks.split(",")]
    torch.manual_seed(0)
    t_all = time.perf_counter()
    model, tok, name = load_model(args.model, progress=False)
    _, docs = load_corpus()
    n_blocks = model.config.num_hidden_layers
    d = model.config.hidden_size
    n_val = -(-(args.score_tokens + args.eval_tokens) // args.seq_len)
    budget = args.train_tokens + n_val * args.seq_len
    plan = plan_extraction(tok, docs, seq_len=args.seq_len, max_tokens=budget,
                           val_fraction=n_val * args.seq_len / budget)
    train, val = np.flatnonzero(plan.split == TRAIN), plan.spread_order(VALIDATION, 0)
    n_score = -(-args.score_tokens // args.seq_len)
    train_plan = plan.sequences(slice(int(train[0]), int(train[-1]) + 1))
    score_plan = plan.sequences(np.sort(val[:n_score]))  # spread across documents, as prune takes them
    eval_plan = plan.sequences(np.sort(val[n_score:]))
    print(f"train {train_plan.n_rows} tokens, score {score_plan.n_rows}, eval {eval_plan.n_rows}", flush=True)

    H = hadamard(d)
    rot = RotatedAbs(H)
    pairs = {s: [k for k in ks if s + k <= n_blocks] for s in range(1, n_blocks)}
    pairs = {s: v for s, v in pairs.items() if v}
    t = time.perf_counter()
    stats = replacement_statistics(model, train_plan, pairs, extra=rot)
    stats_s = time.perf_counter() - t
    t = time.perf_counter()
    score_set = collect_reference(model, score_plan)
    eval_set = collect_reference(model, eval_plan)
    cache_s = time.perf_counter() - t
    print(f"statistics pass {stats_s:.0f}s, held-out caches {cache_s:.0f}s", flush=True)
    full = {**eval_set.full_metrics(), "kl_se": 0.0, "params": n_params(model)}
    prompt = torch.as_tensor(eval_plan.token_ids[:1, :16])
    refine_spec = RefineFoldSpec.check(lr=args.refine_lr, steps=args.refine_steps, check_every=args.check_every,
                                   patience=args.patience, train_tokens=args.refine_tokens,
                                   batch_sequences=args.refine_batch)
    refine_sample = np.sort(plan.spread_order(TRAIN, 0)[:-(-args.refine_tokens // args.seq_len)])
    n_refine = len(refine_sample)
    rows, choices, speed_rows = [], {}, []
    for k in ks:
        t_k = time.perf_counter()
        starts = sorted(s for s, v in pairs.items() if k in v)
        cos_start = min(starts, key=lambda s: stats.cosine[(s, k)]["angular_last"])
        scored = sorted(set(starts[::args.start_stride]) | {cos_start})
        ours, candidates, maps = choose_replacement(model, stats, score_set, remove=k, starts=scored,
                                                    intercepts=("none", "mlp_bias"))
        drops = [c for c in candidates if c["name"] == "drop"]
        drop_start = min(drops, key=lambda c: c["kl"])["start"]
        # ranking criteria against each scored start's evaluation KL (its best candidate on the scoring tokens)
        per_start = {}
        for s in scored:
            i = min((i for i, c in enumerate(candidates) if c["start"] == s), key=lambda i: candidates[i]["kl"])
            fitted = [c for c in candidates if c["start"] == s and c["name"] != "drop" and c["weighting"] == "rms"]
            per_start[s] = {"score_kl": candidates[i]["kl"], "score_kl_se": candidates[i]["kl_se"],
                            "eval_kl": score_replacement(model, eval_set, maps[i])["kl"],
                            "angular_last": stats.cosine[(s, k)]["angular_last"],
                            "cosine_distance": 1 - stats.cosine[(s, k)]["all"],
                            "residual": min(c["train_loss"] for c in fitted) / stats.n_rows,
                            "method": candidates[i]["name"]}
        eval_kls = [per_start[s]["eval_kl"] for s in scored]
        rho = {c: spearman([per_start[s][c] for s in scored], eval_kls)
               for c in ("score_kl", "angular_last", "cosine_distance", "residual")}
        t = time.perf_counter()
        cache = collect_reference(model, plan.sequences(refine_sample), starts=[ours.start],
                                  logp_dtype=torch.float16)
        refined = refine_fold(model, ours, cache, score_set, refine_spec, progress=False)
        del cache
        refine_s = time.perf_counter() - t
        P = rot.patch(cos_start, k)
        methods = {"drop": Replacement.drop(drop_start, k, d), "ReplaceMe": replaceme_map(stats, cos_start, k),
                   "LinearPatch": Replacement.drop(cos_start, k, d), "ours": ours, "ours+KL": refined.replacement}
        pruned_models = {"full": model}
        for method, rep in methods.items():
            held = patched(eval_set, cos_start, P) if method == "LinearPatch" else eval_set
            score = score_replacement(model, held, rep)
            pruned = copy.deepcopy(model)
            apply_replacement(pruned, rep)
            if method == "LinearPatch":
                with_patch(pruned, rep.start, P)
            pruned_models[method] = pruned
            label = "H·diag(s)·Hᵀ on h_S" if method == "LinearPatch" else rep.name
            rows.append({"k": k, "method": method, "start": rep.start, "map": label, **brief(score),
                         "params": n_params(pruned) + getattr(pruned, "_njtc_patch_params", 0)})
            print(f"K={k} {method:>11} start {rep.start:>2} {label:<22} ppl {score['ppl']:8.2f} "
                  f"KL {score['kl']:.4f} ± {score['kl_se']:.4f} top-1 {score['top1']:.3f}", flush=True)
        gen = speeds(pruned_models, prompt, args.gen_tokens, args.gen_repeats)
        for r in rows:
            if r["k"] == k:
                r["gen_tok_s"] = gen[r["method"]]
                r["gen_speedup"] = gen[r["method"]] / gen["full"]
        speed_rows.append({"k": k, "full_tok_s": gen["full"]})
        del pruned_models
        choices[str(k)] = {"ours": ours.describe(), "replaceme_start": cos_start, "drop_start": drop_start,
                           "scored_starts": scored, "per_start": {str(s): v for s, v in per_start.items()},
                           "spearman_with_eval_kl": rho,
                           "refine": {**refined.describe(), "seconds_total": refine_s,
                                      "train_tokens": n_refine * args.seq_len},
                           "seconds": time.perf_counter() - t_k}
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps({"rows": rows, "choices": choices},
                                                                          indent=1, default=float))
        print(f"K={k}: refinement {refined.steps} steps, {refined.seconds:.0f}s training + "
              f"{refined.check_seconds:.0f}s checks, scoring KL {refined.start['kl']:.4f} -> {refined.best['kl']:.4f} "
              f"({'kept' if refined.improved else 'not better: closed form kept'}); Spearman with eval KL "
              + ", ".join(f"{c} {v:.2f}" for c, v in rho.items()), flush=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "njtc_solve", "benchmarks"],
                                capture_output=True, text=True).stdout.strip())
    result = {"model": name, "n_blocks": n_blocks, "commit": commit, "tree_dirty": dirty,
              "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "load_average_at_end": os.getloadavg()},
              "corpus": "pydoc_data.topics",
              "budgets": {"train_tokens": train_plan.n_rows, "score_tokens": score_plan.n_rows,
                          "eval_tokens": eval_plan.n_rows, "eval_sequences": len(eval_plan.token_ids),
                          "eval_documents": len(eval_set.clusters()[1]), "ks": ks,
                          "seq_len": args.seq_len, "start_stride": args.start_stride,
                          "refine": {**refine_spec.describe(), "train_tokens_used": n_refine * args.seq_len},
                          "gen_tokens": args.gen_tokens, "gen_repeats": args.gen_repeats},
              "full": full, "speeds": speed_rows, "rows": rows, "choices": choices,
              "timings_s": {"statistics_pass": stats_s, "held_out_caches": cache_s,
                            "total": time.perf_counter() - t_all}}
    result["goal"] = goal(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    md = out.with_suffix(".md")
    md.write_text(table(result) + "\n")
    print(table(result))
    print(f"wrote {out} and {md}")


def goal(result) -> dict:
    """Whether ours + KL is below every other row's perplexity and KL at every K, and K=8 within 1.5x of full."""
    per_k = {}
    for k in sorted({r["k"] for r in result["rows"]}):
        at = {r["method"]: r for r in result["rows"] if r["k"] == k}
        mine = at["ours+KL"]
        others = [r for m, r in at.items() if m != "ours+KL"]
        per_k[str(k)] = {"best_ppl": all(mine["ppl"] < r["ppl"] for r in others),
                         "best_kl": all(mine["kl"] < r["kl"] for r in others),
                         "ppl_over_full": mine["ppl"] / result["full"]["ppl"]}
    k8 = per_k.get("8")
    return {"per_k": per_k, "beats_every_row_at_every_k": all(v["best_ppl"] and v["best_kl"] for v in per_k.values()),
            "k8_within_1.5x_full_ppl": None if k8 is None else k8["ppl_over_full"] <= 1.5}


def table(result) -> str:
    """The markdown table of a result (the docs' table is this, from the JSON)."""
    b = result["budgets"]
    lines = [f"SmolLM2-135M ({result['n_blocks']} blocks), `pydoc_data.topics`: {b['train_tokens']} training tokens, "
             f"{b['score_tokens']} scoring tokens (choice, early stopping), {b['eval_tokens']} evaluation tokens "
             + (f"({b['eval_sequences']} sequences of {b['eval_documents']} documents; ± is the standard "
                f"error of the KL clustered by document)" if "eval_documents" in b else
                f"({b['eval_sequences']} sequences; ± is the standard error of the KL over them, not clustered "
                "by document: a run before clustering)")
             + f", sequences of {b['seq_len']} tokens, every "
             f"{b['start_stride']}th start scored, refinement {b['refine']['steps']} steps at most (lr "
             f"{b['refine']['lr']:g}, {b['refine']['batch_sequences']} sequences a step, checks every "
             f"{b['refine']['check_every']}, patience {b['refine']['patience']}, "
             f"{b['refine']['train_tokens_used']} training tokens); commit "
             f"`{result['commit'][:10]}`{' (uncommitted changes)' if result.get('tree_dirty') else ''}, measured "
             f"{result['measured_at']}.", "",
             "| K | method | start | map | perplexity | KL to full ± se | top-1 agreement | parameters | generation |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = result["full"]
    lines.append(f"| 0 | full | | | {f['ppl']:.2f} | 0 | 1 | {f['params'] / 1e6:.1f}M | 1.00× |")
    for r in sorted(result["rows"], key=lambda r: r["k"]):
        lines.append(f"| {r['k']} | {r['method']} | {r['start']} | {r['map']} | {r['ppl']:.2f} | "
                     f"{r['kl']:.3f} ± {r['kl_se']:.3f} | {r['top1']:.3f} | {r['params'] / 1e6:.1f}M | "
                     f"{r.get('gen_speedup', float('nan')):.2f}× |")
    g = result["goal"]
    lines += ["", f"Goal \"ours + KL below every other row's perplexity and KL at every K\": "
              f"{'met' if g['beats_every_row_at_every_k'] else 'not met'}; "
              f"K = 8 within 1.5× of the full model's perplexity: "
              f"{'n/a' if g['k8_within_1.5x_full_ppl'] is None else ('met' if g['k8_within_1.5x_full_ppl'] else 'not met')}"
              + (f" ({g['per_k']['8']['ppl_over_full']:.2f}×)" if "8" in g["per_k"] else "") + "."]
    lines += ["", "| K | refinement steps | training s | evaluation KL before → after | scoring KL before → after "
              "(optimistic: these tokens chose the fold and stopped the training) | kept | Spearman with eval KL: "
              "scoring KL / angular / cosine / residual |", "|---|---|---|---|---|---|---|"]
    for k, c in sorted(result["choices"].items(), key=lambda item: int(item[0])):
        r, rho = c["refine"], c["spearman_with_eval_kl"]
        at = {row["method"]: row for row in result["rows"] if str(row["k"]) == str(k)}
        lines.append(f"| {k} | {r['steps']} | {r['train_seconds']:.0f} | {at['ours']['kl']:.4f} → "
                     f"{at['ours+KL']['kl']:.4f} | {r['held_out_start']['kl']:.4f} → "
                     f"{r['held_out_best']['kl']:.4f} | {'yes' if r['improved'] else 'no'} | "
                     f"{rho['score_kl']:.2f} / {rho['angular_last']:.2f} / {rho['cosine_distance']:.2f} / "
                     f"{rho['residual']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # a missing default model or bad input: one line, exit 2
    from njtc_solve.cli import run_cli

    raise SystemExit(run_cli(lambda argv: main()))
