"""Greedy generation speed of the pruned default model against the full one, side by side.

A pruned checkpoint is the same architecture with K fewer blocks, whatever map was folded into
the block before them, so its speed depends on K alone: this removes K blocks (K = 2, 4, 6, 8)
from a copy of SmolLM2-135M, then times greedy generation with the KV cache for the full model
and every pruned copy, interleaved over ``--repeats`` rounds so each sees the same machine, and
reports each one's best round and its ratio to the full model's.

    python benchmarks/prune_speed.py [--new-tokens 64] [--repeats 3] [--threads 2]

Writes ``benchmarks/results/prune_speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from njtc_solve.core.models import load_model
from njtc_solve.prune.replacement import remove_blocks
from provenance import measured_at

RESULTS = Path(__file__).resolve().parent / "results"


def tokens_per_second(model, ids, new_tokens: int) -> float:
    """One greedy generation of exactly ``new_tokens`` tokens with the KV cache."""
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="2,4,6,8")
    p.add_argument("--start", type=int, default=13, help="first removed block (default 13: the choice at K = 4-8)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, name = load_model(None, progress=False)
    model.eval()
    ids = tokenizer("def fibonacci(n):\n    ", return_tensors="pt")["input_ids"]
    models = {0: model}
    for k in (int(x) for x in args.ks.split(",")):
        pruned = copy.deepcopy(model)
        remove_blocks(pruned, args.start, k)
        models[k] = pruned
    tokens_per_second(model, ids, 4)  # warm-up
    rounds = {k: [] for k in models}
    for _ in range(args.repeats):
        for k, m in models.items():
            rounds[k].append(tokens_per_second(m, ids, args.new_tokens))
    full = max(rounds[0])
    rows = [{"removed": k, "blocks": m.config.num_hidden_layers, "tokens_per_s": max(rounds[k]),
             "ratio_to_full": max(rounds[k]) / full, "rounds": rounds[k]} for k, m in models.items()]
    for r in rows:
        print(f"K = {r['removed']}: {r['blocks']} blocks, {r['tokens_per_s']:.1f} tok/s ({r['ratio_to_full']:.2f}x)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune_speed.json").write_text(json.dumps(
        {"measured_at": measured_at(), "model": name, "start": args.start, "new_tokens": args.new_tokens,
         "repeats": args.repeats, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":  # a missing default model or bad input: one line, exit 2
    from njtc_solve.cli import run_cli

    raise SystemExit(run_cli(lambda argv: main()))
