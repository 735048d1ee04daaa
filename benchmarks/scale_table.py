"""The scale table: per-token costs measured here, and the planner's projection of a full fit.

Measures on one device, side by side in one run: the statistics pass (every layer of
SmolLM2-135M's shape, d = 576, synthetic rows through ``MomentAccumulator``) and the bare
forward pass of a random-weight model of the same shape, each per token, against what the
planner (:func:`njtc_solve.solve.fit_plan.plan_fit`) predicts for them from its float32 GEMM
rate. Then the planner's projection of a live fit of every layer at 10M training tokens for
135M, 1B, 7B and 70B Llama shapes (configs only, no weights) under one memory budget.

    python benchmarks/scale_table.py                    # this machine's CPU, an 80 GB budget
    python benchmarks/scale_table.py --device cuda      # a GPU (its own row; none measured yet)

Writes ``benchmarks/results/scale_table-{device}.json``; prints a Markdown table, the headline last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from njtc_solve.solve.fit import FitSpec
from njtc_solve.solve.fit_plan import measured_rates
from njtc_solve.solve.stats import MomentAccumulator
from provenance import measured_at

RESULTS = Path(__file__).resolve().parent / "results"

# Llama-family shapes (from each model's config.json): name -> LlamaConfig keywords
SHAPES = {
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "TinyLlama-1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "Llama-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def statistics_seconds_per_token(device, d: int, layers: int, rows: int = 8192, chunk: int = 4096) -> float:
    """Seconds per row of a statistics pass over ``layers`` source layers of width ``d`` (rows in memory)."""
    xs = {l: torch.randn(chunk, d, device=device) for l in range(layers)}
    y = torch.randn(chunk, d, device=device)
    acc = MomentAccumulator(range(layers), "layer", device)
    acc.update(xs, y)  # warm-up, allocation
    sync(device)
    start = time.perf_counter()
    for _ in range(rows // chunk):
        acc.update(xs, y)
    sync(device)
    return (time.perf_counter() - start) / rows


def forward_seconds_per_token(device, config, batch: int = 4, seq_len: int = 128, repeats: int = 3) -> float:
    """Seconds per token of the bare forward pass of a random-weight model of ``config`` (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    with torch.no_grad():
        model(ids, output_hidden_states=True)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            model(ids, output_hidden_states=True)
        sync(device)
    return (time.perf_counter() - start) / (repeats * batch * seq_len)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=10_000_000, help="training tokens of the projected fit")
    p.add_argument("--max-memory", default="80GB", help="the statistics' memory budget of the projection")
    p.add_argument("--model-dtype", default="bfloat16", help="the weights' type in the projection")
    args = p.parse_args(argv)
    from transformers import LlamaConfig

    device = torch.device(args.device)
    torch.manual_seed(0)
    small = SHAPES["SmolLM2-135M"]
    stats_s = statistics_seconds_per_token(device, small["hidden_size"], small["num_hidden_layers"])
    forward_s = forward_seconds_per_token(device, LlamaConfig(**small))
    spec = FitSpec(max_memory=args.max_memory, device=args.device)
    rows, plans = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            folder = Path(tmp) / name
            LlamaConfig(**shape).save_pretrained(folder)  # config.json alone: the planner reads nothing else
            plan = spec.plan(model=str(folder), tokens=args.tokens, model_dtype=args.model_dtype)
            plans[name] = plan
            rows.append({"model": name, **{k: v for k, v in plan.as_dict().items() if k not in ("layers", "source")}})
    gemm, statistics_rate, _ = measured_rates(str(device), 1024, 512)
    smol = plans["SmolLM2-135M"]
    measured = {
        "gemm_gflops": gemm / 1e9,
        "statistics_gflops_planned": statistics_rate / 1e9,
        "statistics_us_per_token": stats_s * 1e6,
        "statistics_us_per_token_planned": smol.statistics_flops / smol.statistics_flops_per_s * 1e6,
        "forward_us_per_token": forward_s * 1e6,
        "forward_us_per_token_planned": 2.0 * smol.n_params / smol.gemm_flops_per_s * 1e6,
    }
    result = {"measured_at": measured_at(), "device": str(device), "tokens": args.tokens,
              "max_memory": args.max_memory, "model_dtype": args.model_dtype, "measured": measured, "plans": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"scale_table-{device.type}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"| per token on {device} (SmolLM2-135M shape, all 30 layers) | measured | planned from the GEMM rate |")
    print("|---|---|---|")
    print(f"| statistics pass | {measured['statistics_us_per_token']:.0f} µs | "
          f"{measured['statistics_us_per_token_planned']:.0f} µs |")
    print(f"| forward pass (float32) | {measured['forward_us_per_token']:.0f} µs | "
          f"{measured['forward_us_per_token_planned']:.0f} µs |")
    print()
    print(f"| model (config only) | d × layers | parameters | weights ({args.model_dtype}) | statistics, all layers "
          f"| passes under {args.max_memory} | peak per pass | statistics PFLOP | forward PFLOP "
          f"| projected time at {args.tokens / 1e6:g}M tokens on {device} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, plan in plans.items():
        print(f"| {name} | {plan.d_model} × {plan.n_layers} | {plan.n_params / 1e9:.2f} B | "
              f"{plan.weights_bytes / 1e9:.1f} GB | {plan.accumulator_bytes / 1e9:.2f} GB | {len(plan.passes)} | "
              f"{plan.pass_bytes / 1e9:.2f} GB | {plan.statistics_flops * args.tokens / 1e15:.3g} | "
              f"{plan.forward_flops * args.tokens / 1e15:.3g} | {plan.seconds / 3600:.1f} h |")
    print(f"\nwrote {out}")
    print(f"headline: float32 GEMM {gemm / 1e9:.0f} GFLOP/s on {device}; a 70B fit at {args.tokens / 1e6:g}M tokens "
          f"takes {len(plans['Llama-2-70B'].passes)} passes under {args.max_memory}, "
          f"{plans['Llama-2-70B'].seconds / 3600:.0f} h here")
    return result


if __name__ == "__main__":
    main()
