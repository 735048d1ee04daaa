"""Identity of self-speculative decoding on the real model: our output against ``model.generate``.

    python benchmarks/speculate_identity.py --shortcuts jtc.safetensors njtc-r64.safetensors

Held-out prompts (the maps' validation documents), ``--max-new-tokens`` each, every map at
``--layers`` with ``--draft-tokens``; the logit lens too. Writes
``benchmarks/results/speculate_identity.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import measured_at

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: SmolLM2-135M")
    p.add_argument("--shortcuts", nargs="+", required=True)
    p.add_argument("--layers", default="24,20,26", help="one exit layer per shortcut file, then the logit lens's")
    p.add_argument("--draft-tokens", default="4,3,2", help="one draft length per entry of --layers")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    from njtc_solve.core.models import load_model, model_sha256
    from njtc_solve.data.corpus import load_corpus
    from njtc_solve.infer.calibrate import held_out_sequences
    from njtc_solve.infer.speculative import ShortcutDrafter, speculative_generate
    from njtc_solve.maps.shortcuts import Shortcuts

    model, tok, name = load_model(args.model, device=args.device, progress=False)
    sha = model_sha256(model)
    maps = [Shortcuts.load(f) for f in args.shortcuts] + [None]
    layers = [int(x) for x in args.layers.split(",")]
    ks = [int(x) for x in args.draft_tokens.split(",")]
    pool = held_out_sequences(tok, load_corpus()[1], maps[0], seq_len=args.prompt_tokens, max_sequences=5 * args.prompts)
    prompts = pool[::5][: args.prompts]
    runs = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            prompt = prompt.to(model.device)
            ref = model.generate(prompt, do_sample=False, max_new_tokens=args.max_new_tokens)
            for sc, layer, k in zip(maps, layers, ks):
                drafter = ShortcutDrafter(model, sc, layer, model_sha256=sha)
                r = speculative_generate(model, prompt, drafter=drafter, max_new_tokens=args.max_new_tokens,
                                         draft_tokens=k)
                runs.append({"prompt": i, "draft": drafter.name, "draft_tokens": k,
                             "identical": r.sequences.tolist() == ref.tolist(), **r.stats.as_dict()})
                print(runs[-1]["prompt"], runs[-1]["draft"], k, runs[-1]["identical"], flush=True)
    record = {"benchmark": "speculate_identity", "measured_at": measured_at(), "model": name, "device": args.device,
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "identical": sum(r["identical"] for r in runs), "runs_total": len(runs), "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculate_identity.json").write_text(json.dumps(record, indent=1, default=float))
    print(f"identical {record['identical']}/{record['runs_total']}; wrote {out / 'speculate_identity.json'}")
    return 0


if __name__ == "__main__":  # a missing default model or bad input: one line, exit 2
    from njtc_solve.cli import run_cli

    raise SystemExit(run_cli(lambda argv: main()))
