"""``python -m njtc_solve.fit``: closed-form shortcut maps from a store, a live model or saved
statistics, one file per rank (and per target with ``--target-layer all``)."""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

from njtc_solve.solve import fit as library
from njtc_solve.core.errors import NJTCError
from njtc_solve.cli import command, entry_point, prog, warn
from njtc_solve.cli.arguments import (add_model_arguments, add_plan_arguments, command_inputs, parse_alpha, parse_layers, parse_ranks,
                        parse_target, plan_settings, rows_from_args)

__all__ = ["build_parser", "fit_spec", "main", "rank_paths", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(prog=prog("fit"), description=library.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="activation store (default: activations.h5, unless --model or --stats is given)")
    add_model_arguments(p)  # --model: read the rows from its forward pass instead of a store
    live = p.add_argument_group("live fit (with --model): the corpus and plan, as in python -m njtc_solve.extract")
    add_plan_arguments(live)
    p.add_argument("--method", default="nnjtc", help="jtc, njtc or nnjtc (default: nnjtc)")
    p.add_argument("--layers", help="source layers: all (default), 3, 1,5,9 or 0-29")
    p.add_argument("--target-layer", help="the layer the maps predict: a number (every source layer below it), "
                   "or all: every pair l < l' from one pass, one file per target, OUT-t{target}.safetensors; "
                   "all keeps one d x d float64 C_xy per pair, C_xx per source and C_yy per target "
                   "(SmolLM2-135M, d = 576: 465 pairs, 1.39 GB; twice that with --save-stats) "
                   "(default: the last layer)")
    p.add_argument("--rank", help="rank of the narrow maps, or a comma list fitted from one decomposition "
                   "(default: 32; not for jtc)")
    p.add_argument("--normalize", help="input normalization: none, batch, layer (N-NJTC default) or rms")
    p.add_argument("--residual", action="store_true", help="fit identity plus a low-rank correction")
    p.add_argument("--weight", default="none", help="none (default) or logits: minimise the error in logit space")
    p.add_argument("--no-intercept", action="store_true", help="fit without a bias")
    p.add_argument("--alpha", default="0", help="ridge penalty, or auto: generalised cross-validation per layer (one alpha serves every rank)")
    p.add_argument("--one-jump", nargs="?", const="pooled", choices=["pooled", "select"],
                   help="ONE map for every source layer (each keeps its own --normalize batch standardisation): "
                   "pooled (the default) solves it on the stacked rows of all layers; select picks the per-layer "
                   "map whose loss over all layers is lowest, from an L x L table of moments")
    p.add_argument("--one-jump-table", help="with --one-jump select: write the L x L table (each per-layer "
                   "map's train MSE on each layer) to this JSON file")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", default="shortcuts.safetensors", help="output file (default: shortcuts.safetensors; "
                   "several ranks give NAME-r{rank}.safetensors)")
    p.add_argument("--save-stats", help="also write the sufficient statistics here")
    p.add_argument("--stats", help="solve from saved statistics instead of reading the activations")
    p.add_argument("--skip-positions", type=int, help="leave out rows at positions below this (default: 1, the "
                   "BOS row, or the first token's attention sink where there is no BOS)")
    p.add_argument("--chunk-rows", type=int, default=4096, help="rows per streamed chunk (default: 4096)")
    p.add_argument("--float64", action="store_true", help="accumulate with float64 GEMMs (slower)")
    p.add_argument("--max-memory", help="memory the statistics of one pass may take on --device, e.g. 40GB or "
                   "512MiB (default: 90%% of its free memory when the fit starts); more source layers (targets, with "
                   "--target-layer all) than fit run in several passes over the rows, one per group, with the same maps")
    p.add_argument("--dry-run", action="store_true", help="print the plan (weights' size, passes, layers per pass, "
                   "statistics memory and FLOPs, estimated time) from the model's config or the store's metadata, "
                   "and stop: no weight is loaded, no row read")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# library parameters that the command spells otherwise
RENAMES = {"ranks": "--rank", "statistics": "--stats", "fit_intercept=False": "--no-intercept"}


@command(build_parser, **RENAMES)
def main(args, comm=None) -> int:
    """Command-line entry point of ``python -m njtc_solve.fit`` (also under torchrun)."""
    from njtc_solve.core.distributed import Communicator

    comm = comm or Communicator.from_environment(args.device)
    try:
        return _run(args, comm)
    except BaseException:
        if comm is not None and not comm.voted:
            comm.vote(False)  # release the peers waiting for this process
        raise
    finally:
        if comm is not None:
            comm.close()


def rank_paths(out: Path, ranks, target: int | None = None) -> list[Path]:
    """``out`` for one rank, ``stem-r{rank}.suffix`` for several; with ``target``, ``stem-t{target}[-r{rank}]``."""
    ranks = [None] if not ranks else list(ranks)
    stem = out.stem if target is None else f"{out.stem}-t{target}"
    if len(ranks) == 1:
        return [out if target is None else out.with_name(f"{stem}{out.suffix}")]
    return [out.with_name(f"{stem}-r{r}{out.suffix}") for r in ranks]


def _summary(sc) -> str:
    """The per-layer table of a fit."""
    lines = [f"{sc.name}: layer  rank   train MSE       R2    params  reduction  solve ms"]
    for layer, rec in sorted(sc.stats["layers"].items(), key=lambda kv: int(kv[0])):
        rank = "full" if rec["rank"] is None else rec["rank"]
        lines.append(f"{'':>{len(sc.name) + 2}}{layer:>5}  {rank:>4}  {rec['train_mse']:10.4g}  {rec['r2']:7.4f}  "
                     f"{rec['params']:>8}  {100 * rec['reduction']:8.2f}%  {1e3 * rec['solve_s']:8.1f}")
    return "\n".join(lines)


@contextmanager
def _source(args, device, comm):
    """Where the fit reads its rows: a store, the model's forward pass, or none (``--stats``)."""
    if args.model is not None and args.stats is not None:
        raise NJTCError("--model and --stats exclude each other: saved statistics need no model")
    if args.stats is not None and args.store is None and args.model is None:
        yield None
        return
    with rows_from_args(args, None, "fit", device, not args.no_progress and (comm is None or comm.rank == 0)) as rows:
        yield rows


def _check_outputs(args, out: Path, ranks, targets=None) -> None:
    """Refuse, before any work, shortcut and statistics files that cannot be written or would replace what they
    must not; ``targets`` (``--target-layer all``) checks ``OUT-t{t}…`` instead (``[]``: ``--save-stats`` alone)."""
    from njtc_solve.core.outputs import check_file_output, check_not_inputs
    from njtc_solve.maps.shortcuts import FORMAT as SHORTCUT_FORMAT
    from njtc_solve.solve.stats import FORMAT as STATISTICS_FORMAT

    names = rank_paths(out, ranks) if targets is None else [p for t in targets for p in rank_paths(out, ranks, t)]
    store = args.store or (None if args.model is not None or args.stats is not None else "activations.h5")
    check_not_inputs([("--out", p) for p in names] + [("--save-stats", args.save_stats)],
                     [("--store", store)] + command_inputs(args, "stats", "model", "corpus"))
    for path in names:
        check_file_output(path, "--out", [SHORTCUT_FORMAT], "a shortcut file")
    if args.save_stats is not None:
        check_file_output(args.save_stats, "--save-stats", [STATISTICS_FORMAT], "a statistics file")


def fit_spec(args, device: str) -> library.FitSpec:
    """The fit's :class:`~njtc_solve.solve.fit.FitSpec` from the flags, validated before any model loads."""
    return library.FitSpec(method=args.method, ranks=parse_ranks(args.rank), layers=parse_layers(args.layers),
                           normalize=args.normalize, residual=args.residual, fit_intercept=not args.no_intercept,
                           alpha=parse_alpha(args.alpha), weight=args.weight, device=device,
                           target_layer=parse_target(args.target_layer), skip_positions=args.skip_positions,
                           chunk_rows=args.chunk_rows, float64=args.float64, max_memory=args.max_memory,
                           one_jump=args.one_jump)


def _run(args, comm) -> int:
    """The fit itself: every process accumulates its share and solves its layers; rank 0 writes."""
    device = args.device
    if comm is not None:
        device = str(comm.device)  # each process on its own GPU under torchrun
        if args.stats is not None:  # nothing to accumulate: no collectives, rank 0 alone solves
            comm.voted = True
            if comm.rank != 0:
                return 0
    spec = fit_spec(args, device)
    if args.dry_run:
        return _dry_run(args, spec, comm)
    out = Path(args.out)
    every_target = spec.target_layer == "all"
    _check_outputs(args, out, spec.ranks, [] if every_target else None)  # all: its files once the targets are known
    _check_table_output(args, out, spec.ranks)
    if args.model is not None:
        plan_settings(args)  # a bad plan (--seq-len 1, ...) is refused before the model loads
        if spec.max_memory is not None and args.stats is None:  # a budget too small, before the model loads
            from njtc_solve.core.models import model_shape

            spec.passes(model_shape(args.model, trust_remote_code=args.trust_remote_code).d_model, [0],
                        budget=spec.max_memory)
    if every_target:
        return _run_all_targets(args, spec, comm, out)
    start = time.perf_counter()
    with _source(args, device, comm) as store:
        shortcuts = spec.fit(store, statistics=args.stats, save_stats=args.save_stats,
                             progress=not args.no_progress and (comm is None or comm.rank == 0),
                             comm=None if args.stats is not None else comm)  # from saved statistics rank 0 solves alone
    if comm is not None and comm.rank != 0:
        return 0
    for sc, path in zip(shortcuts, rank_paths(out, [sc.rank for sc in shortcuts])):
        sc.save(path)
        print(_summary(sc))
        if sc.one_jump:
            print(_one_jump_summary(sc))
        print(f"wrote {path}")
    if args.one_jump_table is not None:
        _write_table(args.one_jump_table, shortcuts)
        print(f"wrote {args.one_jump_table}")
    warning = library.row_norm_warning(shortcuts[0])
    if warning:
        warn(warning, build_parser, **RENAMES)
    acc = shortcuts[0].stats["accumulation"]
    if acc.get("seconds") is not None and args.stats is None:
        print(f"statistics: {acc['seconds']:.2f}s, {acc['rows_per_s']:.0f} rows/s, {acc['gflops']:.1f} GFLOP/s "
              f"on {acc['device']}; total {time.perf_counter() - start:.2f}s")
    return 0


TABLE_FORMAT = "njtc-one-jump-table"  # the ``format`` key of the --one-jump-table JSON file


def _check_table_output(args, out: Path, ranks) -> None:
    """``--one-jump-table`` needs ``--one-jump select`` and a file it may write, checked before any work."""
    from njtc_solve.core.outputs import check_file_output, check_not_inputs

    if args.one_jump_table is None:
        return
    if args.one_jump != "select":
        raise NJTCError("--one-jump-table holds the table of --one-jump select; add --one-jump select")
    outputs = [("--out", p) for p in dict.fromkeys([out, *rank_paths(out, ranks)])]
    check_not_inputs(outputs + [("--save-stats", args.save_stats), ("--one-jump-table", args.one_jump_table)],
                     [("--store", args.store)] + command_inputs(args, "stats", "model", "corpus"))
    check_file_output(args.one_jump_table, "--one-jump-table", [TABLE_FORMAT], "a one-jump table")


def _one_jump_summary(sc) -> str:
    """How many numbers the shared map holds, and for select the chosen map against the pooled one."""
    info = sc.stats["one_jump"]
    n_layers = len(info["layers"])
    lines = [f"one jump ({info['mode']}): 1 map for {n_layers} source layers, {sc.total_params} numbers in all "
             "(the shared map once, with the bias and any per-layer standardisation)"]
    if info["mode"] == "select":
        totals = [sum(row) / n_layers for row in info["table_mse"]]
        lines.append("pooled train MSE of each layer's own map over all layers: " + ", ".join(
            f"{l}: {t:.4g}" for l, t in zip(info["layers"], totals)))
        ratio = info["pooled_sse"] / info["pooled_fit_sse"] if info["pooled_fit_sse"] else float("nan")
        lines.append(f"chosen: the map of layer {info['from_layer']}; its pooled loss is {ratio:.3f}x that of the "
                     "pooled one jump (--one-jump pooled, the least squares optimum of the class)")
    return "\n".join(lines)


def _write_table(path, shortcuts) -> None:
    """The L x L tables of a select fit as JSON: per rank, each map's (row) train MSE on each layer (column)."""
    import json

    from njtc_solve.core.outputs import atomic_output

    ranks = {}
    for sc in shortcuts:
        info = sc.stats["one_jump"]
        ranks[str(sc.rank)] = {"layers": info["layers"], "mse": info["table_mse"], "chosen": info["from_layer"],
                               "chosen_pooled_sse": info["pooled_sse"], "pooled_fit_sse": info["pooled_fit_sse"]}
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps({"format": TABLE_FORMAT, "method": shortcuts[0].name, "ranks": ranks}))


def _run_all_targets(args, spec, comm, out) -> int:
    """``--target-layer all``: one pass, then one file per target, each written as soon as it is solved."""
    if comm is not None and comm.world_size > 1:
        raise NJTCError("--target-layer all runs in one process (not under torchrun)")
    start = time.perf_counter()
    with _source(args, spec.device, None) as store:
        solved = spec.fit_all_targets(store, statistics=args.stats, save_stats=args.save_stats,
                                      progress=not args.no_progress,
                                      check_outputs=lambda targets: _check_outputs(args, out, spec.ranks, targets))
    for target, fits in solved:
        for sc, path in zip(fits, rank_paths(out, [sc.rank for sc in fits], target)):
            sc.save(path)
            r2 = [rec["r2"] for rec in sc.stats["layers"].values()]
            print(f"target {target}: {sc.name}, {len(sc.maps)} source layers, train R2 {min(r2):.4f}..{max(r2):.4f}; "
                  f"wrote {path}")
        warning = library.row_norm_warning(fits[0])
        if warning:
            warn(warning, build_parser, **RENAMES)
    print(f"total {time.perf_counter() - start:.2f}s")
    return 0


def _dry_run(args, spec, comm) -> int:
    """``--dry-run``: the plan of the fit from the model's config or the store's metadata, printed."""
    if args.stats is not None:
        raise NJTCError("--dry-run plans a pass over rows; --stats reads none")
    if comm is not None and comm.rank != 0:
        return 0
    if args.model is None:
        plan = spec.plan(store=args.store or "activations.h5", save_stats=args.save_stats)
    else:
        if args.store is not None:
            raise NJTCError("--model and --store exclude each other: plan a fit of the model or of a store")
        settings = plan_settings(args)
        tokens = settings["max_tokens"]
        plan = spec.plan(model=args.model, model_dtype=args.model_dtype, trust_remote_code=args.trust_remote_code,
                         tokens=None if tokens is None else max(1, round(tokens * (1 - settings["val_fraction"]))),
                         save_stats=args.save_stats)
    print(plan)
    return 0


run = entry_point(main)

if __name__ == "__main__":
    raise SystemExit(run())
