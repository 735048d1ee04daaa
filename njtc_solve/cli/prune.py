"""Remove K consecutive blocks and ship a smaller model: a closed-form map folded into the block before.

Blocks ``S .. S+K-1`` are replaced by a linear map on block ``S-1``'s MLP output, folded into its
output projection; ``--out`` is a standard checkpoint plus ``njtc_prune.json``. The held-out KL
to the full model chooses among dropping and the least-squares candidates (``--auto``: every
start); ``--refine kl`` then trains the chosen map, kept only if its held-out KL is lower.
``--save-stats``/``--stats`` keep and reuse the block statistics.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

from njtc_solve.core.errors import NJTCError
from njtc_solve.cli import command, entry_point, figure, prog
from njtc_solve.cli.arguments import (add_model_arguments, add_plan_arguments, command_inputs, load_model_from_args,
                                      plan_settings)

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(prog=prog("prune"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--remove", type=int, required=True, help="number of consecutive blocks to remove")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--start", type=int, help="first removed block (0-based; at least 1)")
    where.add_argument("--auto", action="store_true", help="score every start on held-out documents, keep the best")
    p.add_argument("--out", required=True, help="output folder (a standard checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder written by an earlier prune "
                   "(and a --save-stats file written by an earlier one)")
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
    p.add_argument("--rescore-tokens", type=int, default=4096, help="further held-out tokens the best two starts "
                   "are rescored on when they are within two standard errors (default: 4096; 0: never)")
    r = p.add_argument_group("refinement")
    r.add_argument("--refine", choices=["kl"], help="train the chosen map by KL to the full model (kl)")
    r.add_argument("--lr", type=float, help="Adam's learning rate (default: 1e-4)")
    r.add_argument("--steps", type=int, help="most refinement steps (default: 200)")
    r.add_argument("--refine-batch", type=int, help="training sequences per step (default: 4)")
    r.add_argument("--refine-tokens", type=int, help="training tokens the refinement reads (default: 8192)")
    r.add_argument("--check-every", type=int, help="held-out KL every this many steps (default: 20)")
    r.add_argument("--patience", type=int, help="stop after this many checks with no new best (default: 3)")
    r.add_argument("--refine-time", type=float, help="stop refining after this many seconds of training")
    st = p.add_argument_group("statistics")
    st.add_argument("--save-stats", metavar="FILE", help="write the block statistics to FILE (safetensors)")
    st.add_argument("--stats", metavar="FILE", help="read the block statistics from FILE instead of a pass over "
                    "the training documents (same model and plan)")
    st.add_argument("--stats-remove", default="", help="further K to gather statistics for with --save-stats, "
                    "e.g. 2,4,6,8")
    p.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_plan_arguments(p)
    return p


_REFINE_FLAGS = {"lr": "lr", "steps": "steps", "refine_batch": "batch_sequences", "refine_tokens": "train_tokens",
                 "check_every": "check_every", "patience": "patience", "refine_time": "time_budget"}


def _list(text: str, flag: str, kind=str) -> list:
    """A comma list of ``kind``."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise NJTCError(f"cannot parse {flag} {text!r}; use a comma list") from err


def _check(args, settings):
    """Every check that needs no weights; ``(PruneSpec or None for named parts, job, statistics, stats_remove)``."""
    from njtc_solve.prune.checkpoint import check_output_folder
    from njtc_solve.prune.replacement_statistics import ReplacementStatistics
    from njtc_solve.prune.refine_fold import RefineFoldSpec
    from njtc_solve.core.models import read_model_config
    from njtc_solve.prune.selection import PruneSpec

    if args.remove < 1:
        raise NJTCError(f"--remove must be at least 1, not {args.remove}")
    if settings["positions"] != "all":
        raise NJTCError("--positions one-per-sequence: a replacement is fitted on every position (position 0 "
                        "included)")
    given = {key: getattr(args, flag) for flag, key in _REFINE_FLAGS.items() if getattr(args, flag) is not None}
    if given and args.refine is None:
        flag = next(f for f, k in _REFINE_FLAGS.items() if k in given)
        raise NJTCError(f"--{flag.replace('_', '-')} is a refinement setting; add --refine kl")
    refine = RefineFoldSpec.check(args.refine, **given) if args.refine else None
    stats_remove = _list(args.stats_remove, "--stats-remove", int)
    if stats_remove and not args.save_stats:
        raise NJTCError("--stats-remove gathers statistics to save; add --save-stats FILE")
    if args.stats and args.save_stats:
        raise NJTCError("--save-stats with --stats: the statistics are already saved in --stats")
    job = dict(remove=args.remove, start=args.start, weightings=_list(args.weighting, "--weighting"),
               ridge=_list(args.ridge, "--ridge", float), intercept=args.intercept, score_tokens=args.score_tokens,
               rescore_tokens=args.rescore_tokens, val_fraction=settings["val_fraction"], refine=refine)
    from njtc_solve.core.outputs import check_not_inputs

    inputs = command_inputs(args, "model", "corpus", "stats")
    check_output_folder(args.out, overwrite=args.overwrite, inputs=[path for _, path in inputs])
    check_not_inputs([("--out", args.out), ("--save-stats", args.save_stats)], inputs)
    if args.save_stats:
        from njtc_solve.core.outputs import check_file_output
        from njtc_solve.prune.replacement_statistics import STATS_FORMAT

        path = check_file_output(args.save_stats, "--save-stats", [STATS_FORMAT], "a block statistics file")
        if path.exists() and not args.overwrite:
            raise NJTCError(f"--save-stats {path} exists; pass --overwrite to replace it")
        for k in stats_remove:
            if k < 1:
                raise NJTCError(f"--stats-remove must list positive numbers of blocks, not {args.stats_remove!r}")
    spec = None
    if args.blocks is None:  # a model the table knows: the job is checked from its config alone
        kind, n_blocks, config = read_model_config(args.model)
        spec = PruneSpec.check(config if config is not None else SimpleNamespace(model_type=kind), n_blocks, **job)
        for k in stats_remove:
            if k > n_blocks - 1:
                raise NJTCError(f"--stats-remove {k}: the model has {n_blocks} blocks, so at most {n_blocks - 1} "
                                "can be removed")
    stats = None
    if args.stats:
        stats = ReplacementStatistics.load(args.stats)
        plan = {k: settings[k] for k in ("seq_len", "max_tokens", "seed", "bos")}
        plan["val_fraction"] = settings["val_fraction"]
        stats.check_serves(model_type=None if spec is None else spec.model_type,
                           n_blocks=None if spec is None else spec.n_blocks, remove=args.remove,
                           starts=[] if spec is None else spec.starts, weightings=job["weightings"], plan=plan)
    return spec, job, stats, stats_remove


@command(build_parser, weightings="--weighting", batch_sequences="--refine-batch", train_tokens="--refine-tokens",
         time_budget="--refine-time", path="--save-stats")
def main(args) -> int:
    """Command-line entry point of ``python -m njtc_solve.prune``."""
    settings = plan_settings(args)
    from njtc_solve.core.models import check_device

    check_device(args.device)
    spec, job, stats, stats_remove = _check(args, settings)
    start = time.perf_counter()
    from njtc_solve.core.models import model_sha256
    from njtc_solve.data.corpus import load_corpus
    from njtc_solve.prune.selection import PruneSpec, prune_model

    corpus_name, documents = load_corpus(args.corpus, text_field=args.text_field)
    model, tokenizer, name = load_model_from_args(args, args.device, progress=not args.no_progress)
    if spec is None:  # a model the table does not know: its parts were named, the job is checked now
        spec = PruneSpec.check(model.config, **job)
    weights_sha = model_sha256(model)
    if stats is not None:
        stats.check_serves(model_sha256=weights_sha)
    result = prune_model(model, tokenizer, documents, spec=spec, stats=stats,
                         stats_remove=[args.remove, *stats_remove] if args.save_stats else (),
                         batch_size=args.batch_size, model_sha256=weights_sha, progress=not args.no_progress,
                         **{k: settings[k] for k in ("seq_len", "max_tokens", "seed", "bos")})
    if args.save_stats:
        result.stats.meta.update({"model": name, "corpus": corpus_name})
        result.stats.save(args.save_stats, overwrite=args.overwrite)
    chosen = result.chosen
    drop = next(c for c in result.candidates if c["start"] == chosen.start and c["name"] == "drop")
    fitted = result.best(chosen.start, fitted_only=True)
    out, record = result.save(model, tokenizer, args.out, model_name=name, corpus_name=corpus_name,
                              model_sha256=weights_sha, overwrite=args.overwrite)
    params = record["parameters"]
    chosen_score = result.best(chosen.start)
    print(f"{'start':>5}  {'method':<24} {'KL':>8} {'± se':>7} {'top-1':>6} {'ppl':>9}")
    for c in sorted(result.candidates, key=lambda c: (c["start"], c["kl"])):
        if args.start is not None or c["name"] == "drop" or c is result.best(c["start"], fitted_only=True):
            print(f"{c['start']:>5}  {c['name']:<24} {c['kl']:8.4f} {figure(c['kl_se'], '7.4f')} {c['top1']:6.3f} "
                  f"{c['ppl']:9.3f}")
    print(f"full model: perplexity {result.full['ppl']:.3f} on {result.record['plan']['score_rows']} held-out tokens "
          f"of {result.record['plan']['score_documents']} documents (± se clustered by document) "
          "(the tokens that chose among the candidates, so the chosen one's figures are optimistic; "
          "benchmarks/vs_replaceme.py measures on tokens no choice saw)")
    if args.auto:
        ranking = result.ranking
        rho = ranking["spearman_with_held_out_kl"]
        print(f"cosine distance would choose start {result.cosine_choice['all']} (every position) / "
              f"{result.cosine_choice['angular_last']} (angular distance at the last positions, ReplaceMe's rule), "
              f"the map's residual {ranking['choice_by']['residual']}; held-out KL chose {chosen.start} "
              f"(Spearman with held-out KL over starts: angular {figure(rho['angular_last'], '.2f')}, cosine "
              f"{figure(rho['cosine_distance'], '.2f')}, residual {figure(rho['residual'], '.2f')})")
        again = ranking["rescore"]
        if again and again.get("tokens"):
            a, b = again["starts"]
            print(f"starts {a} and {b} were within noise (gap {again['gap']:.4f}, se {figure(again['gap_se'], '.4f')}): "
                  f"rescored on {again['tokens']} more tokens, KL {again['kl_combined'][str(a)]:.4f} vs "
                  f"{again['kl_combined'][str(b)]:.4f}")
    if result.refine is not None:
        r = result.refine
        verdict = "kept" if r["improved"] else "not better than its start: wrote the closed-form map"
        fresh = r["held_out_fresh"]
        honest = ("no held-out tokens were left to measure it on fresh tokens" if fresh is None else
                  f"held-out KL {fresh['start']['kl']:.4f} -> {fresh['best']['kl']:.4f} (se "
                  f"{fresh['best']['kl_se']:.4f}) on {fresh['tokens']} tokens of {fresh['documents']} documents "
                  "that neither chose nor trained the map")
        print(f"refined {r['from']} by KL: {r['steps']} steps in {r['train_seconds']:.1f}s training "
              f"(+{r['check_seconds']:.1f}s checks, {r['stopped']}), {honest}; on the scoring tokens, which chose "
              f"the fold and stopped the training (optimistic): {r['held_out_start']['kl']:.4f} -> "
              f"{r['held_out_best']['kl']:.4f}; {verdict}")
    if chosen.name == "drop":
        print(f"no fitted map beat dropping at start {chosen.start} (best fitted: {fitted['name']}, KL "
              f"{fitted['kl']:.4f} vs {drop['kl']:.4f}): wrote the blocks dropped, with no replacement")
    else:
        print(f"chose {chosen.name} at start {chosen.start}: KL {chosen_score['kl']:.4f} vs {drop['kl']:.4f} "
              f"dropping")
    if args.save_stats:
        print(f"wrote {args.save_stats}: block statistics of K = "
              f"{', '.join(map(str, sorted({k for ks in result.stats.pairs.values() for k in ks})))} at every start")
    print(f"wrote {out}: blocks {chosen.start}..{chosen.start + chosen.remove - 1} removed "
          f"({record['n_blocks_before']} -> {record['n_blocks_after']} blocks, {params['before']:,} -> "
          f"{params['after']:,} parameters), {chosen.name}; "
          f"{time.perf_counter() - start:.1f}s")
    return 0


run = entry_point(main)

if __name__ == "__main__":
    raise SystemExit(run())
