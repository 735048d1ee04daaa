"""Fitting from the forward pass: its cost over the bare forward pass, end to end against
extract + fit, memory against token count, and a projection to Llama-2-7B at 1M tokens.

    python benchmarks/live_fit.py                       # the default model (SmolLM2-135M), CPU
    python benchmarks/live_fit.py --model M --device cuda --max-tokens 65536

1. *Overhead*: the same training batches run (a) as a bare forward pass, hooks off, and (b)
   as a live fit accumulating every layer's statistics (``fit_shortcuts(LiveSource …)``,
   solve excluded), interleaved ``--repeats`` times; tokens/s of each and the overhead.
2. *End to end*: raw text to every layer's shortcuts (``--method``), live against extract
   to a store then fit, on the same tokens: wall time and bytes written.
3. *Memory*: the live fit's peak resident memory at 1×, 2× and 4× ``--max-tokens``, each in
   a fresh process.
4. *Projection* for Llama-2-7B (d = 4096, 32 blocks) at 1M tokens from the rates measured
   here: store size, statistics memory, and the statistics' time at the measured GEMM rate.

Writes ``benchmarks/results/live_fit-{device}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from njtc_solve.data.corpus import load_corpus
from njtc_solve.data.extract import extract_activations
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.solve.statistics_pass import accumulate_statistics
from njtc_solve.core.models import load_model, model_sha256
from njtc_solve.data.live import LiveSource
from njtc_solve.data.store_writer import bytes_per_token
from provenance import measured_at

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def bare_forward(live: LiveSource) -> float:
    """Seconds of the model's forward pass alone over the live source's training batches."""
    plan = live.plan.sequences(slice(0, int((live.plan.split == 0).sum())))
    device = next(live.model.parameters()).device
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(plan.sequence), live.batch_size):
            live.model(input_ids=torch.as_tensor(plan.token_ids[b:b + live.batch_size], device=device))
    return time.perf_counter() - start


def live_statistics(live: LiveSource, device) -> float:
    """Seconds of the forward pass with every layer's statistics accumulated."""
    start = time.perf_counter()
    accumulate_statistics(live, live.source_layers, device=device, progress=False)
    return time.perf_counter() - start


def peak_rss_of_live_fit(model: str | None, max_tokens: int, device: str) -> dict:
    """Peak resident memory (MB) of a fresh process running a live fit on ``max_tokens`` tokens."""
    code = (
        "import json, resource, sys\n"
        "from njtc_solve.data.corpus import load_corpus\n"
        "from njtc_solve.solve.fit import fit_shortcuts\n"
        "from njtc_solve.core.models import load_model\n"
        "from njtc_solve.data.live import LiveSource\n"
        "name = sys.argv[1] or None\n"
        "model, tok, name = load_model(name, device=sys.argv[3], progress=False)\n"
        "loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "live = LiveSource(model, tok, load_corpus()[1], max_tokens=int(sys.argv[2]), model_name=name)\n"
        "fit_shortcuts(live, method='njtc', ranks=[32], device=sys.argv[3], progress=False)\n"
        "print(json.dumps({'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,"
        " 'peak_rss_after_loading_mb': loaded, 'train_tokens': live.count('train', 1)}))\n")
    done = subprocess.run([sys.executable, "-c", code, model or "", str(max_tokens), device],
                          capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return {"max_tokens": max_tokens, **json.loads(done.stdout.strip().splitlines()[-1])}


def gemm_rate(device, d: int) -> float:
    """Measured float32 GFLOP/s of the accumulation's GEMM shape (xᵀ[x | y], 1024 rows)."""
    torch.set_float32_matmul_precision("highest")
    a = torch.randn(1024, d, device=device)
    b = torch.randn(1024, 2 * d, device=device)
    a.T @ b
    start, n = time.perf_counter(), 3 if torch.device(device).type == "cpu" else 50
    for _ in range(n):
        a.T @ b
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return 2 * 1024 * d * 2 * d * n / (time.perf_counter() - start) / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: SmolLM2-135M")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--method", default="njtc", help="method of the end-to-end comparison (rank 32)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: overhead,e2e,memory")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    model, tokenizer, name = load_model(args.model, device=args.device, progress=False)
    _, documents = load_corpus()
    weights = model_sha256(model)
    live = LiveSource(model, tokenizer, documents, model_name=name, max_tokens=args.max_tokens, weights_sha=weights)
    d, n_layers = live.d_model, live.n_layers
    train_tokens = len(live.plan.sequence[live.plan.split == 0]) * live.plan.seq_len
    result = {"model": name, "device": args.device, "threads": torch.get_num_threads(), "d": d,
              "layers": n_layers, "max_tokens": args.max_tokens, "train_tokens": train_tokens}
    flops_stats = 2 * d * d * (2 * n_layers + 1)
    flops_forward = 2 * sum(p.numel() for p in model.parameters() if p.dim() == 2)
    result["statistics_flops_over_forward_flops"] = flops_stats / flops_forward

    if "overhead" not in skip:
        bare, fitted = [], []
        bare_forward(live)  # warm-up
        for _ in range(args.repeats):
            bare.append(bare_forward(live))
            fitted.append(live_statistics(live, args.device))
        result["overhead"] = {"bare_seconds": min(bare), "live_seconds": min(fitted),
                              "bare_tokens_per_s": train_tokens / min(bare),
                              "live_tokens_per_s": train_tokens / min(fitted),
                              "overhead": min(fitted) / min(bare) - 1}
        o = result["overhead"]
        print(f"bare forward {o['bare_tokens_per_s']:.0f} tok/s, live fit (statistics of {n_layers} layers) "
              f"{o['live_tokens_per_s']:.0f} tok/s: overhead {100 * o['overhead']:.1f}% "
              f"(statistics flops are {100 * result['statistics_flops_over_forward_flops']:.1f}% of the forward's)",
              flush=True)

    if "e2e" not in skip:
        with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
            start = time.perf_counter()
            fit_shortcuts(live, method=args.method, ranks=[32], device=args.device, progress=False)
            live_s = time.perf_counter() - start
            start = time.perf_counter()
            store = extract_activations(model, tokenizer, documents, Path(tmp) / "a.h5", model_name=name,
                                        max_tokens=args.max_tokens, weights_sha=weights, progress=False)
            extract_s = time.perf_counter() - start
            fit_shortcuts(store, method=args.method, ranks=[32], device=args.device, progress=False)
            stored_s = time.perf_counter() - start
            written = store.stat().st_size
        result["end_to_end"] = {"live_seconds": live_s, "extract_seconds": extract_s,
                                "extract_and_fit_seconds": stored_s, "store_bytes": written,
                                "live_bytes": 0, "speedup": stored_s / live_s}
        e = result["end_to_end"]
        print(f"end to end ({args.method} r32, all layers): live {live_s:.1f}s, writing nothing; extract + fit "
              f"{stored_s:.1f}s (extract {extract_s:.1f}s), writing {written / 1e9:.2f} GB: "
              f"{e['speedup']:.2f}x", flush=True)

    if "memory" not in skip:
        sweep = [peak_rss_of_live_fit(args.model, k * args.max_tokens, args.device) for k in (1, 2, 4)]
        result["memory"] = sweep
        print("live fit peak RSS: " + ", ".join(f"{m['train_tokens']} train tokens {m['peak_rss_mb']:.0f} MB "
                                                f"(loading the model alone: {m['peak_rss_after_loading_mb']:.0f} MB)"
                                                for m in sweep), flush=True)

    # Llama-2-7B at 1M tokens, from this machine's measured rates
    d7, blocks7, tokens = 4096, 32, 1_000_000
    rate = gemm_rate(args.device, d7)
    flops7 = 2 * d7 * d7 * (2 * blocks7 + 1) * tokens
    result["projection_llama2_7b_1m_tokens"] = {
        "store_bytes_float32": bytes_per_token(blocks7 + 1, d7, "float32") * tokens,
        "store_bytes_16bit": bytes_per_token(blocks7 + 1, d7, "bfloat16") * tokens,
        "statistics_bytes": (2 * blocks7 + 1) * d7 * d7 * 8,
        "statistics_gflop": flops7 / 1e9, "measured_gemm_gflops": rate,
        "statistics_seconds_at_measured_rate": flops7 / (rate * 1e9),
        "forward_gflop": 2 * 6.7e9 * tokens / 1e9,
    }
    q = result["projection_llama2_7b_1m_tokens"]
    print(f"Llama-2-7B, 1M tokens: store {q['store_bytes_float32'] / 1e9:.0f} GB float32 "
          f"({q['store_bytes_16bit'] / 1e9:.0f} GB in 16 bits) against statistics of "
          f"{q['statistics_bytes'] / 1e9:.1f} GB; {q['statistics_gflop'] / 1e6:.2f} PFLOP of statistics = "
          f"{q['statistics_seconds_at_measured_rate'] / 3600:.2f} h at the {q['measured_gemm_gflops']:.0f} GFLOP/s "
          f"measured here (the forward pass itself: {q['forward_gflop'] / 1e6:.1f} PFLOP)")
    out = Path(args.out or RESULTS / f"live_fit-{torch.device(args.device).type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"measured_at": measured_at(), **result}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":  # a missing default model or bad input: one line, exit 2
    from njtc_solve.cli import run_cli

    raise SystemExit(run_cli(lambda argv: main()))
