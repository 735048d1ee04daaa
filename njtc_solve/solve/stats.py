"""Sufficient statistics of linear shortcuts, accumulated in one streaming pass.

For every source layer ``l`` and the shared target ``y`` (layer ``L``) this keeps the row
count, the means and the centred cross-products ``C_xx``, ``C_xy`` and ``C_yy``. Every
solver in :mod:`njtc_solve.solve.solvers` needs nothing else, so a store is read once whatever the
ranks, ridge penalties and methods fitted afterwards.

Numerics (docs/reference/numerics.md): each chunk is shifted by a fixed vector (the first chunk's mean),
multiplied in float32 with ``torch.set_float32_matmul_precision("highest")`` and added into
float64 accumulators. Plain float32 accumulation of transformer activations, whose outlier
features reach 1e3–1e5, gives visibly wrong maps over 1e5 rows. LayerNorm-normalised inputs
are orthogonal to the all-ones vector, so that direction is projected out of their
statistics exactly: float32 rounding would otherwise leave it at ±1e-9 of the largest
eigenvalue, where a pseudo-inverse may keep it.

Examples
--------
>>> import torch
>>> from njtc_solve.solve.stats import MomentAccumulator
>>> x, y = torch.randn(1000, 8), torch.randn(1000, 4)
>>> acc = MomentAccumulator([3])
>>> for i in range(0, 1000, 256):
...     acc.update({3: x[i:i + 256]}, y[i:i + 256])
>>> stats = acc.finalize()
>>> stats.n, tuple(stats.layers[3].cxy.shape), stats.layers[3].cxy.dtype
(1000, (8, 4), torch.float64)
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import atomic_output, read_safetensors
from njtc_solve.maps.shortcuts import normalize_rows

__all__ = ["FORMAT", "LayerMoments", "MomentAccumulator", "Statistics", "add_gram", "add_upper_gram",
           "check_finite_tensors", "count_tensors", "gram_panels", "highest_float32_matmul", "pass_meta",
           "project_out_ones", "symmetric_from_upper", "training_bar", "uncentred", "write_statistics"]

FORMAT = "njtc-statistics"  # the ``format`` metadata of a statistics file
# Rows per GEMM: the float32 sum inside one GEMM is the dominant rounding error (it grows like
# √rows), so a chunk's rows are multiplied in blocks of this many rows (one batched GEMM) whose
# products are added into float64.
GEMM_ROWS = 1024
# Bytes of block products one batched GEMM may hold at once (a larger product is multiplied one block at a time).
GEMM_BATCH_BYTES = 32 << 20
# Columns per panel of a triangular Gram (:func:`add_upper_gram`): a Gram XᵀX is symmetric, so only the
# panels on and above its diagonal are multiplied (about 1.5-1.6 of the 2 d² multiply-adds a row of
# [XᵀX | XᵀY] needs in full); a panel this wide keeps each GEMM near the machine's peak.
PANEL_COLUMNS = 512


def uncentred(n: float, mean_x, mean_t, cxx, cxt, ctt=None) -> tuple:
    """``(XᵀX, XᵀT[, TᵀT])`` of ``n`` rows from their means and centred moments: ``C_ab + n m_aᵀ m_b``."""
    moments = [(cxx, mean_x, mean_x), (cxt, mean_x, mean_t)] + ([] if ctt is None else [(ctt, mean_t, mean_t)])
    return tuple(c + n * torch.outer(a, b) for c, a, b in moments)


def project_out_ones(m: LayerMoments) -> LayerMoments:
    """Moments of inputs orthogonal to the all-ones vector, with that direction removed exactly.

    ``P = I - 11ᵀ/d``: returns ``P x̄``, ``P C_xx P`` and ``P C_xy``. LayerNorm outputs satisfy
    ``x·1 = 0``, so this changes only rounding noise, and a solve then sees ``1`` as an exact
    null direction of ``C_xx`` with no component in ``C_xy``.
    """
    cxx = m.cxx - m.cxx.mean(0, keepdim=True)
    return LayerMoments(m.mean_x - m.mean_x.mean(), cxx - cxx.mean(1, keepdim=True),
                        m.cxy - m.cxy.mean(0, keepdim=True))


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
        Provenance (``target_layer``, ``model_sha256``, store path, ``accumulation`` dtype ...).
    n_rows : int, optional
        Rows accumulated, whatever their weights (defaults to ``n``).
    """

    n: int | float
    mean_y: torch.Tensor
    cyy: torch.Tensor
    layers: dict[int, LayerMoments]
    input_norm: str = "none"
    meta: dict = field(default_factory=dict)
    n_rows: int | None = None

    def __post_init__(self):
        if self.n_rows is None:
            self.n_rows = int(round(self.n))

    def raw(self, layer: int):
        """Uncentred Gram matrices ``(XᵀX, XᵀY, YᵀY)`` for fits without an intercept."""
        m = self.layers[layer]
        return uncentred(self.n, m.mean_x, self.mean_y, m.cxx, m.cxy, self.cyy)

    def to(self, device) -> Statistics:
        """The same statistics with every tensor on ``device``."""
        layers = {k: LayerMoments(*(t.to(device) for t in vars(m).values())) for k, m in self.layers.items()}
        return Statistics(self.n, self.mean_y.to(device), self.cyy.to(device), layers, self.input_norm,
                          dict(self.meta), self.n_rows)

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
                          layers, self.input_norm,
                          {k: v for k, v in self.meta.items() if k != "target_row_norms"},  # self's rows only
                          self.n_rows + other.n_rows)

    def check_finite(self) -> None:
        """Raise when any statistic holds NaN or Inf (corrupt activations)."""
        check_finite_tensors([self.mean_y, self.cyy] + [t for m in self.layers.values() for t in vars(m).values()])
        if self.n_rows < 2:
            raise NJTCError(f"only {self.n_rows} training rows; a fit needs at least 2")

    def save(self, path, head=None) -> None:
        """Write to a safetensors file (atomically), with the model's ``head`` when given.

        With the head (and the provenance already in ``meta``), the file is all that later
        fits of other ranks, methods or ridge penalties need: no activation is read again.
        """
        tensors = {**count_tensors(self.n, self.n_rows), "mean_y": self.mean_y, "cyy": self.cyy}
        for key, m in self.layers.items():
            tensors.update({f"layers.{key}.mean_x": m.mean_x, f"layers.{key}.cxx": m.cxx,
                            f"layers.{key}.cxy": m.cxy})
        write_statistics(path, tensors, {"input_norm": self.input_norm, "meta": json.dumps(self.meta)}, head)

    @classmethod
    def load(cls, path) -> Statistics:
        """Read statistics written by :meth:`save`, every tensor and metadata key checked.

        A missing tensor or key, a shape that disagrees with the others, ``n`` not positive or
        a value that is not finite is a one-line :class:`NJTCError` naming the file, the
        entry and, for a shape, the real and the expected one.
        """
        tensors, meta = read_safetensors(path, "statistics", FORMAT)
        fields, layers = _checked(path, tensors, meta)
        return cls(fields["n"], tensors["mean_y"], tensors["cyy"], layers, fields["input_norm"], fields["meta"],
                   fields["n_rows"])

    @staticmethod
    def load_head(path):
        """The model's head saved with the statistics, or ``None`` where it was not."""
        tensors, meta = read_safetensors(path, "statistics", FORMAT)
        return checked_head(path, tensors, meta)


def invalid(path, problem: str) -> NJTCError:
    """The one-line error for a damaged statistics file: ``PATH is not a valid statistics file: PROBLEM``."""
    return NJTCError(f"{path} is not a valid statistics file: {problem}")


def checked_tensor(path, tensors, name: str, shape: tuple) -> torch.Tensor:
    """``tensors[name]``, refused when missing, of another shape (real and expected named), not a
    float (``n_rows`` excepted) or not finite. ``tensors`` is any mapping with ``in`` and ``[]``."""
    if name not in tensors:
        raise invalid(path, f"it has no tensor {name}")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise invalid(path, f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if not t.is_floating_point() and name != "n_rows":
        raise invalid(path, f"{name} has dtype {t.dtype}, expected a float")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise invalid(path, f"{name} holds NaN or Inf")
    return t


def checked_header(path, meta: dict, d: int | None = None) -> tuple[str, dict]:
    """The ``input_norm`` and the parsed ``meta`` JSON object of a statistics file's metadata, checked
    (``d_model`` and ``target_layer`` non-negative integers, ``d_model`` equal to ``d`` when given)."""
    input_norm = meta.get("input_norm")
    if input_norm not in ("none", "layer", "rms"):
        raise invalid(path, "its metadata has no 'input_norm'" if input_norm is None else
                      f"metadata input_norm={input_norm!r} is not none, layer or rms")
    try:
        extra = json.loads(meta.get("meta", "{}"))
    except ValueError:
        raise invalid(path, "metadata meta is not JSON") from None
    if not isinstance(extra, dict):
        raise invalid(path, "metadata meta is not a JSON object")
    for key in ("d_model", "target_layer"):
        if key in extra and not (type(extra[key]) is int and extra[key] >= 0) and extra[key] != "all":
            raise invalid(path, f"metadata meta.{key}={extra[key]!r} is not a non-negative integer")
    if d is not None and extra.get("d_model", d) != d:
        raise invalid(path, f"metadata meta.d_model={extra['d_model']} disagrees with mean_y's width {d}")
    if "provenance" in extra and not isinstance(extra["provenance"], dict):
        raise invalid(path, "metadata meta.provenance is not a JSON object")
    return input_norm, extra


def checked_counts(path, tensors) -> tuple:
    """``n`` (positive) and ``n_rows`` (positive, ``None`` when absent) of a statistics file."""
    n = float(checked_tensor(path, tensors, "n", (1,))[0])
    if not n > 0:
        raise invalid(path, f"n = {n:g}: it holds no rows")
    n_rows = None
    if "n_rows" in tensors:
        n_rows = int(checked_tensor(path, tensors, "n_rows", (1,))[0])
        if n_rows < 1:
            raise invalid(path, f"n_rows = {n_rows}: it holds no rows")
    return (int(n) if n.is_integer() else n), n_rows


def checked_head(path, tensors, meta: dict):
    """The head saved in a statistics file (``None`` where none was), checked: its description,
    its shapes and finite values."""
    from njtc_solve.core.head import Head

    if "head" not in meta:
        return None
    try:
        description = json.loads(meta["head"])
    except ValueError as err:
        raise NJTCError(f"the head saved in {path} cannot be read ({err})") from err
    if not isinstance(description, dict):
        raise invalid(path, "metadata head is not a JSON object")
    try:
        head = Head.from_tensors(tensors, description, "head.")
    except NJTCError as err:
        raise invalid(path, str(err)) from None
    for name, t in tensors.items():
        if name.startswith("head.") and t.is_floating_point() and not torch.isfinite(t).all():
            raise invalid(path, f"{name} holds NaN or Inf")
    return head


def _checked(path, tensors: dict, meta: dict) -> tuple[dict, dict]:
    """Check a statistics file's tensors and metadata against each other (see :meth:`Statistics.load`).

    Returns the parsed fields (``n``, ``n_rows``, ``input_norm``, ``meta``) and the layers'
    :class:`LayerMoments`.
    """
    def bad(problem: str) -> NJTCError:
        return invalid(path, problem)

    def tensor(name: str, shape: tuple) -> torch.Tensor:
        return checked_tensor(path, tensors, name, shape)

    d = int(tensors["mean_y"].shape[0]) if "mean_y" in tensors and tensors["mean_y"].dim() == 1 else "d"
    input_norm, extra = checked_header(path, meta, d if isinstance(d, int) else None)
    if extra.get("target_layer") == "all":
        raise bad("metadata meta.target_layer='all' is not a non-negative integer")
    tensor("mean_y", (d,))  # names a missing tensor, or its shape
    tensor("cyy", (d, d))
    n, n_rows = checked_counts(path, tensors)
    keys = set()
    for name in tensors:
        parts = name.split(".")
        if name in ("n", "n_rows", "mean_y", "cyy") or parts[0] == "head":
            continue
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in ("mean_x", "cxx", "cxy"):
            raise bad(f"it holds an unexpected tensor {name}")
        keys.add(int(parts[1]))
    if not keys:
        raise bad("it holds no layer (no layers.{l}.cxx tensors)")
    layers = {}
    for k in sorted(keys):
        name = f"layers.{k}.mean_x"
        dx = int(tensors[name].shape[0]) if name in tensors and tensors[name].dim() == 1 else "d_x"
        mean_x = tensor(name, (dx,))
        layers[k] = LayerMoments(mean_x, tensor(f"layers.{k}.cxx", (dx, dx)), tensor(f"layers.{k}.cxy", (dx, d)))
    return {"n": n, "n_rows": n_rows, "input_norm": input_norm, "meta": extra}, layers


NORM_EDGES = 10.0 ** torch.linspace(-4, 8, 2801, dtype=torch.float64)  # row-norm bins 1% wide
NORM_BINS = len(NORM_EDGES) + 1  # with one below and one above the edges
OUTLIER_RATIO = 20.0  # rows whose norm is this many times the median are reported


def count_row_norms(counts: torch.Tensor, rows: torch.Tensor) -> None:
    """Add the Euclidean norms of ``rows`` (n, d) to the log-spaced histogram ``counts`` (float64,
    :data:`NORM_BINS`): one norm per row, on the rows' device, no synchronisation."""
    norms = torch.linalg.vector_norm(rows, dim=1).double()
    bins = torch.bucketize(norms, NORM_EDGES.to(norms.device))
    counts += torch.bincount(bins, minlength=NORM_BINS).to(counts.dtype)


def row_norm_summary(counts) -> dict:
    """Median and largest training-row norm from a :func:`count_row_norms` histogram (1% bins).

    Returns ``median``, ``max``, ``max_over_median`` and ``rows_above``: rows whose norm is at
    least :data:`OUTLIER_RATIO` times the median (an attention sink's massive activation is
    hundreds of times the typical row, e.g. 23,852 against ~70 in SmolLM2-135M's layer 12).
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).cpu()
    total = float(counts.sum())
    if total == 0:
        return {}
    edges = NORM_EDGES

    def centre(i: int) -> float:  # bin i holds edges[i-1] < norm <= edges[i]
        return float(edges[0] if i == 0 else edges[-1] if i >= len(edges) else (edges[i - 1] * edges[i]).sqrt())

    cum = counts.cumsum(0)
    median = centre(int(torch.searchsorted(cum, total / 2)))
    top = int(torch.nonzero(counts).max())
    largest = centre(top)
    above = float(counts[int(torch.bucketize(torch.tensor(OUTLIER_RATIO * median, dtype=torch.float64), edges)):].sum())
    return {"median": median, "max": largest, "max_over_median": largest / median if median > 0 else float("inf"),
            "rows_above": int(above), "ratio": OUTLIER_RATIO}


@contextmanager
def highest_float32_matmul():
    """Float32 GEMMs at full float32 precision inside the block (no TF32), the caller's setting after."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def add_gram(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += aᵀb`` (float64), each block of :data:`GEMM_ROWS` rows multiplied in ``a``'s dtype.

    Whole blocks go through batched GEMMs whose products, at most :data:`GEMM_BATCH_BYTES` of them at a
    time (one at least), are added into ``total`` one by one; a last partial block is multiplied alone.
    """
    whole = a.shape[0] // GEMM_ROWS * GEMM_ROWS
    per_batch = GEMM_ROWS * max(1, GEMM_BATCH_BYTES // (a.shape[1] * b.shape[1] * a.element_size()))
    for start in range(0, whole, per_batch):
        stop = min(start + per_batch, whole)
        blocks_a = a[start:stop].unflatten(0, (-1, GEMM_ROWS))
        blocks_b = b[start:stop].unflatten(0, (-1, GEMM_ROWS))
        for product in torch.bmm(blocks_a.transpose(1, 2), blocks_b):
            total += product
    if whole < a.shape[0]:
        total += a[whole:].T @ b[whole:]


def gram_panels(d: int) -> list[tuple[int, int]]:
    """Column ranges ``(start, stop)`` of the panels of a ``d``-wide triangular Gram: at least two
    for ``d >= 64``, each at most :data:`PANEL_COLUMNS` wide, of near-equal widths."""
    p = 1 if d < 64 else max(2, -(-d // PANEL_COLUMNS))
    edges = [round(i * d / p) for i in range(p + 1)]
    return list(zip(edges[:-1], edges[1:]))


def add_upper_gram(total: torch.Tensor, a: torch.Tensor) -> None:
    """``total += a[:, :d]ᵀ a`` on and above the diagonal of its left square part, ``d = total.shape[0]``.

    ``total`` is ``(d, m)`` and ``a`` is ``(rows, m)`` with ``m >= d``: the right part
    ``total[:, d:]`` gets the full cross-product ``a[:, :d]ᵀ a[:, d:]``, the left part the Gram of
    ``a[:, :d]`` by panels (:func:`gram_panels`) on and above its diagonal only; the entries below the
    diagonal blocks are never written (read the Gram with :func:`symmetric_from_upper`). Each panel's
    product goes through :func:`add_gram`.
    """
    for c0, c1 in gram_panels(total.shape[0]):
        add_gram(total[c0:c1, c0:], a[:, c0:c1], a[:, c0:])


def symmetric_from_upper(gram: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``gram``'s (a new tensor)."""
    return torch.triu(gram) + torch.triu(gram, 1).T


def count_tensors(n, n_rows: int) -> dict[str, torch.Tensor]:
    """The row count ``n`` (a total row weight for weighted statistics) and ``n_rows`` as a
    statistics file stores them."""
    return {"n": torch.tensor([n], dtype=torch.float64), "n_rows": torch.tensor([n_rows], dtype=torch.int64)}


def write_statistics(path, tensors: dict, info: dict, head=None) -> None:
    """Write a statistics file atomically: ``tensors`` and the metadata ``info`` (after the
    ``format`` keys), with the model's ``head`` (tensors ``head.*`` and its description) when given.

    The one writer of :meth:`Statistics.save` and of the all-pairs statistics
    (:meth:`njtc_solve.solve.pair_statistics.PairStatistics.save`).
    """
    info = {"format": FORMAT, "format_version": "1", **info}
    if head is not None:
        tensors = {**tensors, **head.to_tensors("head.")}
        info["head"] = json.dumps(head.describe())
    with atomic_output(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=info)


def check_finite_tensors(tensors) -> None:
    """Raise when any of the statistics ``tensors`` holds NaN or Inf (corrupt activations)."""
    if not all(torch.isfinite(t).all() for t in tensors):
        raise NJTCError("the statistics contain NaN or Inf; the activations are corrupt")


def training_bar(source, skip: int, desc: str, progress: bool, *, counted: bool = True) -> tqdm:
    """A progress bar over ``source``'s training rows at positions ``>= skip`` (``counted=False``: no total);
    refuses a source without any."""
    n = source.count("train", skip)
    if n == 0:
        raise NJTCError(f"{source.path} has no training rows at positions >= {skip}")
    return tqdm(total=n if counted else None, unit="row", unit_scale=True, desc=desc, leave=False, disable=not progress)


def pass_meta(source, *, device, start: float, n_rows: int, products: int, skip_positions: int,
              row_weight: str = "none") -> dict:
    """Provenance and timing of one pass over ``source``'s training rows, for a statistics' ``meta``.

    Parameters
    ----------
    source : ActivationStore or LiveSource
        What the rows came from (its model hash, path, provenance and layer count are recorded).
    device : str
        Where the GEMMs ran (a CUDA device is synchronised before the clock stops).
    start : float
        ``time.perf_counter()`` when the pass began.
    n_rows : int
        Rows accumulated.
    products : int
        ``d × d`` Gram products per row (sources, targets and cross moments), for the GFLOP/s.
    skip_positions : int
        The positions left out, recorded in the provenance.
    row_weight : str
        The row weighting of the statistics.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    flops = 2.0 * n_rows * source.d_model ** 2 * products
    return {"model_sha256": source.model_sha256, "store": str(source.path), "row_weight": row_weight,
            "provenance": {**source.provenance, "skip_positions": skip_positions}, "n_layers": source.n_layers,
            "seconds": seconds, "rows_per_s": n_rows / seconds, "gflops": flops / seconds / 1e9, "device": str(device)}


class MomentAccumulator:
    """Streaming shifted sums of several source blocks against one shared target.

    Every sum lives in one flat float64 buffer on ``device`` (the row counts in its first
    two entries), so a distributed fit all-reduces it in place, without a copy.

    Parameters
    ----------
    keys : iterable
        Names of the source blocks (layer indices).
    input_norm : {"none", "layer", "rms"}
        Per-token normalisation applied to each source row before accumulating.
    device : str
        Where the chunk GEMMs run and the sums live (``"cpu"`` or ``"cuda"``).
    float64 : bool
        Do the chunk GEMMs in float64 too (slower; float32 with a shift is accurate).
    """

    def __init__(self, keys, input_norm: str = "none", device="cpu", float64: bool = False):
        if input_norm not in ("none", "layer", "rms"):
            raise NJTCError(f"unknown input normalization {input_norm!r}; choose none, layer or rms")
        self.keys = list(keys)
        self.input_norm = input_norm
        self.device = torch.device(device)
        self.dtype = torch.float64 if float64 else torch.float32
        self.n: int | float = 0
        self.n_rows = 0
        self.shift_x: dict | None = None
        self.shift_y: torch.Tensor | None = None
        self.buffer: torch.Tensor | None = None
        self.sums: dict[str, torch.Tensor] = {}

    def _as_tensor(self, a) -> torch.Tensor:
        if isinstance(a, np.ndarray):
            a = torch.from_numpy(a if a.flags.writeable else a.copy())
        return a.to(self.device, self.dtype)

    def _normalized(self, a) -> torch.Tensor:
        """Source rows after the input normalisation, in the GEMM dtype."""
        return normalize_rows(self._as_tensor(a), self.input_norm)

    def allocate(self, d_x: dict, d_y: int) -> None:
        """Create the zeroed buffer and its named views (done by the first chunk, or by hand).

        Each source block's ``[XᵀX | XᵀY]`` is one ``d_x × (d_x + d_y)`` view (``sxxy``), filled
        by :func:`add_upper_gram`; ``sxx`` and ``sxy`` are its two halves. ``sxx`` and ``syy`` hold
        their upper triangles only (:func:`symmetric_from_upper` reads them whole).
        """
        shapes = {"sum_y": (d_y,), "syy": (d_y, d_y), "norm_y": (NORM_BINS,)}  # all sums: one all-reduce
        for k in self.keys:
            shapes.update({f"sum_x.{k}": (d_x[k],), f"sxxy.{k}": (d_x[k], d_x[k] + d_y)})
        sizes = [int(np.prod(s)) for s in shapes.values()]
        self.buffer = torch.zeros(2 + sum(sizes), dtype=torch.float64, device=self.device)
        parts = self.buffer[2:].split(sizes)
        self.sums = {name: part.view(shape) for (name, shape), part in zip(shapes.items(), parts)}
        for k in self.keys:
            self.sums[f"sxx.{k}"], self.sums[f"sxy.{k}"] = self.sums[f"sxxy.{k}"].split([d_x[k], d_y], dim=1)

    def set_shift(self, shift_x: dict, shift_y: torch.Tensor) -> None:
        """Fix the shift (all processes of a distributed fit must use the same one)."""
        self.shift_x = {k: v.to(self.device, self.dtype) for k, v in shift_x.items()}
        self.shift_y = shift_y.to(self.device, self.dtype)

    def shift_from_chunk(self, xs: dict, y) -> None:
        """Use a chunk's means (after the input normalisation) as the fixed shift."""
        self.set_shift({k: self._normalized(xs[k]).mean(0) for k in self.keys},
                       self._as_tensor(y).mean(0))

    def update(self, xs: dict, y, weight=None) -> None:
        """Add a chunk: ``xs[key]`` of shape (rows, d_x), ``y`` of shape (rows, d_y).

        ``weight`` (rows,), optional: fixed row weights; the statistics are then weighted
        sums and ``n`` the total weight.
        """
        with highest_float32_matmul():
            self._update(xs, y, None if weight is None else self._as_tensor(weight))

    def _update(self, xs, y, weight):
        y = self._as_tensor(y)
        xs = {k: self._normalized(xs[k]) for k in self.keys}
        if y.shape[0] == 0:
            return
        if self.shift_y is None:
            self.set_shift({k: x.mean(0) for k, x in xs.items()}, y.mean(0))
        if self.buffer is None:
            self.allocate({k: x.shape[1] for k, x in xs.items()}, y.shape[1])
        # weighted rows: scale by √w so the GEMMs give Σ w·(…); the sums take w itself
        sqrt_w = None if weight is None else weight.sqrt()[:, None]
        root = (lambda t: t) if sqrt_w is None else (lambda t: t.mul_(sqrt_w))
        d_y = y.shape[1]
        blocks, ys = {}, None  # one [x | y] block per source width; each x is written into its left part
        for k, x in xs.items():
            width = x.shape[1]
            if width not in blocks:
                blocks[width] = torch.empty(y.shape[0], width + d_y, dtype=self.dtype, device=self.device)
                if ys is None:
                    ys = root(torch.sub(y, self.shift_y, out=blocks[width][:, width:]))
                else:
                    blocks[width][:, width:] = ys
            xy = blocks[width]
            x = root(torch.sub(x, self.shift_x[k], out=xy[:, :width]))
            self.sums[f"sum_x.{k}"] += (x if sqrt_w is None else x * sqrt_w).sum(0)
            add_upper_gram(self.sums[f"sxxy.{k}"], xy)
        if ys is None:
            ys = root(y - self.shift_y)
        count_row_norms(self.sums["norm_y"], y)  # raw target rows: an attention sink stands out
        self.sums["sum_y"] += (ys if sqrt_w is None else ys * sqrt_w).sum(0)
        add_upper_gram(self.sums["syy"], ys)
        self.n += y.shape[0] if weight is None else float(weight.double().sum())
        self.n_rows += y.shape[0]

    def packed(self) -> torch.Tensor:
        """The buffer itself, row counts included: all-reduce it in place, then :meth:`unpacked`."""
        self.buffer[0], self.buffer[1] = float(self.n), float(self.n_rows)
        return self.buffer

    def unpacked(self) -> None:
        """Read the row counts back from a (reduced) buffer."""
        total = float(self.buffer[0])  # a row count, or a total row weight
        self.n = int(total) if total.is_integer() else total
        self.n_rows = int(self.buffer[1])

    def finalize(self, meta: dict | None = None) -> Statistics:
        """Convert the shifted sums into centred float64 statistics (on the accumulator's device)."""
        if self.n_rows == 0:
            raise NJTCError("no rows were accumulated (the store has no training rows?)")
        n, s = self.n, self.sums
        my = s["sum_y"] / n
        cyy = symmetric_from_upper(s["syy"]) - n * torch.outer(my, my)
        layers = {}
        for k in self.keys:
            mx = s[f"sum_x.{k}"] / n
            m = LayerMoments(mx + self.shift_x[k].double(), symmetric_from_upper(s[f"sxx.{k}"]) - n * torch.outer(mx, mx),
                             s[f"sxy.{k}"] - n * torch.outer(mx, my))
            layers[k] = project_out_ones(m) if self.input_norm == "layer" else m
        meta = {**(meta or {}), "accumulation": "float64" if self.dtype == torch.float64 else "float32",
                "target_row_norms": row_norm_summary(s["norm_y"])}
        return Statistics(n, my + self.shift_y.double(), cyy, layers, self.input_norm, meta, self.n_rows)
