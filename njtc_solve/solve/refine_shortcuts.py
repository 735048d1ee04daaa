"""Refine fitted shortcut maps by gradient on KL (or MSE), starting from the closed form.

Command line::

    python -m njtc_solve.refine --shortcuts jtc.safetensors --store activations.h5 \\
        --objective kl --steps 500 --out jtc-kl.safetensors
    python -m njtc_solve.refine --shortcuts jtc.safetensors --model M --out jtc-kl.safetensors  # no store

The closed form is the exact least-squares map; refinement minimises what a lens user cares
about, ``KL(p_model ‖ p_shortcut)`` through the model's own head, on the store's training
rows, from that exact start (:func:`njtc_solve.solve.training.train_maps`). Narrow maps stay narrow
(their factors are trained). Held-out rows (the *last* ``--check-rows`` validation rows, so
that an evaluation of the first rows, ``evaluate --max-rows``, stays disjoint from them)
are checked as it goes: each layer keeps its best step, and training stops when no layer
improves any more. The result is an ordinary shortcut file, labelled ``{name}-{objective}``,
that records in its metadata what it was refined from and how. With ``--model`` the rows come
from the model's forward pass over the plan the shortcuts were fitted with
(:class:`~njtc_solve.data.live.LiveSource`), an epoch per pass; nothing is cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from njtc_solve.maps.compatibility import check_compatible
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.params import DEVICE, Interval, ListOf, Options, check_spec
from njtc_solve.data.rows import RowSource
from njtc_solve.maps.shortcuts import Shortcuts
from njtc_solve.solve.training import OBJECTIVES, OPTIMIZERS, StoreRows, TrainResult, train_maps

__all__ = ["RefineShortcutsSpec", "refine_shortcuts"]

_POSITIVE = Interval(int, 1, None, says="positive", show_value=False)


@dataclass(frozen=True)
class RefineShortcutsSpec:
    """The settings of :func:`refine_shortcuts`, checked when made, before a row is read or a model loads.

    Examples
    --------
    >>> RefineShortcutsSpec(optimizer="lbfgs")
    Traceback (most recent call last):
      ...
    njtc_solve.core.errors.NJTCError: `optimizer` must be one of adam, sgd, not 'lbfgs'
    """

    objective: str = "kl"
    steps: int = 500
    layers: tuple | None = None
    lr: float = 1e-3
    optimizer: str = "adam"
    batch_rows: int = 256
    check_rows: int = 512
    check_every: int = 25
    patience: int = 4
    device: str = "cpu"
    seed: int = 0

    constraints: ClassVar[dict] = {
        "objective": [Options(OBJECTIVES)],
        "steps": [_POSITIVE],
        "layers": [None, ListOf(Interval(int, 0, None), says="a list of layer indices (whole numbers, 0 or more)")],
        "lr": [Interval(float, 0, None, closed="neither")],
        "optimizer": [Options(OPTIMIZERS)],
        "batch_rows": [_POSITIVE],
        "check_rows": [_POSITIVE],
        "check_every": [_POSITIVE],
        "patience": [Interval(int, 0, None, says="0 or more", show_value=False)],
        "device": [DEVICE],
        "seed": [Interval(int)],
    }

    def __post_init__(self):
        """Refuse a bad setting, naming it."""
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        check_spec(self)


def refine_shortcuts(store: RowSource, shortcuts: Shortcuts | str | Path, *, objective: str = "kl", steps: int = 500,
                     layers: Sequence[int] | None = None, lr: float = 1e-3, optimizer: str = "adam",
                     batch_rows: int = 256, check_rows: int = 512, check_every: int = 25, patience: int = 4,
                     device: str | torch.device = "cpu", progress: bool = True,
                     seed: int = 0) -> tuple[Shortcuts, TrainResult]:
    """Train fitted maps further on the store's training rows; keep each layer's best held-out state.

    Parameters
    ----------
    store : RowSource
        Rows of the model the maps were fitted for, under the same document split.
    shortcuts : Shortcuts or path
        The starting maps.
    objective : {"kl", "mse"}
    steps : int
        Most optimisation steps, ``batch_rows`` training rows each.
    layers : list of int, optional
        Source layers to refine (default: every layer of ``shortcuts``); the result holds these.
    check_rows : int
        Held-out rows for early stopping: the last ``check_rows`` rows of the validation split.
    lr, optimizer, check_every, patience, device, progress, seed
        As in :func:`njtc_solve.solve.training.train_maps`.

    Returns
    -------
    refined : Shortcuts
        Labelled ``{name}-{objective}``; ``stats["refined"]`` records how, ``stats["fit"]`` the
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
    RefineShortcutsSpec(objective=objective, steps=steps, layers=layers, lr=lr, optimizer=optimizer,
                        batch_rows=batch_rows, check_rows=check_rows, check_every=check_every, patience=patience,
                        device=device, seed=seed)
    start_file = None
    if not isinstance(shortcuts, Shortcuts):
        start_file, shortcuts = str(shortcuts), Shortcuts.load(shortcuts)
    sc = shortcuts
    head = check_compatible(sc, store, same_split=True)  # its validation rows must stay unseen
    layers = _refined_layers(store, sc, layers)
    n_val = store.count("validation", store.default_skip_positions)
    if n_val == 0:
        raise NJTCError(f"{store.path} has no validation rows to check refinement on")
    check_start = max(0, n_val - check_rows)
    train = StoreRows(store, layers, "train", seed=seed)
    check = StoreRows(store, layers, "validation", start=check_start)
    result = train_maps({l: sc.maps[l] for l in layers}, head, train, check=check, objective=objective, steps=steps,
                        lr=lr, optimizer=optimizer, batch_rows=batch_rows, check_every=check_every, patience=patience,
                        device=device, progress=progress, seed=seed)
    refined = sc.replace(  # every field of the start (head, provenance, ...) but the maps
        maps=result.maps(), label=f"{sc.name}-{objective}",
        one_jump=None,  # each layer's map is trained on its own: a one jump's start gives per-layer maps
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
