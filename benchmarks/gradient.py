"""Gradient training of the same shortcut maps, as the papers train them (the baseline).

JTC (full d×d map), NJTC (``U·V``) and N-NJTC (``BatchNorm1d`` then ``U·V``), all with a bias,
trained with Adam on minibatch MSE over the same training rows of the same store, by the
package's one trainer (:func:`njtc_solve.solve.training.train_maps`). A benchmark's baseline, not part
of the library: used by ``benchmarks/closed_vs_gradient.py`` and by tests that check gradient
descent never gets below the closed-form optimum (``tests/test_gradient.py`` loads it by path).
Its ``BatchNorm1d`` with affine parameters is the paper's, which the library's
:class:`~njtc_solve.maps.shortcuts.ShortcutMap` folds into ``norm_mean``/``norm_scale`` and ``bias``
(:meth:`GradientShortcut.to_shortcut_map`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from njtc_solve.core.errors import NJTCError
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts
from njtc_solve.data.store import ActivationStore
from njtc_solve.solve.training import StoreRows, train_maps

__all__ = ["GradientShortcut", "GradientRun", "load_training_rows", "train_gradient"]


class GradientShortcut(nn.Module):
    """A trainable shortcut: ``y = norm(x) @ W + b`` with ``W`` full or ``U @ V``.

    Parameters
    ----------
    d : int
        Width of the residual stream.
    rank : int or None
        ``None`` for a full map (JTC).
    batch_norm : bool
        Put ``BatchNorm1d`` (with affine parameters, as in the N-NJTC paper) in front.
    init_bias : Tensor, optional
        Starting bias (e.g. the target mean, which helps the optimiser).
    """

    def __init__(self, d: int, rank: int | None = None, batch_norm: bool = False, init_bias=None):
        super().__init__()
        self.norm = nn.BatchNorm1d(d, momentum=None) if batch_norm else nn.Identity()
        if rank is None:
            self.W = nn.Parameter(torch.zeros(d, d))
        else:
            self.U = nn.Parameter(torch.randn(d, rank) / d**0.5)
            self.V = nn.Parameter(torch.randn(rank, d) / rank**0.5 * 1e-2)
        self.bias = nn.Parameter(torch.zeros(d) if init_bias is None else init_bias.clone().float())
        self.rank = rank

    def forward(self, x):
        z = self.norm(x)
        return (z @ self.W if self.rank is None else (z @ self.U) @ self.V) + self.bias

    def to_shortcut_map(self) -> ShortcutMap:
        """Fold the trained module into a :class:`ShortcutMap` (batch norm in inference form)."""
        bias = self.bias.detach().clone()
        if isinstance(self.norm, nn.BatchNorm1d):
            bn = self.norm
            scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
            W = self.W.detach() if self.rank is None else (self.U @ self.V).detach()
            # BN(x) = (x - μ) γ/σ + β, so y = (x - μ)·s @ W + (b + β @ W) with s = γ/σ
            bias = bias + bn.bias.detach() @ W
            if self.rank is None:
                return ShortcutMap(weight=W, bias=bias, norm_mean=bn.running_mean.clone(), norm_scale=scale,
                                   normalize="batch")
            return ShortcutMap(U=self.U.detach().clone(), V=self.V.detach().clone(), bias=bias,
                               norm_mean=bn.running_mean.clone(), norm_scale=scale, normalize="batch")
        if self.rank is None:
            return ShortcutMap(weight=self.W.detach().clone(), bias=bias)
        return ShortcutMap(U=self.U.detach().clone(), V=self.V.detach().clone(), bias=bias)

    to_map = to_shortcut_map  # the trainer's name for it


@dataclass
class GradientRun:
    """Outcome of one gradient-training run.

    ``module`` holds the best state seen (lowest full training MSE, :func:`train.train_maps`
    keeps it); ``curve`` one ``(training seconds, full training MSE, epoch)`` per check.
    """

    module: GradientShortcut
    curve: list = field(default_factory=list)
    seconds: float = 0.0
    load_seconds: float = 0.0
    time_to: dict = field(default_factory=dict)  # relative gap (0.01, 0.001) -> seconds or None
    best_mse: float = float("nan")

    @property
    def final_mse(self) -> float:
        """Full training MSE of the returned module (its best state)."""
        return self.best_mse


def load_training_rows(store: ActivationStore, layer: int, device="cpu", skip_positions: int | None = None):
    """The training rows of ``layer`` and of the target layer, as float32 tensors, all in memory.

    The rows a closed-form fit uses: positions before ``skip_positions`` (default: the
    store's first position) are left out. (Training itself streams them: :class:`StoreRows`.)
    """
    skip = store.default_skip_positions if skip_positions is None else skip_positions
    chunks = list(StoreRows(store, [layer], "train", chunk_rows=8192, skip_positions=skip))
    if not chunks:
        raise NJTCError(f"{store.path} has no training rows")
    return (torch.cat([x[layer] for x, _ in chunks]).to(device), torch.cat([y for _, y in chunks]).to(device))


def train_gradient(store: ActivationStore, layer: int, method: str = "njtc", rank: int | None = 32,
                   lr: float = 1e-3, batch_size: int = 256, epochs: int = 50, time_budget: float = 60.0,
                   optimum: float | None = None, evals_per_epoch: int = 4, seed: int = 0,
                   device="cpu") -> GradientRun:
    """Train one layer's shortcut with Adam on minibatch MSE; record full training MSE over time.

    The package's one trainer (:func:`njtc_solve.solve.training.train_maps`, objective ``"mse"``)
    runs it: rows stream from the store in chunks (kept in memory after the first read, which
    is timed apart as ``load_seconds``), shuffled within chunks every epoch; the full training
    MSE is the held-out check (so the best state on the training loss is kept). The clock
    counts the steps and the reading of rows, not the checks (which favours the baseline).

    Parameters
    ----------
    method : {"jtc", "njtc", "nnjtc"}
        ``nnjtc`` uses a batch norm in front, as in the N-NJTC paper.
    optimum : float, optional
        Closed-form training MSE; training stops once within 0.1% of it, and the times to
        reach 1% and 0.1% are recorded.
    """
    torch.manual_seed(seed)
    start = time.perf_counter()
    rows = StoreRows(store, [layer], "train", chunk_rows=8192, seed=seed, in_memory=True)
    chunks = list(rows)  # the first pass reads and keeps the rows
    load_seconds = time.perf_counter() - start
    n = len(rows)
    y_mean = sum(y.double().sum(0) for _, y in chunks) / n
    module = GradientShortcut(store.d_model, None if method == "jtc" else rank, method == "nnjtc", y_mean.float())
    steps_per_epoch = sum(-(-len(y) // batch_size) for _, y in chunks)
    run = GradientRun(module, load_seconds=load_seconds, time_to={0.01: None, 0.001: None})

    def on_check(record) -> bool:
        mse = record["layers"][layer]["loss"]
        run.curve.append((record["seconds"], mse, record["step"] / steps_per_epoch))
        if optimum is None:
            return False
        for gap in run.time_to:
            if run.time_to[gap] is None and mse <= optimum * (1 + gap):
                run.time_to[gap] = record["seconds"]
        return run.time_to[0.001] is not None

    result = train_maps({layer: module}, store.head(), rows, check=chunks, objective="mse", steps=epochs * steps_per_epoch, lr=lr,
                        batch_rows=batch_size, check_every=max(1, steps_per_epoch // evals_per_epoch), patience=0,
                        time_budget=time_budget, device=device, progress=False, on_check=on_check, seed=seed)
    run.curve.insert(0, (0.0, result.start[layer]["loss"], 0.0))  # the check at step 0 precedes on_check
    run.module, run.seconds, run.best_mse = result.modules[layer], result.seconds, result.best[layer]["loss"]
    return run


def as_shortcuts(run: GradientRun, layer: int, store: ActivationStore, method: str) -> Shortcuts:
    """Wrap a trained module as a one-layer :class:`Shortcuts` labelled ``{method}-adam``."""
    m = run.module.to_shortcut_map()
    head = store.head()
    return Shortcuts(method, {layer: m}, store.n_layers, model_sha256=store.model_sha256, rank=run.module.rank,
                     normalize=m.normalize, label=f"{method}-adam",
                     provenance={**store.provenance, "skip_positions": store.default_skip_positions},
                     head_description=head.describe(), head_sha256=head.fingerprint())
