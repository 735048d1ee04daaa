"""Sufficient statistics of linear shortcuts, accumulated in one streaming pass.

For every source layer ``l`` and the shared target ``y`` (layer ``L``) this keeps the row
count, the means and the centred cross-products ``C_xx``, ``C_xy`` and ``C_yy``. Every
solver in :mod:`njtc_solve.solvers` needs nothing else, so a store is read once whatever the
ranks, ridge penalties and methods fitted afterwards.

Numerics (design.md §6): each chunk is shifted by a fixed vector (the first chunk's mean),
multiplied in float32 with ``torch.set_float32_matmul_precision("highest")`` and added into
float64 accumulators. Plain float32 accumulation of transformer activations, whose outlier
features reach 1e3–1e5, gives visibly wrong maps over 1e5 rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import save_file

from .errors import NJTCError, atomic_output, read_safetensors

__all__ = ["NORMALIZATIONS", "LayerMoments", "MomentAccumulator", "Statistics", "normalize_rows"]

NORMALIZATIONS = ("none", "batch", "layer", "rms")
ROW_NORM_EPS = 1e-5


def normalize_rows(x: torch.Tensor, kind: str, eps: float = ROW_NORM_EPS) -> torch.Tensor:
    """Per-token normalisation without affine parameters: ``"layer"``, ``"rms"`` or ``"none"``."""
    if kind in ("none", "batch"):  # batch standardisation is applied to the statistics instead
        return x
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    elif kind != "rms":
        raise NJTCError(f"unknown normalization {kind!r}; choose from {', '.join(NORMALIZATIONS)}")
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@dataclass
class LayerMoments:
    """Centred moments of one source layer against the shared target (float64)."""

    mean_x: torch.Tensor
    cxx: torch.Tensor
    cxy: torch.Tensor


@dataclass
class Statistics:
    """Centred sufficient statistics for all source layers against one target layer.

    Attributes
    ----------
    n : int or float
        Rows accumulated (the total row weight for weighted statistics).
    mean_y, cyy : Tensor
        Target mean and centred Gram matrix ``Σ (y-ȳ)ᵀ(y-ȳ)``.
    layers : dict of int to LayerMoments
        Per source layer: mean and centred ``C_xx``, ``C_xy``.
    input_norm : str
        Per-token normalisation applied to the source rows before accumulation.
    meta : dict
        Provenance (``target_layer``, ``model_sha256``, store path ...).
    """

    n: int | float
    mean_y: torch.Tensor
    cyy: torch.Tensor
    layers: dict[int, LayerMoments]
    input_norm: str = "none"
    meta: dict = field(default_factory=dict)

    def raw(self, layer: int):
        """Uncentred Gram matrices ``(XᵀX, XᵀY, YᵀY)`` for fits without an intercept."""
        m = self.layers[layer]
        return (m.cxx + self.n * torch.outer(m.mean_x, m.mean_x),
                m.cxy + self.n * torch.outer(m.mean_x, self.mean_y),
                self.cyy + self.n * torch.outer(self.mean_y, self.mean_y))

    def __add__(self, other: Statistics) -> Statistics:
        """Combine statistics of disjoint row sets (Chan et al.'s pairwise update)."""
        if not isinstance(other, Statistics):
            return NotImplemented
        if other.input_norm != self.input_norm or set(other.layers) != set(self.layers):
            raise NJTCError("cannot add statistics of different layers or input normalisations")
        n = self.n + other.n
        wa, wb = self.n / n, other.n / n
        dy = other.mean_y - self.mean_y
        layers = {}
        for key, a in self.layers.items():
            b = other.layers[key]
            dx = b.mean_x - a.mean_x
            layers[key] = LayerMoments(a.mean_x + wb * dx,
                                       a.cxx + b.cxx + n * wa * wb * torch.outer(dx, dx),
                                       a.cxy + b.cxy + n * wa * wb * torch.outer(dx, dy))
        return Statistics(n, self.mean_y + wb * dy, self.cyy + other.cyy + n * wa * wb * torch.outer(dy, dy),
                          layers, self.input_norm, dict(self.meta))

    def check_finite(self) -> None:
        """Raise when any statistic holds NaN or Inf (corrupt activations)."""
        tensors = [self.mean_y, self.cyy] + [t for m in self.layers.values() for t in vars(m).values()]
        if not all(torch.isfinite(t).all() for t in tensors):
            raise NJTCError("the statistics contain NaN or Inf; the activations are corrupt")
        if self.n < 2:
            raise NJTCError(f"only {self.n} training rows; a fit needs at least 2")

    def save(self, path) -> None:
        """Write to a safetensors file (atomically)."""
        tensors = {"n": torch.tensor([self.n], dtype=torch.float64), "mean_y": self.mean_y, "cyy": self.cyy}
        for key, m in self.layers.items():
            tensors.update({f"layers.{key}.mean_x": m.mean_x, f"layers.{key}.cxx": m.cxx,
                            f"layers.{key}.cxy": m.cxy})
        meta = {"format": "njtc-statistics", "format_version": "1", "input_norm": self.input_norm,
                "meta": json.dumps(self.meta)}
        with atomic_output(path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)

    @classmethod
    def load(cls, path) -> Statistics:
        """Read statistics written by :meth:`save`."""
        tensors, meta = read_safetensors(path, "statistics", "njtc-statistics")
        keys = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("layers.")})
        layers = {k: LayerMoments(tensors[f"layers.{k}.mean_x"], tensors[f"layers.{k}.cxx"],
                                  tensors[f"layers.{k}.cxy"]) for k in keys}
        n = float(tensors["n"][0])
        return cls(int(n) if n.is_integer() else n, tensors["mean_y"], tensors["cyy"], layers, meta["input_norm"],
                   json.loads(meta.get("meta", "{}")))


class MomentAccumulator:
    """Streaming shifted sums of several source blocks against one shared target.

    Parameters
    ----------
    keys : iterable
        Names of the source blocks (layer indices).
    input_norm : {"none", "layer", "rms"}
        Per-token normalisation applied to each source row before accumulating.
    device : str
        Where the chunk GEMMs run (``"cpu"`` or ``"cuda"``).
    float64 : bool
        Do the chunk GEMMs in float64 too (slower; float32 with a shift is accurate).

    Examples
    --------
    >>> acc = MomentAccumulator([3, 7])                       # doctest: +SKIP
    >>> for rows, chunk in store.iter_chunks([3, 7, 30]):     # doctest: +SKIP
    ...     acc.update({3: chunk[3], 7: chunk[7]}, chunk[30])
    >>> stats = acc.finalize()                                # doctest: +SKIP
    """

    def __init__(self, keys, input_norm: str = "none", device="cpu", float64: bool = False):
        self.keys = list(keys)
        self.input_norm = input_norm
        self.device = torch.device(device)
        self.dtype = torch.float64 if float64 else torch.float32
        self.n = 0
        self.shift_x: dict | None = None
        self.shift_y: torch.Tensor | None = None
        self.sums: dict[str, torch.Tensor] = {}

    def _as_tensor(self, a) -> torch.Tensor:
        if isinstance(a, np.ndarray):
            a = torch.from_numpy(a if a.flags.writeable else a.copy())
        return a.to(self.device, self.dtype)

    def set_shift(self, shift_x: dict, shift_y: torch.Tensor) -> None:
        """Fix the shift (all processes of a distributed fit must use the same one)."""
        self.shift_x = {k: v.to(self.device, self.dtype) for k, v in shift_x.items()}
        self.shift_y = shift_y.to(self.device, self.dtype)

    def shift_from_chunk(self, xs: dict, y) -> None:
        """Use a chunk's means (after the input normalisation) as the fixed shift."""
        self.set_shift({k: normalize_rows(self._as_tensor(xs[k]), self.input_norm).mean(0) for k in self.keys},
                       self._as_tensor(y).mean(0))

    def update(self, xs: dict, y, weight=None) -> None:
        """Add a chunk: ``xs[key]`` of shape (rows, d_x), ``y`` of shape (rows, d_y).

        ``weight`` (rows,), optional: fixed row weights; the statistics are then weighted
        sums and ``n`` the total weight.
        """
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            self._update(xs, y, None if weight is None else self._as_tensor(weight))
        finally:
            torch.set_float32_matmul_precision(prev)

    def _update(self, xs, y, weight):
        y = self._as_tensor(y)
        xs = {k: normalize_rows(self._as_tensor(xs[k]), self.input_norm) for k in self.keys}
        if y.shape[0] == 0:
            return
        if self.shift_y is None:
            self.set_shift({k: x.mean(0) for k, x in xs.items()}, y.mean(0))
        # weighted rows: scale by √w so the GEMMs give Σ w·(…); the sums take w itself
        sqrt_w = None if weight is None else weight.sqrt()[:, None]
        root = (lambda t: t) if sqrt_w is None else (lambda t: t * sqrt_w)
        ys = root(y - self.shift_y)
        self._add("sum_y", root(ys).sum(0))
        self._add("syy", ys.T @ ys)
        for k, x in xs.items():
            x = root(x - self.shift_x[k])
            self._add(f"sum_x.{k}", root(x).sum(0))
            self._add(f"sxx.{k}", x.T @ x)
            self._add(f"sxy.{k}", x.T @ ys)
        self.n += y.shape[0] if weight is None else float(weight.double().sum())

    def _add(self, name, value):
        value = value.to(torch.float64)
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()

    def pack(self) -> torch.Tensor:
        """All sums and the row count in one float64 buffer (for one all-reduce)."""
        parts = [torch.tensor([float(self.n)], dtype=torch.float64, device=self.device)]
        parts += [self.sums[name].reshape(-1) for name in sorted(self.sums)]
        return torch.cat(parts)

    def unpack(self, buffer: torch.Tensor) -> None:
        """Replace the sums by those of a (reduced) buffer made by :meth:`pack`."""
        total = buffer[0].item()  # a row count, or a total row weight
        self.n = int(total) if float(total).is_integer() else total
        offset = 1
        for name in sorted(self.sums):
            size = self.sums[name].numel()
            self.sums[name] = buffer[offset: offset + size].reshape(self.sums[name].shape).clone()
            offset += size

    def zero_like(self, d_x: dict, d_y: int) -> None:
        """Create zero sums of the right shapes (for a process that received no rows)."""
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=self.device)
        self.sums = {"sum_y": z(d_y), "syy": z(d_y, d_y)}
        for k in self.keys:
            self.sums.update({f"sum_x.{k}": z(d_x[k]), f"sxx.{k}": z(d_x[k], d_x[k]), f"sxy.{k}": z(d_x[k], d_y)})

    def finalize(self, meta: dict | None = None) -> Statistics:
        """Convert the shifted sums into centred float64 statistics (on the CPU)."""
        if self.n == 0:
            raise NJTCError("no rows were accumulated (the store has no training rows?)")
        n = self.n
        cpu = {k: v.cpu() for k, v in self.sums.items()}
        my = cpu["sum_y"] / n
        cyy = cpu["syy"] - n * torch.outer(my, my)
        layers = {}
        for k in self.keys:
            mx = cpu[f"sum_x.{k}"] / n
            layers[k] = LayerMoments(mx + self.shift_x[k].cpu().double(),
                                     cpu[f"sxx.{k}"] - n * torch.outer(mx, mx),
                                     cpu[f"sxy.{k}"] - n * torch.outer(mx, my))
        return Statistics(n, my + self.shift_y.cpu().double(), cyy, layers, self.input_norm, dict(meta or {}))
