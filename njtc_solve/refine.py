"""Refine fitted shortcut maps by gradient on KL (or MSE), starting from the closed form.

Command line::

    python -m njtc_solve.refine --shortcuts jtc.safetensors --store activations.h5 \\
        --objective kl --steps 500 --out jtc-kl.safetensors
    python -m njtc_solve.refine --shortcuts jtc.safetensors --model M --out jtc-kl.safetensors  # no store

The closed form is the exact least-squares map; refinement minimises what a lens user cares
about, ``KL(p_model ‖ p_shortcut)`` through the model's own head, on the store's training
rows, from that exact start (:func:`njtc_solve.train.train_maps`). Narrow maps stay narrow
(their factors are trained). Held-out rows (the *last* ``--check-rows`` validation rows, so
that an evaluation of the first rows, ``evaluate --max-rows``, stays disjoint from them)
are checked as it goes: each layer keeps its best step, and training stops when no layer
improves any more. The result is an ordinary shortcut file, labelled ``{name}-{objective}``,
that records in its metadata what it was refined from and how. With ``--model`` the rows come
from the model's forward pass over the plan the shortcuts were fitted with
(:class:`~njtc_solve.sources.LiveSource`), an epoch per pass; nothing is cached.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .compatibility import check_compatible
from .errors import NJTCError, run_cli
from .extract import add_plan_arguments, plan_settings
from .models import add_model_arguments, check_device
from .outputs import check_file_output, check_not_inputs, command_inputs
from .rows import RowSource
from .shortcuts import FORMAT as SHORTCUT_FORMAT, Shortcuts
from .sources import rows_from_args
from .train import OBJECTIVES, OPTIMIZERS, StoreRows, TrainResult, train_maps

__all__ = ["main", "refine_shortcuts"]


def refine_shortcuts(store: RowSource, shortcuts: Shortcuts | str | Path, *, objective: str = "kl", steps: int = 500,
                     layers: Sequence[int] | None = None, lr: float = 1e-3, optimizer: str = "adam",
                     batch_rows: int = 256, check_rows: int = 512, check_every: int = 25, patience: int = 4,
                     device: str | torch.device = "cpu", progress: bool = True,
                     seed: int = 0) -> tuple[Shortcuts, TrainResult]:
    """Train fitted maps further on the store's training rows; keep each layer's best held-out state.

    Parameters
    ----------
    store : RowSource
        Rows of the model the maps were fitted for (an activation store or a live model's),
        under the same document split.
    shortcuts : Shortcuts or path
        The starting maps (any method; the identity has nothing to train).
    objective : {"kl", "mse"}
    steps : int
        Most optimisation steps, ``batch_rows`` training rows each.
    layers : list of int, optional
        Source layers to refine (default: every layer of ``shortcuts``); the result holds these.
    check_rows : int
        Held-out rows for early stopping: the last ``check_rows`` rows of the validation split.
    lr, optimizer, check_every, patience, device, progress, seed
        As in :func:`njtc_solve.train.train_maps`.

    Returns
    -------
    refined : Shortcuts
        Labelled ``{name}-{objective}``; ``stats["refined"]`` records the start file, objective,
        optimizer, steps and each layer's start and best held-out figures, ``stats["fit"]`` the
        start's own statistics.
    result : TrainResult

    Examples
    --------
    >>> from njtc_solve import ActivationStore, fit_shortcuts
    >>> with ActivationStore("activations.h5") as store:
    ...     [jtc] = fit_shortcuts(store, method="jtc", ranks=None, layers=[1], progress=False)
    ...     refined, result = refine_shortcuts(store, jtc, steps=10, check_every=5, check_rows=128,
    ...                                        progress=False)
    >>> refined.name, refined.stats["refined"]["from"], sorted(refined.maps)
    ('jtc-kl', 'jtc', [1])
    """
    start_file = None
    if not isinstance(shortcuts, Shortcuts):
        start_file, shortcuts = str(shortcuts), Shortcuts.load(shortcuts)
    sc = shortcuts
    head = check_compatible(sc, store, same_split=True)  # its validation rows must stay unseen
    layers = _refined_layers(store, sc, layers)
    if check_rows <= 0:
        raise NJTCError(f"`check_rows` must be positive, not {check_rows}")
    if not 0 < lr < math.inf:
        raise NJTCError(f"`lr` must be a positive finite number, not {lr}")
    n_val = store.count("validation", store.default_skip_positions)
    if n_val == 0:
        raise NJTCError(f"{store.path} has no validation rows to check refinement on")
    check_start = max(0, n_val - check_rows)
    train = StoreRows(store, layers, "train", seed=seed)
    check = StoreRows(store, layers, "validation", start=check_start)
    result = train_maps({l: sc.maps[l] for l in layers}, head, train, check=check, objective=objective, steps=steps, lr=lr,
                        optimizer=optimizer, batch_rows=batch_rows, check_every=check_every, patience=patience,
                        device=device, progress=progress, seed=seed)
    refined = sc.replace(  # every field of the start (head, provenance, ...) but the maps
        maps=result.maps(), label=f"{sc.name}-{objective}",
        stats={"refined": {
            "from": sc.name, "from_file": start_file, "objective": objective, "optimizer": optimizer, "lr": lr,
            "batch_rows": batch_rows, "steps": result.steps, "max_steps": steps, "seconds": result.seconds,
            "stopped": result.stopped, "check_rows": [check_start, n_val], "check_split": "validation",
            "check_skip_positions": store.default_skip_positions,
            "improved": [l for l in layers if result.best[l]["loss"] < result.start[l]["loss"]],
            "layers": {str(l): {"start": result.start[l], "best": result.best[l]} for l in layers}},
            "fit": sc.stats})
    return refined, result


def _refined_layers(store: RowSource, sc: Shortcuts, layers) -> list[int]:
    """The layers to refine: those asked for (each with a map), else every layer of ``sc``."""
    layers = sorted(sc.maps) if layers is None else store.check_layers(layers)
    missing = [l for l in layers if l not in sc.maps]
    if missing:
        raise NJTCError(f"{sc.name} has no map for layer {missing[0]} (it has {sorted(sc.maps)})")
    return layers


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m njtc_solve.refine", description=__doc__,
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


def main(argv=None) -> int:
    """Command-line entry point of ``python -m njtc_solve.refine``."""
    from .fit import parse_layers

    args = _parser().parse_args(argv)
    if args.objective not in OBJECTIVES:
        raise NJTCError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {args.objective!r}")
    if args.optimizer not in OPTIMIZERS:
        raise NJTCError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {args.optimizer!r}")
    for name in ("steps", "batch_rows", "check_rows", "check_every"):
        if getattr(args, name) <= 0:
            raise NJTCError(f"--{name.replace('_', '-')} must be positive")
    if args.patience < 0:
        raise NJTCError("--patience must be 0 or more")
    if not 0 < args.lr < math.inf:
        raise NJTCError(f"--lr must be a positive finite number, not {args.lr}")
    check_not_inputs([("--out", args.out)], command_inputs(args, "shortcuts", "store", "model", "corpus", defaults={
        "store": None if args.model is not None else "activations.h5"}))
    out = check_file_output(args.out, "--out", [SHORTCUT_FORMAT], "a shortcut file")  # before the training
    check_device(args.device)
    start = Shortcuts.load(args.shortcuts)
    if args.model is not None:
        plan_settings(args, start.provenance or None)  # a bad plan is refused before the model loads
    with rows_from_args(args, start.provenance or None, "refine") as store:
        refined, result = refine_shortcuts(store, start, args.objective, args.steps, parse_layers(args.layers),
                                           args.lr, args.optimizer, args.batch_rows, args.check_rows,
                                           args.check_every, args.patience, args.device, not args.no_progress,
                                           args.shuffle_seed)
    info = refined.stats["refined"]
    info["from_file"] = str(Path(args.shortcuts))
    if not info["improved"]:  # never an unchanged file labelled as refined
        raise NJTCError(f"no layer improved on its held-out {args.objective} in {result.steps} steps (--lr {args.lr:g}, "
                        f"{args.optimizer}); the maps are unchanged, so nothing was written: try a smaller --lr")
    refined.save(out)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
