"""Gradient training of the same shortcut maps, as the papers train them (the baseline).

JTC (full d×d map), NJTC (``U·V``) and N-NJTC (``BatchNorm1d`` then ``U·V``), all with a bias,
trained with Adam on minibatch MSE over the same training rows of the same store. Used by
``benchmarks/closed_vs_gradient.py`` and by tests that check gradient descent never gets
below the closed-form optimum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import NJTCError
from .shortcuts import ShortcutMap, Shortcuts
from .store import ActivationStore

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


@dataclass
class GradientRun:
    """Outcome of one gradient-training run."""

    module: GradientShortcut
    curve: list = field(default_factory=list)  # (training seconds, full training MSE, epoch)
    seconds: float = 0.0
    load_seconds: float = 0.0
    time_to: dict = field(default_factory=dict)  # relative gap (0.01, 0.001) -> seconds or None

    @property
    def final_mse(self) -> float:
        return self.curve[-1][1]


def load_training_rows(store: ActivationStore, layer: int, device="cpu", skip_positions: int | None = None):
    """The training rows of ``layer`` and of the target layer, as float32 tensors.

    The rows a closed-form fit uses: positions before ``skip_positions`` (default: the
    store's first position) are left out.
    """
    skip = store.default_skip_positions if skip_positions is None else skip_positions
    xs, ys = [], []
    for _, chunk in store.iter_chunks([layer, store.n_layers], split="train", chunk_rows=8192, skip_positions=skip):
        xs.append(chunk[layer])
        ys.append(chunk[store.n_layers])
    if not xs:
        raise NJTCError(f"{store.path} has no training rows")
    return torch.from_numpy(np.concatenate(xs)).to(device), torch.from_numpy(np.concatenate(ys)).to(device)


def _full_mse(module, x, y, batch=8192) -> float:
    module.eval()
    with torch.no_grad():
        sse = sum(float(((module(x[i:i + batch]) - y[i:i + batch]).double() ** 2).sum())
                  for i in range(0, len(x), batch))
    module.train()
    return sse / y.numel()


def train_gradient(store: ActivationStore, layer: int, method: str = "njtc", rank: int | None = 32,
                   lr: float = 1e-3, batch_size: int = 256, epochs: int = 50, time_budget: float = 60.0,
                   optimum: float | None = None, evals_per_epoch: int = 4, seed: int = 0,
                   device="cpu") -> GradientRun:
    """Train one layer's shortcut with Adam on minibatch MSE; record full training MSE over time.

    The clock counts optimisation steps only: loading the rows and the periodic evaluation
    of the full training loss are excluded (both favour the gradient baseline).

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
    x, y = load_training_rows(store, layer, device)
    load_seconds = time.perf_counter() - start
    module = GradientShortcut(store.d_model, None if method == "jtc" else rank, method == "nnjtc",
                              y.mean(0)).to(device)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    n = len(x)
    steps_per_epoch = max(1, n // batch_size)
    eval_every = max(1, steps_per_epoch // evals_per_epoch)
    run = GradientRun(module, load_seconds=load_seconds, time_to={0.01: None, 0.001: None})
    run.curve.append((0.0, _full_mse(module, x, y), 0.0))
    clock = 0.0
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for step in range(steps_per_epoch):
            t0 = time.perf_counter()
            idx = order[step * batch_size:(step + 1) * batch_size]
            loss = ((module(x[idx]) - y[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device != "cpu" and torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            clock += time.perf_counter() - t0
            if (step + 1) % eval_every == 0 or step == steps_per_epoch - 1:
                mse = _full_mse(module, x, y)
                run.curve.append((clock, mse, epoch + (step + 1) / steps_per_epoch))
                if optimum is not None:
                    for gap in run.time_to:
                        if run.time_to[gap] is None and mse <= optimum * (1 + gap):
                            run.time_to[gap] = clock
                    if run.time_to[0.001] is not None:
                        run.seconds = clock
                        return run
                if clock >= time_budget:
                    run.seconds = clock
                    return run
    run.seconds = clock
    return run


def as_shortcuts(run: GradientRun, layer: int, store: ActivationStore, method: str) -> Shortcuts:
    """Wrap a trained module as a one-layer :class:`Shortcuts` labelled ``{method}-adam``."""
    m = run.module.to_shortcut_map()
    return Shortcuts(method, {layer: m}, store.n_layers, store.model_sha256, run.module.rank,
                     m.normalize, label=f"{method}-adam",
                     provenance={**store.provenance, "skip_positions": store.default_skip_positions})
