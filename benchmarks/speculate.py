"""Self-speculative decoding with shortcut drafts, side by side with plain greedy decoding and
transformers' ``assistant_early_exit`` (the logit-lens draft), and a projection to a 7B model.

    python benchmarks/speculate.py                          # SmolLM2-135M, CPU
    python benchmarks/speculate.py --device cuda --out DIR
    python benchmarks/speculate.py --quick                  # fewer prompts and tokens

1. *Maps*: JTC and NJTC (``--rank``) fitted live on the default corpus's training documents
   (``LiveSource``, ``--fit-tokens`` tokens), or read from ``--shortcuts`` files; the identity
   map is the logit lens.
2. *Calibration* (:func:`njtc_solve.infer.calibrate.calibrate`) on held-out documents (the
   fit's validation split): acceptance per map and exit layer (teacher-forced top-1
   agreement), the timed cost of each part, and the draft length k of the highest expected
   tokens/s for every (map, ℓ).
3. *Side by side*, interleaved, best of ``--repeats``: plain ``model.generate(do_sample=False)``;
   ``generate(assistant_early_exit=ℓ)``; our drafter with each map at each ``--layers`` ℓ with
   its calibrated k; on ``--prompts`` held-out prompts of ``--prompt-tokens`` tokens, ``--max-new-tokens``
   each: tokens/s, acceptance, tokens per verification, and whether the output is plain greedy's.
4. *Projection* (on paper, nothing measured but the acceptance): the same cost model for
   Llama-2-7B (32 blocks, d = 4096, V = 32000) decoding memory-bound (a pass costs the bytes of
   the weights it reads, whatever the handful of tokens it verifies), with the acceptance
   measured here at the same relative depth.

Writes ``speculate-{device}.json`` and ``.md`` into ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import measured_at

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Llama-2-7B, for the projection: parameters read per token by each part
SEVEN_B = {"blocks": 32, "d": 4096, "ffn": 11008, "vocab": 32000}


def fit_maps(model, tokenizer, name, layers, rank, tokens, folder):
    """JTC and NJTC-r maps of ``layers``, fitted live on the default corpus (its training split), in one pass."""
    from njtc_solve.data.corpus import load_corpus
    from njtc_solve.data.live import LiveSource
    from njtc_solve.solve.fit import fit_shortcuts

    _, docs = load_corpus()
    live = LiveSource(model, tokenizer, docs, model_name=name, max_tokens=tokens)
    stats = Path(folder) / "statistics.safetensors"
    [jtc] = fit_shortcuts(live, method="jtc", layers=layers, progress=False, save_stats=stats)
    [njtc] = fit_shortcuts(method="njtc", ranks=[rank], layers=layers, statistics=stats, progress=False)
    return {"jtc": jtc, njtc.name: njtc}, live.model_sha256


def run_plain(model, prompt, n):
    return model.generate(prompt, do_sample=False, max_new_tokens=n)


def run_early_exit(model, prompt, n, layer):
    return model.generate(prompt, do_sample=False, max_new_tokens=n, assistant_early_exit=layer)


def projection(acceptance: dict, n_layers: int, rank: int, max_k: int = 8) -> list[dict]:
    """Expected speed-up of each (map, ℓ) on Llama-2-7B, memory-bound: cost in parameters read."""
    from njtc_solve.infer.calibrate import expected_tokens

    L, d, ffn, V = SEVEN_B["blocks"], SEVEN_B["d"], SEVEN_B["ffn"], SEVEN_B["vocab"]
    block = 4 * d * d + 3 * d * ffn  # attention and MLP weights of one block
    head = d * V
    map_cost = {"identity": head, "jtc": d * d + head}
    rows = []
    plain = L * block + head
    for name, by_layer in acceptance.items():
        draft_head = map_cost.get(name, 2 * d * rank + (rank + 2) * V)  # narrow: U, V and the low-rank head
        for layer, alpha in sorted(by_layer.items(), key=lambda kv: int(kv[0])):
            layer7 = max(1, min(L - 1, round(int(layer) / n_layers * L)))
            best = None
            for k in range(max_k + 1):
                # k + 1 lower passes, k draft heads, one verification (upper blocks + head), in parameters read
                step = (k + 1) * layer7 * block + k * draft_head + (L - layer7) * block + head
                rate = expected_tokens(alpha, k) / step
                if best is None or rate > best[0]:
                    best = (rate, k, expected_tokens(alpha, k))
            rows.append({"map": name, "smollm2_layer": int(layer), "layer_7b": layer7, "alpha": alpha,
                         "draft_tokens": best[1], "expected_tokens": best[2], "speedup": best[0] * plain})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: SmolLM2-135M")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shortcuts", nargs="*", default=None, help="shortcut files (default: fit JTC and NJTC live)")
    p.add_argument("--fit-layers", default="6,10,14,18,20,22,24,26,28", help="layers the live fit maps")
    p.add_argument("--layers", default="20,24", help="exit layers of the side-by-side runs")
    p.add_argument("--rank", type=int, default=64, help="rank of the live NJTC fit")
    p.add_argument("--fit-tokens", type=int, default=16384)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-draft-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="2 prompts, 16 tokens, 2 repeats, one exit layer")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens, args.repeats = 2, 16, 2
        args.layers = args.layers.split(",")[0]
    if args.threads:
        torch.set_num_threads(args.threads)

    from njtc_solve.core.models import load_model, model_sha256
    from njtc_solve.data.corpus import load_corpus
    from njtc_solve.infer.calibrate import calibrate, held_out_sequences
    from njtc_solve.infer.speculative import ShortcutDrafter, speculative_generate
    from njtc_solve.maps.shortcuts import Shortcuts

    started = time.perf_counter()
    model, tokenizer, name = load_model(args.model, device=args.device, progress=False)
    n_layers = model.config.num_hidden_layers
    fit_layers = [int(x) for x in args.fit_layers.split(",")]
    layers = [int(x) for x in args.layers.split(",")]
    t0 = time.perf_counter()
    if args.shortcuts:
        maps = {}
        for path in args.shortcuts:
            sc = Shortcuts.load(path)
            maps[sc.name if sc.name not in maps else Path(path).stem] = sc
        sha = model_sha256(model)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            maps, sha = fit_maps(model, tokenizer, name, sorted(set(fit_layers) | set(layers)), args.rank,
                                 args.fit_tokens, folder)
    fit_seconds = time.perf_counter() - t0
    maps = {"identity": None, **maps}
    _, docs = load_corpus()
    reference = next((m for m in maps.values() if m is not None), None)
    held_out = held_out_sequences(tokenizer, docs, reference, seq_len=128, max_sequences=6)
    calibration_layers = sorted(set(fit_layers) | set(layers))
    t0 = time.perf_counter()
    table = calibrate(model, held_out[:4], maps, calibration_layers, max_draft_tokens=args.max_draft_tokens,
                      model_sha256=sha)
    calibration_seconds = time.perf_counter() - t0
    print(table.format(), flush=True)

    # held-out prompts: the starts of held-out sequences not used by the calibration
    pool = held_out_sequences(tokenizer, docs, reference, seq_len=args.prompt_tokens, max_sequences=64)
    prompts = [pool[len(pool) - 1 - 3 * i].to(model.device) for i in range(args.prompts)]
    k_of = {(r["map"], r["exit_layer"]): r["draft_tokens"] for r in table.rows}
    methods = {"plain": None}
    for layer in layers:
        methods[f"assistant_early_exit@{layer}"] = ("aee", layer)
        for label, sc in maps.items():
            if sc is None or layer in sc.maps:
                drafter = ShortcutDrafter(model, sc, layer, model_sha256=sha)
                methods[f"{label}@{layer}"] = ("ours", drafter, max(1, k_of[(label, layer)]), label)

    def run(method, prompt):
        spec = methods[method]
        if spec is None:
            return run_plain(model, prompt, args.max_new_tokens), None
        if spec[0] == "aee":
            return run_early_exit(model, prompt, args.max_new_tokens, spec[1]), None
        result = speculative_generate(model, prompt, drafter=spec[1], max_new_tokens=args.max_new_tokens,
                                      draft_tokens=spec[2])
        return result.sequences, result.stats

    outputs, best, stats = {}, {m: float("inf") for m in methods}, {}
    aee_error = None
    with torch.no_grad():
        for rep in range(args.repeats):
            for method in methods:  # interleaved: every method once per repeat
                if method.startswith("assistant_early_exit") and aee_error is not None:
                    continue
                start = time.perf_counter()
                try:
                    results = [run(method, prompt) for prompt in prompts]
                except Exception as err:  # recorded: the baseline may not run here
                    if not method.startswith("assistant_early_exit"):
                        raise
                    aee_error = f"{type(err).__name__}: {err}"
                    print(f"assistant_early_exit failed: {aee_error}", flush=True)
                    continue
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                best[method] = min(best[method], seconds)
                outputs[method] = [r[0].tolist() for r in results]
                if results[0][1] is not None:
                    total = {k: sum(getattr(r[1], k) for r in results)
                             for k in ("new_tokens", "verifications", "drafted", "accepted")}
                    stats[method] = total
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)

    rows = []
    plain_tokens = sum(len(o[0]) - p.shape[1] for o, p in zip(outputs["plain"], prompts))
    for method in methods:
        if method not in outputs:
            continue
        tokens = sum(len(o[0]) - p.shape[1] for o, p in zip(outputs[method], prompts))
        row = {"method": method, "seconds": best[method], "tokens": tokens, "tokens_per_second": tokens / best[method],
               "identical_to_plain": outputs[method] == outputs["plain"],
               "prompts_identical": sum(a == b for a, b in zip(outputs[method], outputs["plain"]))}
        spec = methods[method]
        if spec is not None and spec[0] == "ours":
            s = stats[method]
            row.update(draft_tokens=spec[2], exit_layer=spec[1].exit_layer,
                       acceptance=s["accepted"] / s["drafted"] if s["drafted"] else None,
                       tokens_per_verification=(s["new_tokens"] - len(prompts)) / s["verifications"]
                       if s["verifications"] else None,
                       calibrated_alpha=table.acceptance[spec[3]][spec[1].exit_layer])
        rows.append(row)
    plain_rate = next(r["tokens_per_second"] for r in rows if r["method"] == "plain")
    for r in rows:
        r["speedup_vs_plain"] = r["tokens_per_second"] / plain_rate
        layer = r.get("exit_layer")
        aee = next((x for x in rows if x["method"] == f"assistant_early_exit@{layer}"), None)
        if layer is not None and aee is not None:
            r["speedup_vs_assistant_early_exit"] = r["tokens_per_second"] / aee["tokens_per_second"]
    projected = projection({k: v for k, v in table.acceptance.items()}, n_layers, args.rank)
    on_generation = {}  # the acceptance measured on the side-by-side runs (the model's own greedy text)
    for r in rows:
        if r.get("acceptance") is not None:
            on_generation.setdefault(r["method"].rsplit("@", 1)[0], {})[r["exit_layer"]] = r["acceptance"]
    projected_generation = projection(on_generation, n_layers, args.rank)
    import transformers

    record = {"benchmark": "speculate", "measured_at": measured_at(), "model": name, "device": args.device,
              "threads": torch.get_num_threads(), "transformers": transformers.__version__,
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "fit_seconds": fit_seconds, "calibration_seconds": calibration_seconds,
              "calibration": table.as_dict(), "runs": rows, "plain_tokens": plain_tokens,
              "assistant_early_exit_error": aee_error,
              "projection_7b": {"model": "Llama-2-7B (32 blocks, d 4096, V 32000), memory-bound decoding",
                                "measured": "acceptance alpha (SmolLM2, same relative depth)",
                                "projected": "costs: parameters read per pass (block 4d^2+3d*ffn, head d*V, JTC d^2, "
                                             "NJTC 2dr+(r+2)V); a verification of k+1 tokens costs one pass",
                                "rows": projected, "rows_with_acceptance_on_generation": projected_generation},
              "total_seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"speculate-{args.device.split(':')[0]}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=float))
    (out / f"{stem}.md").write_text(markdown(record, table))
    print((out / f"{stem}.md").read_text())
    return 0


def markdown(record: dict, table) -> str:
    m = record["measured_at"]
    lines = [f"# Self-speculative decoding: {record['model']} on {record['device']}",
             "",
             f"Measured at commit {m['commit']} on {m['date']} ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
             f"transformers {record['transformers']}, {record['threads']} threads). "
             f"{record['settings']['prompts']} held-out prompts × {record['settings']['max_new_tokens']} new tokens, "
             f"interleaved, best of {record['settings']['repeats']}.",
             "", "## Calibration (held-out text, teacher-forced top-1 agreement; costs timed here)", "", "```",
             table.format(), "```", "", "## Side by side (measured)", "",
             "| method | k | tokens/s | × plain | × assistant_early_exit | acceptance | tokens/verification | "
             "calibrated α | identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, spec=".2f": "" if v is None else format(v, spec)
    for r in record["runs"]:
        lines.append(f"| {r['method']} | {r.get('draft_tokens', '')} | {r['tokens_per_second']:.1f} | "
                     f"{r['speedup_vs_plain']:.2f} | {f(r.get('speedup_vs_assistant_early_exit'))} | "
                     f"{f(r.get('acceptance'), '.3f')} | {f(r.get('tokens_per_verification'))} | "
                     f"{f(r.get('calibrated_alpha'), '.3f')} | "
                     f"{r['prompts_identical']}/{record['settings']['prompts']} |")
    if record["assistant_early_exit_error"]:
        lines += ["", f"assistant_early_exit failed: `{record['assistant_early_exit_error']}`"]
    p = record["projection_7b"]
    lines += ["", f"## Projection to {p['model']} (on paper)", "", f"Measured: {p['measured']}. Projected: "
              f"{p['projected']}.", "", "| map | SmolLM2 ℓ | 7B ℓ | α | k | E | projected × plain |", "|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        lines.append(f"| {r['map']} | {r['smollm2_layer']} | {r['layer_7b']} | {r['alpha']:.3f} | {r['draft_tokens']} | "
                     f"{r['expected_tokens']:.2f} | {r['speedup']:.2f} |")
    lines += ["", "With the acceptance measured on the side-by-side runs (the model's own greedy text) instead:", "",
              "| map | SmolLM2 ℓ | 7B ℓ | α | k | E | projected × plain |", "|---|---|---|---|---|---|---|"]
    for r in p["rows_with_acceptance_on_generation"]:
        lines.append(f"| {r['map']} | {r['smollm2_layer']} | {r['layer_7b']} | {r['alpha']:.3f} | {r['draft_tokens']} | "
                     f"{r['expected_tokens']:.2f} | {r['speedup']:.2f} |")
    best_possible = max(p["rows"] + p["rows_with_acceptance_on_generation"], key=lambda r: r["speedup"])
    lines += ["", f"Upper bound of the cost model at an exit layer ℓ of L blocks: L/ℓ (every draft accepted, k → ∞); "
              f"best projected row: {best_possible['map']} at ℓ {best_possible['layer_7b']}, "
              f"{best_possible['speedup']:.2f}×."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # a missing default model or bad input: one line, exit 2
    from njtc_solve.cli import run_cli

    raise SystemExit(run_cli(lambda argv: main()))
