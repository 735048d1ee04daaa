"""``python -m njtc_solve.refine``: fitted maps refined by gradient on KL (or MSE), from a store
or a live model, into a new shortcut file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from njtc_solve.solve import refine_shortcuts as library
from njtc_solve.core.errors import NJTCError
from njtc_solve.cli import command, entry_point, prog
from njtc_solve.cli.arguments import add_model_arguments, add_plan_arguments, command_inputs, parse_layers, plan_settings, rows_from_args

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(prog=prog("refine"), description=library.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shortcuts", required=True, help="the fitted shortcut file to start from")
    p.add_argument("--store", help="activation store (default: activations.h5, unless --model is given)")
    add_model_arguments(p)  # --model: read the rows from its forward pass instead of a store
    live = p.add_argument_group("live refinement (with --model): the corpus and plan; unset values come from the "
                                "shortcut file's provenance, so it trains on its own training documents")
    add_plan_arguments(live, inherit=True)
    p.add_argument("--objective", default="kl", help="kl (default) or mse")
    p.add_argument("--steps", type=int, default=500, help="most optimisation steps (default: 500)")
    p.add_argument("--layers", help="source layers to refine: all of the file's (default), 3, 1,5,9 or 0-29")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default: 1e-3)")
    p.add_argument("--optimizer", default="adam", help="adam (default) or sgd (Nesterov, momentum 0.9)")
    p.add_argument("--batch-rows", type=int, default=256, help="training rows per step (default: 256)")
    p.add_argument("--check-rows", type=int, default=512,
                   help="held-out rows for early stopping: the last N validation rows (default: 512)")
    p.add_argument("--check-every", type=int, default=25, help="steps between checks (default: 25)")
    p.add_argument("--patience", type=int, default=4,
                   help="checks without improvement before a layer stops; 0: never (default: 4)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the training rows' order (default: 0)")
    p.add_argument("--out", required=True, help="output shortcut file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_arguments(args) -> tuple[Path, dict]:
    """Every check that reads no row; the output file, and the refinement's settings (checked by
    :class:`~njtc_solve.solve.refine_shortcuts.RefineShortcutsSpec`)."""
    from njtc_solve.core.outputs import check_file_output, check_not_inputs
    from njtc_solve.maps.shortcuts import FORMAT as SHORTCUT_FORMAT

    settings = dict(objective=args.objective, steps=args.steps, layers=parse_layers(args.layers), lr=args.lr,
                    optimizer=args.optimizer, batch_rows=args.batch_rows, check_rows=args.check_rows,
                    check_every=args.check_every, patience=args.patience, device=args.device, seed=args.shuffle_seed)
    library.RefineShortcutsSpec(**settings)
    check_not_inputs([("--out", args.out)], command_inputs(args, "shortcuts", "store", "model", "corpus", defaults={
        "store": None if args.model is not None else "activations.h5"}))
    return check_file_output(args.out, "--out", [SHORTCUT_FORMAT], "a shortcut file"), settings  # before the training


@command(build_parser)
def main(args) -> int:
    """Command-line entry point of ``python -m njtc_solve.refine``."""
    from njtc_solve.maps.shortcuts import Shortcuts

    out, settings = _check_arguments(args)
    start = Shortcuts.load(args.shortcuts)
    if args.model is not None:
        plan_settings(args, start.provenance or None)  # a bad plan is refused before the model loads
    with rows_from_args(args, start.provenance or None, "refine") as store:
        refined, result = library.refine_shortcuts(store, start, **settings, progress=not args.no_progress)
    info = refined.stats["refined"]
    info["from_file"] = str(Path(args.shortcuts))
    if not info["improved"]:  # never an unchanged file labelled as refined
        raise NJTCError(f"no layer improved on its held-out {args.objective} in {result.steps} steps (--lr {args.lr:g}, "
                        f"{args.optimizer}); the maps are unchanged, so nothing was written: try a smaller --lr")
    refined.save(out)
    _print_outcome(args, refined, result)
    return 0


def _print_outcome(args, refined, result) -> None:
    """Each layer's held-out loss before and after, and the rows early stopping used."""
    info = refined.stats["refined"]
    for l in sorted(result.best):
        s, b = result.start[l], result.best[l]
        if l in info["improved"]:
            print(f"layer {l}: held-out {args.objective} {s['loss']:.4g} -> {b['loss']:.4g} (best at step {b['step']})")
        else:
            print(f"layer {l}: held-out {args.objective} {s['loss']:.4g}, not improved: the start map is kept")
    print(f"{result.steps} steps in {result.seconds:.1f}s ({result.stopped}); wrote {args.out} ({refined.name}: "
          f"{len(info['improved'])} of {len(result.best)} layers refined)")
    first, n_val = info["check_rows"]
    if first == 0:
        print(f"warning: early stopping used all {n_val} held-out rows (--check-rows {args.check_rows}), so no "
              "evaluation of this file is independent of it; use a smaller --check-rows", file=sys.stderr)
    else:
        print(f"early stopping used held-out rows {first}-{n_val - 1}; evaluate with --max-rows {first} or fewer "
              "to keep evaluation apart from them")


run = entry_point(main)

if __name__ == "__main__":
    raise SystemExit(run())
