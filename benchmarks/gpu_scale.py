"""The live fit and the speculative draft at real model shapes, with random weights built from configs.

One model shape per run, built on the device from its config alone (no download, no file):
SmolLM2-135M, a 1B Llama (Llama-3.2-1B's shape) or a 7B Llama (Llama-2-7B's shape, in bfloat16,
about 13.5 GB). Measured through the library's own code paths:

- the statistics pass (:class:`~njtc_solve.data.live.LiveSource` into
  :func:`~njtc_solve.solve.statistics_pass.accumulate_statistics`, every layer against the last) in tokens/s,
  against the bare forward pass over the same sequences;
- the float64 solve of every layer's reduced-rank maps at every power-of-two rank from one
  decomposition (:func:`~njtc_solve.solve.fit.fit_from_statistics`);
- the peak device memory of each;
- with ``--speculate``: the cost of each part of a self-speculative step
  (:func:`~njtc_solve.infer.calibrate.measure_costs`: lower blocks, map + head, verification of
  k + 1 tokens) and the speed-up they give with the acceptance measured on the real SmolLM2-135M
  (``benchmarks/results/speculate-cpu.json``, same relative depth): the costs are measured, the
  speed-up projected.

Random weights give real costs, not real maps: nothing here measures a map's quality.

    python benchmarks/gpu_scale.py --shape llama-7b --device cuda --speculate --out llama-7b.json
    python benchmarks/gpu_scale.py --shape llama-7b --rehearse --out llama-7b.json   # tiny, on the CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from njtc_solve.data.corpus import load_corpus
from njtc_solve.data.live import LiveSource
from njtc_solve.solve.fit import fit_from_statistics
from njtc_solve.solve.statistics_pass import accumulate_statistics

RESULTS = Path(__file__).resolve().parent / "results"

# Published configs (the architecture's sizes; rope settings do not change the costs).
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                     max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                     max_position_embeddings=4096, rms_norm_eps=1e-5),
}
# The rehearsal: the same structure (block count, tying, grouped-query attention) at a width a CPU runs in seconds.
REHEARSAL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 1024,
             "max_position_embeddings": 512}
SPECULATE_RESULT = RESULTS / "speculate-cpu.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> float | None:
    """GiB allocated at most since the last reset (``None`` on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def config_of(shape: str, rehearse: bool) -> dict:
    """The shape's config (``rehearse``: narrowed, at most 6 blocks, the same structure otherwise)."""
    config = dict(SHAPES[shape])
    if rehearse:
        kv = config["num_key_value_heads"] < config["num_attention_heads"]
        config.update(REHEARSAL, num_hidden_layers=min(config["num_hidden_layers"], 6),
                      num_key_value_heads=2 if kv else REHEARSAL["num_attention_heads"])
    return config


def build_model(config: dict, tokenizer, device: torch.device, dtype: torch.dtype):
    """A random-weight Llama built straight on ``device`` in ``dtype`` (no CPU copy, no float32 detour)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sharpen_head(model, factor: float = 8.0) -> None:
    """Scale the unembedding (the embedding too, where tied): random weights give near-tied logits, whose
    16-bit rounding would flip the top-1 that the live source's head check compares."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)


def build_tokenizer(documents: list[str]):
    """A small byte-level BPE tokenizer trained on the corpus (its ids are valid for any vocabulary above 512)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents[:200], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def bare_forward(model, live: LiveSource, device: torch.device) -> dict:
    """The model's own forward pass (logits, no hooks) over the live source's training sequences."""
    plan = live.plan
    train = plan.split == 0
    ids = torch.as_tensor(plan.token_ids[train], device=device)
    with torch.no_grad():
        model(input_ids=ids[: live.batch_size])  # warm-up
        sync(device)
        start = time.perf_counter()
        for b in range(0, len(ids), live.batch_size):
            model(input_ids=ids[b:b + live.batch_size])
        sync(device)
    seconds = time.perf_counter() - start
    return {"tokens": int(ids.numel()), "seconds": seconds, "tokens_per_s": ids.numel() / seconds}


def statistics_pass(model, tokenizer, documents, shape: str, args, device: torch.device) -> tuple:
    """Bare forward and the live statistics pass (all layers against the last) over the same sequences."""
    def live(tokens):
        return LiveSource(model, tokenizer, documents, model_name=shape, seq_len=args.seq_len, max_tokens=tokens,
                          batch_size=args.batch_size, weights_sha=f"random-{shape}")

    n_blocks = model.config.num_hidden_layers
    layers = list(range(n_blocks))
    warm = live(2 * args.batch_size * args.seq_len)
    accumulate_statistics(warm, layers, device=str(device), progress=False)  # kernels, allocator, head check
    source = live(args.tokens)
    bare = bare_forward(model, source, device)
    reset_peak(device)
    stats = accumulate_statistics(source, layers, device=str(device), progress=False)
    train_tokens = bare["tokens"]
    result = {"layers": len(layers), "rows": stats.n_rows, "tokens": train_tokens, "seconds": stats.meta["seconds"],
              "tokens_per_s": train_tokens / stats.meta["seconds"], "rows_per_s": stats.meta["rows_per_s"],
              "gflops": stats.meta["gflops"], "peak_memory_gib": peak_memory(device)}
    result["over_bare_forward"] = bare["seconds"] / stats.meta["seconds"]  # 1.0: the statistics cost nothing extra
    return bare, result, stats


def solve_all(stats, device: torch.device) -> dict:
    """Float64 NJTC maps of every layer at every power-of-two rank below d, from one decomposition per layer."""
    d = stats.cyy.shape[0]
    ranks = [2 ** i for i in range(d.bit_length()) if 2 ** i < d]
    out = {"d": d, "layers": len(stats.layers), "ranks": ranks, "method": "njtc"}
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    fits = fit_from_statistics(stats, method="njtc", ranks=ranks)
    sync(device)
    out["seconds"] = time.perf_counter() - start
    out["seconds_per_layer"] = out["seconds"] / len(stats.layers)
    out["peak_memory_gib"] = peak_memory(device)
    del fits
    return out


def speculative_costs(model, stats, device: torch.device, args) -> dict:
    """Costs of each part of a step, measured here, and the speed-up projected with SmolLM2's acceptance."""
    from njtc_solve.infer.calibrate import CalibrationTable, measure_costs
    from njtc_solve.infer.speculative import ShortcutDrafter

    cpu = json.loads(SPECULATE_RESULT.read_text())
    n = model.config.num_hidden_layers
    n_cpu = 30  # SmolLM2-135M's blocks, where the acceptance was measured
    acceptance = {}
    for name, by_layer in cpu["calibration"]["acceptance"].items():
        if name in ("identity", "jtc"):
            for layer, alpha in by_layer.items():
                here = min(n - 1, max(1, round(int(layer) * n / n_cpu)))
                acceptance.setdefault(name, {})[here] = alpha
    layers = sorted({l for v in acceptance.values() for l in v})
    sync(device)
    start = time.perf_counter()
    [jtc] = fit_from_statistics(stats, method="jtc", ranks=None, layers=layers)
    sync(device)
    jtc_seconds = time.perf_counter() - start
    drafters = {"identity": [ShortcutDrafter(model, None, l, check=False) for l in layers],
                "jtc": [ShortcutDrafter(model, jtc, l, check=False) for l in layers]}
    prompt = torch.randint(2, 512, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    costs = measure_costs(model, prompt, drafters, args.max_draft_tokens, repeats=args.repeats)
    seconds = time.perf_counter() - start
    table = CalibrationTable.from_measurements(acceptance, costs, args.max_draft_tokens)
    return {"measured": f"the costs: each part of a step on this device at this shape (best of {args.repeats}, "
                        f"prompt {args.prompt_tokens} tokens, random weights, a JTC map)",
            "projected": "the speed-up: acceptance alpha measured on the real SmolLM2-135M on CPU "
                         f"({SPECULATE_RESULT.name}, measured_at {cpu['measured_at'].get('date')}) at the same "
                         "relative depth, combined with these costs by the calibration's expectation",
            "jtc_solve_seconds": jtc_seconds, "jtc_layers": layers, "seconds": seconds, **table.as_dict()}


def run(args, save=lambda result: None) -> dict:
    """Every measurement of one shape; ``save(result)`` after each, so a step cut short keeps what it measured."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_float32_matmul_precision("highest")
    _, documents = load_corpus()
    tokenizer = build_tokenizer(documents)
    config = config_of(args.shape, args.rehearse)
    reset_peak(device)
    start = time.perf_counter()
    model = build_model(config, tokenizer, device, dtype)
    sharpen_head(model)
    sync(device)
    result = {"shape": args.shape, "rehearsal": args.rehearse, "config": config, "dtype": args.dtype,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "build_seconds": time.perf_counter() - start,
              "parameters": sum(p.numel() for p in model.parameters()),
              "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    bare, stats_pass, stats = statistics_pass(model, tokenizer, documents, args.shape, args, device)
    result.update(bare_forward=bare, statistics_pass=stats_pass)
    save(result)
    print(f"{args.shape}: forward {bare['tokens_per_s']:.0f} tokens/s, statistics pass "
          f"{stats_pass['tokens_per_s']:.0f} tokens/s over {stats_pass['layers']} layers "
          f"({stats_pass['over_bare_forward']:.2f}x the forward's rate), peak {stats_pass['peak_memory_gib']} GiB",
          flush=True)
    result["solve"] = s = solve_all(stats, device)
    print(f"{args.shape}: float64 NJTC solve of {s['layers']} layers at {len(s['ranks'])} ranks: {s['seconds']:.2f} s "
          f"({s['seconds_per_layer']:.3f} s a layer)", flush=True)
    save(result)
    if args.speculate:
        result["speculate"] = speculative_costs(model, stats, device, args)
        best = result["speculate"]["best"]
        print(f"{args.shape}: projected speculative speed-up {best['speedup']:.2f}x ({best['map']} at layer "
              f"{best['exit_layer']}, k={best['draft_tokens']})", flush=True)
    result["peak_memory_gib"] = peak_memory(device)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --rehearse")
    p.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--rehearse", action="store_true", help="a tiny config of the same structure (CPU, seconds)")
    p.add_argument("--tokens", type=int, default=None, help="tokens of the plan (3/4 train; default 32768, "
                                                            "rehearsal 1024)")
    p.add_argument("--seq-len", type=int, default=None, help="default 512, rehearsal 64")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--speculate", action="store_true", help="also time the parts of a speculative step")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-draft-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/gpu/scale-SHAPE.json)")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.rehearse else "cuda")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.exit(2, "error: no CUDA device here (--device cpu, or --rehearse, runs on the CPU)\n")
    args.dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    args.tokens = args.tokens or (1024 if args.rehearse else 32768)
    args.seq_len = args.seq_len or (64 if args.rehearse else 512)
    if args.rehearse:
        args.prompt_tokens = min(args.prompt_tokens, 16)
        args.max_draft_tokens = min(args.max_draft_tokens, 3)
        args.repeats = 1
    out = Path(args.out or RESULTS / "gpu" / f"scale-{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result):
        out.write_text(json.dumps(result, indent=1, default=str))

    save(run(args, save))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
