"""Remove K consecutive blocks and ship a smaller model: the replacement folded into the block before.

Command line::

    python -m njtc_solve.prune --model M --remove K (--start S | --auto) --out DIR

Blocks ``S .. S+K-1`` (0-based) are removed and replaced by a closed-form linear map on block
``S-1``'s MLP output, folded into its output projection; ``DIR`` is a standard checkpoint
(config, weights, tokenizer) that ``AutoModelForCausalLM.from_pretrained(DIR)`` loads, plus
``njtc_prune.json`` (the chosen start and map, every candidate's held-out score, the plan).
Candidates per start: plain dropping, least squares plain and weighted by 1 / mean(h_S²),
optional ridge, with or without an intercept; the held-out KL to the full model chooses, so a
map worse than dropping is never written. ``--auto`` scores every start.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

from njtc_solve.core.errors import NJTCError
from njtc_solve.cli import command, run_cli
from njtc_solve.cli.arguments import add_model_arguments, add_plan_arguments, load_model_from_args, plan_settings

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(prog="python -m njtc_solve.prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--remove", type=int, required=True, help="number of consecutive blocks to remove")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--start", type=int, help="first removed block (0-based; at least 1)")
    where.add_argument("--auto", action="store_true", help="score every start on held-out documents, keep the best")
    p.add_argument("--out", required=True, help="output folder (a standard checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder written by an earlier prune")
    p.add_argument("--weighting", default="plain,rms",
                   help="row weightings of the least-squares candidates: plain, rms (1 / mean(h_S^2)) or both "
                   "(default: plain,rms)")
    p.add_argument("--ridge", default="", help="relative ridge penalties for extra candidates, e.g. 0.01,0.1 "
                   "(units of tr(C_xx)/d; shrinks the map towards dropping)")
    p.add_argument("--intercept", choices=["auto", "none", "bias"], default="auto",
                   help="auto (default): into the projection's bias where it has one, else score without and with "
                   "the config's bias option (Llama's mlp_bias); none; bias")
    p.add_argument("--score-tokens", type=int, default=2048, help="held-out tokens each candidate is scored on "
                   "(default: 2048)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_plan_arguments(p)
    return p


def _list(text: str, flag: str, kind=str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise NJTCError(f"cannot parse {flag} {text!r}; use a comma list") from err


def _check(args, settings) -> tuple[list, list]:
    """Every check that needs no model weights: flags, the removal against the model's block count, --out."""
    from njtc_solve.prune.folding import WEIGHTINGS, check_foldable, check_output_folder, check_removal
    from njtc_solve.prune.selection import model_blocks

    if args.remove < 1:
        raise NJTCError(f"--remove must be at least 1, not {args.remove}")
    if settings["positions"] != "all":
        raise NJTCError("--positions one-per-sequence: a replacement is fitted on every position (position 0 "
                        "included)")
    weightings = _list(args.weighting, "--weighting")
    if not weightings or any(w not in WEIGHTINGS for w in weightings):
        raise NJTCError(f"--weighting must list plain and/or rms, not {args.weighting!r}")
    ridge = _list(args.ridge, "--ridge", float)
    if any(not a > 0 for a in ridge):
        raise NJTCError(f"--ridge penalties must be positive, not {args.ridge!r}")
    if args.score_tokens < 1:
        raise NJTCError("--score-tokens must be positive")
    if settings["val_fraction"] <= 0:
        raise NJTCError("--val-fraction must be above 0: candidates are scored on held-out documents")
    if args.batch_size < 1:
        raise NJTCError("--batch-size must be positive")
    corpus = Path(args.corpus) if args.corpus and Path(args.corpus).exists() else None
    check_output_folder(args.out, overwrite=args.overwrite, inputs=[args.model if args.model not in (None, "default")
                                                                    else None, corpus])
    if args.blocks is None:  # a model the table knows: refuse the removal from its config alone
        kind, n_blocks, config = model_blocks(args.model)
        spec = check_foldable(config if config is not None else SimpleNamespace(model_type=kind))
        if args.intercept == "bias" and not spec.has_bias and spec.bias_option is None:
            raise NJTCError(f"--intercept bias: {kind}'s MLP output projection has no bias and its config no option "
                            "for one; use --intercept none or auto")
        check_removal(n_blocks, remove=args.remove, start=args.start)
    return weightings, ridge


@command(build_parser, weightings="--weighting")
def main(args) -> int:
    """Command-line entry point of ``python -m njtc_solve.prune``."""
    settings = plan_settings(args)
    from njtc_solve.core.models import check_device

    check_device(args.device)
    weightings, ridge = _check(args, settings)
    start = time.perf_counter()
    from njtc_solve.data.corpus import load_corpus
    from njtc_solve.core.models import model_sha256
    from njtc_solve.prune.selection import prune_model

    corpus_name, documents = load_corpus(args.corpus, text_field=args.text_field)
    model, tokenizer, name = load_model_from_args(args, args.device, progress=not args.no_progress)
    weights_sha = model_sha256(model)
    result = prune_model(model, tokenizer, documents, remove=args.remove, start=args.start, weightings=weightings,
                         ridge=ridge, intercept=args.intercept, batch_size=args.batch_size,
                         score_tokens=args.score_tokens, progress=not args.no_progress,
                         **{k: settings[k] for k in ("seq_len", "max_tokens", "val_fraction", "seed", "bos")})
    chosen = result.chosen
    drop = next(c for c in result.candidates if c["start"] == chosen.start and c["name"] == "drop")
    fitted = result.best(chosen.start, fitted_only=True)
    out, record = result.save(model, tokenizer, args.out, model_name=name, corpus_name=corpus_name,
                              model_sha256=weights_sha, overwrite=args.overwrite)
    params = record["parameters"]
    chosen_score = result.best(chosen.start)
    print(f"{'start':>5}  {'method':<24} {'KL':>8} {'top-1':>6} {'ppl':>9}")
    for c in sorted(result.candidates, key=lambda c: (c["start"], c["kl"])):
        if args.start is not None or c["name"] == "drop" or c is result.best(c["start"], fitted_only=True):
            print(f"{c['start']:>5}  {c['name']:<24} {c['kl']:8.4f} {c['top1']:6.3f} {c['ppl']:9.3f}")
    print(f"full model: perplexity {result.full['ppl']:.3f} on {result.record['plan']['score_rows']} held-out tokens "
          "(the tokens that chose among the candidates, so the chosen one's figures are optimistic; "
          "benchmarks/vs_replaceme.py measures on tokens no choice saw)")
    if args.auto:
        print(f"cosine distance would choose start {result.cosine_choice['all']} (every position) / "
              f"{result.cosine_choice['angular_last']} (angular distance at the last positions, ReplaceMe's rule); "
              f"held-out KL chose {chosen.start}")
    if chosen.name == "drop":
        print(f"no fitted map beat dropping at start {chosen.start} (best fitted: {fitted['name']}, KL "
              f"{fitted['kl']:.4f} vs {drop['kl']:.4f}): wrote the blocks dropped, with no replacement")
    else:
        print(f"chose {chosen.name} at start {chosen.start}: KL {chosen_score['kl']:.4f} vs {drop['kl']:.4f} "
              f"dropping")
    print(f"wrote {out}: blocks {chosen.start}..{chosen.start + chosen.remove - 1} removed "
          f"({record['n_blocks_before']} -> {record['n_blocks_after']} blocks, {params['before']:,} -> "
          f"{params['after']:,} parameters), {chosen.name}; "
          f"{time.perf_counter() - start:.1f}s")
    return 0


def run(argv=None) -> int:
    """Run the command as a process does: one error line and exit status 2 for bad input."""
    return run_cli(main, argv)
