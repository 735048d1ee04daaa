"""Statistics of every (source, target) layer pair from one streaming pass, and their files.

``C_xx`` per source and ``C_yy`` per target are shared; each target ``T`` keeps one block
``[x_l for l < T]ᵀ x_T`` (``k_T·d × d`` float64), filled by one GEMM per row block, with the
numerics of :mod:`njtc_solve.solve.stats`. The solves stream target by target
(:func:`iter_fit_targets`), each target's cross block freed once solved.

Examples
--------
>>> import torch
>>> from njtc_solve.solve.pair_statistics import PairAccumulator
>>> rows = {l: torch.randn(500, 8) for l in range(4)}
>>> acc = PairAccumulator(sources=[0, 1, 2], targets=[1, 2, 3])
>>> acc.update(rows)
>>> pairs = acc.finalize()
>>> stats = pairs.for_target(2)                        # an ordinary single-target Statistics
>>> sorted(stats.layers), stats.meta["target_layer"], tuple(stats.layers[1].cxy.shape)
([0, 1], 2, (8, 8))
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from njtc_solve.core.errors import NJTCError
from njtc_solve.maps.shortcuts import normalize_rows
from njtc_solve.solve.stats import (NORM_BINS, LayerMoments, Statistics, add_gram, check_finite_tensors,
                                    checked_counts, checked_head, checked_header, checked_tensor, count_row_norms,
                                    count_tensors, highest_float32_matmul, invalid, pass_meta, project_out_ones,
                                    row_norm_summary, training_bar, write_statistics)

__all__ = ["PairAccumulator", "PairStatistics", "accumulate_pairs", "iter_fit_targets", "pair_layers",
           "pair_memory_bytes", "statistics_targets", "load_head", "load_target_statistics"]

PAIRS_KIND = "pairs"


def pair_layers(*, sources, targets) -> list[tuple[int, int]]:
    """Every ``(source, target)`` pair with the source below the target."""
    return [(l, t) for t in sorted(targets) for l in sorted(sources) if l < t]


def pair_memory_bytes(*, n_sources: int, n_targets: int, n_pairs: int, d: int) -> int:
    """Bytes of float64 statistics an all-pairs pass keeps (``C_xy`` per pair, ``C_xx``, ``C_yy``).

    >>> round(pair_memory_bytes(n_sources=30, n_targets=30, n_pairs=465, d=576) / 1e9, 2)
    1.39
    """
    return 8 * d * d * (n_pairs + n_sources + n_targets) + 8 * d * (n_sources + n_targets)


class PairAccumulator:
    """Streaming shifted sums of every source layer against every later target layer.

    Parameters
    ----------
    sources, targets : iterable of int
        A pair is accumulated for each source below each target.
    input_norm : {"none", "layer", "rms"}
        Per-token normalisation of the source rows (targets stay raw).
    device : str
    float64 : bool
        Do the GEMMs in float64 too.
    """

    def __init__(self, *, sources, targets, input_norm: str = "none", device="cpu", float64: bool = False):
        if input_norm not in ("none", "layer", "rms"):
            raise NJTCError(f"unknown input normalization {input_norm!r}; choose none, layer or rms")
        self.sources = sorted(int(l) for l in sources)
        self.targets = sorted(int(t) for t in targets if any(l < t for l in sources))
        if not self.targets:
            raise NJTCError("no target layer is above a source layer")
        self.input_norm = input_norm
        self.device = torch.device(device)
        self.dtype = torch.float64 if float64 else torch.float32
        self.below = {t: sum(l < t for l in self.sources) for t in self.targets}  # sources of each target
        self.n, self.n_rows = 0, 0
        self.shift_x: dict | None = None
        self.shift_y: dict | None = None
        self.sum_x: dict = {}
        self.sum_y: dict = {}
        self.sxx: dict = {}
        self.syy: dict = {}
        self.sxy: dict = {}

    def _rows(self, a) -> torch.Tensor:
        """``a`` as a tensor of the GEMMs' type on the device."""
        if isinstance(a, np.ndarray):
            a = torch.from_numpy(a if a.flags.writeable else a.copy())
        return a.to(self.device, self.dtype)

    def _allocate(self, d: int) -> None:
        """Zero sums for rows of width ``d``."""
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)
        self.sum_x = {l: z(d) for l in self.sources}
        self.sxx = {l: z(d, d) for l in self.sources}
        self.sum_y = {t: z(d) for t in self.targets}
        self.syy = {t: z(d, d) for t in self.targets}
        self.sxy = {t: z(self.below[t] * d, d) for t in self.targets}
        self.norm_y = {t: z(NORM_BINS) for t in self.targets}  # row-norm histograms (attention sinks)

    def update(self, chunk: dict) -> None:
        """Add a chunk: ``chunk[layer]`` rows ``(n, d)`` for every source and target layer."""
        with highest_float32_matmul():
            self._update(chunk)

    def _update(self, chunk):
        """:meth:`update` under the highest float32 matmul precision."""
        n = len(chunk[self.targets[0]])
        if n == 0:
            return
        xs = {l: normalize_rows(self._rows(chunk[l]), self.input_norm) for l in self.sources}
        if self.shift_x is None:  # the first chunk's means: a fixed shift for the whole pass
            self.shift_x = {l: x.mean(0) for l, x in xs.items()}
            self.shift_y = {t: self._rows(chunk[t]).mean(0) for t in self.targets}
            self._allocate(xs[self.sources[0]].shape[1])
        d = xs[self.sources[0]].shape[1]
        z = torch.empty(n, len(self.sources) * d, dtype=self.dtype, device=self.device)  # [x_0 | x_1 | ...]
        for i, l in enumerate(self.sources):
            x = torch.sub(xs[l], self.shift_x[l], out=z[:, i * d:(i + 1) * d])
            self.sum_x[l] += x.sum(0)
            add_gram(self.sxx[l], x, x)
        for t in self.targets:
            count_row_norms(self.norm_y[t], self._rows(chunk[t]))
            y = self._rows(chunk[t]) - self.shift_y[t]
            self.sum_y[t] += y.sum(0)
            add_gram(self.syy[t], y, y)
            add_gram(self.sxy[t], z[:, :self.below[t] * d], y)  # every source below t in one GEMM
        self.n += n
        self.n_rows += n

    def finalize(self, meta: dict | None = None) -> PairStatistics:
        """Centre the sums in place (no copy of the pairs) and return them as :class:`PairStatistics`."""
        if self.n_rows == 0:
            raise NJTCError("no rows were accumulated (the source has no training rows?)")
        n = self.n
        mx = {l: self.sum_x[l] / n for l in self.sources}
        my = {t: self.sum_y[t] / n for t in self.targets}
        for l in self.sources:
            self.sxx[l] -= n * torch.outer(mx[l], mx[l])
        for t in self.targets:
            self.syy[t] -= n * torch.outer(my[t], my[t])
            d = my[t].shape[0]
            for i, l in enumerate(self.sources[:self.below[t]]):
                self.sxy[t][i * d:(i + 1) * d] -= n * torch.outer(mx[l], my[t])
        meta = {**(meta or {}), "accumulation": "float64" if self.dtype == torch.float64 else "float32",
                "target_row_norms": {str(t): row_norm_summary(self.norm_y[t]) for t in self.targets}}
        pairs = PairStatistics(
            n, self.n_rows, {l: mx[l] + self.shift_x[l].double() for l in self.sources}, self.sxx,
            {t: my[t] + self.shift_y[t].double() for t in self.targets}, self.syy, self.sxy, self.input_norm, meta)
        self.sxx, self.syy, self.sxy = {}, {}, {}  # now owned by the statistics
        return pairs


@dataclass
class PairStatistics:
    """Centred float64 statistics of every (source, target) pair; ``cxy[t]`` stacks ``C_xy`` of every
    source below ``t`` (ascending) in one ``(k·d, d)`` tensor."""

    n: int
    n_rows: int
    mean_x: dict
    cxx: dict
    mean_y: dict
    cyy: dict
    cxy: dict
    input_norm: str = "none"
    meta: dict = field(default_factory=dict)

    @property
    def sources(self) -> list[int]:
        """The source layers."""
        return sorted(self.mean_x)

    @property
    def targets(self) -> list[int]:
        """The target layers."""
        return sorted(self.mean_y)

    def for_target(self, target: int) -> Statistics:
        """The :class:`~njtc_solve.solve.stats.Statistics` of every source below ``target`` (views, no copy)."""
        if target not in self.cxy:
            raise NJTCError(f"the statistics hold no target layer {target} (they hold {self.targets})"
                            if target not in self.mean_y else f"target layer {target} was already released")
        d = self.mean_y[target].shape[0]
        layers = {}
        for i, l in enumerate(l for l in self.sources if l < target):
            m = LayerMoments(self.mean_x[l], self.cxx[l], self.cxy[target][i * d:(i + 1) * d])
            layers[l] = project_out_ones(m) if self.input_norm == "layer" else m
        meta = {**self.meta, "target_layer": int(target)}
        meta.pop("targets", None)
        norms = meta.pop("target_row_norms", None)
        if isinstance(norms, dict) and isinstance(norms.get(str(target)), dict):
            meta["target_row_norms"] = norms[str(target)]
        return Statistics(self.n, self.mean_y[target], self.cyy[target], layers, self.input_norm, meta, self.n_rows)

    def release(self, target: int) -> None:
        """Free ``target``'s cross moments (its maps are solved)."""
        self.cxy.pop(target, None)

    def save(self, path, head=None) -> None:
        """Write every pair to one safetensors file, atomically: ``layers.{l}.mean_x``/``cxx`` per source,
        ``targets.{t}.mean_y``/``cyy``/``cxy`` per target; the ``meta`` JSON records ``target_layer = "all"``,
        ``targets`` and ``sources``."""
        tensors = count_tensors(self.n, self.n_rows)
        for l in self.sources:
            tensors.update({f"layers.{l}.mean_x": self.mean_x[l], f"layers.{l}.cxx": self.cxx[l]})
        for t in self.targets:
            if t not in self.cxy:
                raise NJTCError(f"target layer {t} was released before the statistics were saved")
            tensors.update({f"targets.{t}.mean_y": self.mean_y[t], f"targets.{t}.cyy": self.cyy[t],
                            f"targets.{t}.cxy": self.cxy[t]})
        meta = {**self.meta, "target_layer": "all", "targets": self.targets, "sources": self.sources}
        write_statistics(path, tensors, {"kind": PAIRS_KIND, "input_norm": self.input_norm, "meta": json.dumps(meta)},
                         head)


def _header(path):
    """The metadata of a statistics file and its ``meta`` JSON, checked (for an all-pairs file also
    ``sources``, ``targets`` and ``d_model``)."""
    if not Path(path).is_file():
        raise NJTCError(f"statistics file {path} not found")
    try:
        with safe_open(str(path), "pt") as f:
            info = f.metadata() or {}
    except Exception as err:
        raise NJTCError(f"{path} is not a readable safetensors file") from err
    if info.get("format") != "njtc-statistics":
        raise NJTCError(f"{path} is not an njtc statistics file")
    _, meta = checked_header(path, info)
    if info.get("kind") == PAIRS_KIND:
        for key in ("sources", "targets", "d_model"):
            if key not in meta:
                raise invalid(path, f"metadata meta has no '{key}'")
        if type(meta["d_model"]) is not int or meta["d_model"] < 1:
            raise invalid(path, f"metadata meta.d_model={meta['d_model']!r} is not a positive integer")
        for key in ("sources", "targets"):
            value = meta[key]
            if not (isinstance(value, list) and value and all(type(l) is int and l >= 0 for l in value)):
                raise invalid(path, f"metadata meta.{key}={value!r} is not a list of layer numbers")
    return info, meta


class _Lazy:
    """The tensors of an open safetensors file, read one at a time as they are checked."""

    def __init__(self, f):
        self.f, self.names = f, set(f.keys())

    def __contains__(self, name):
        return name in self.names

    def __getitem__(self, name):
        return self.f.get_tensor(name)

    def items(self):
        return ((name, self.f.get_tensor(name)) for name in sorted(self.names))


def _check_names(path, names, meta) -> None:
    """Every tensor of an all-pairs file is one its metadata names."""
    expected = {"n", "n_rows"} | {f"layers.{l}.{k}" for l in meta["sources"] for k in ("mean_x", "cxx")} \
        | {f"targets.{t}.{k}" for t in meta["targets"] for k in ("mean_y", "cyy", "cxy")}
    for name in sorted(names):
        if name not in expected and not name.startswith("head."):
            raise invalid(path, f"it holds an unexpected tensor {name}")


def check_pair_statistics(path, targets=None) -> None:
    """Check an all-pairs statistics file as :meth:`Statistics.load` checks a single-target one: every
    tensor of ``targets`` (default: all) and their sources present, of its shape, finite; read one at a time."""
    info, meta = _header(path)
    d, sources = meta["d_model"], meta["sources"]
    targets = meta["targets"] if targets is None else [int(t) for t in targets]
    with safe_open(str(path), "pt") as f:
        tensors = _Lazy(f)
        _check_names(path, tensors.names, meta)
        checked_counts(path, tensors)
        for l in sorted({l for l in sources if any(l < t for t in targets)}):
            checked_tensor(path, tensors, f"layers.{l}.mean_x", (d,))
            checked_tensor(path, tensors, f"layers.{l}.cxx", (d, d))
        for t in targets:
            k = sum(l < t for l in sources)
            checked_tensor(path, tensors, f"targets.{t}.mean_y", (d,))
            checked_tensor(path, tensors, f"targets.{t}.cyy", (d, d))
            checked_tensor(path, tensors, f"targets.{t}.cxy", (k * d, d))


def statistics_targets(path) -> list[int]:
    """The target layers a statistics file holds: every target of an all-pairs file, else its one."""
    info, meta = _header(path)
    if info.get("kind") == PAIRS_KIND:
        return [int(t) for t in meta["targets"]]
    if "target_layer" not in meta:
        raise NJTCError(f"{path} records no target layer; refit with `save_stats` to record it")
    return [int(meta["target_layer"])]


def load_head(path):
    """The model's head saved with a statistics file (``None`` where it was not), reading nothing else."""
    info, _ = _header(path)
    if info.get("kind") != PAIRS_KIND:
        return Statistics.load_head(path)
    if "head" not in info:
        return None
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith("head.")}
    return checked_head(path, tensors, info)


def load_target_statistics(path, target: int) -> Statistics:
    """One target's :class:`~njtc_solve.solve.stats.Statistics` from a statistics file (of an all-pairs
    file only that target's tensors and its sources' are read, each checked)."""
    info, meta = _header(path)
    held = statistics_targets(path)
    if int(target) not in held:
        raise NJTCError(f"{path} holds statistics for target layer{'s' if len(held) > 1 else ''} "
                        f"{','.join(map(str, held))}, not {target}")
    if info.get("kind") != PAIRS_KIND:
        return Statistics.load(path)
    target = int(target)
    d, sources = meta["d_model"], [l for l in meta["sources"] if l < target]
    with safe_open(str(path), "pt") as f:
        tensors = _Lazy(f)
        _check_names(path, tensors.names, meta)
        n, n_rows = checked_counts(path, tensors)
        get = lambda name, shape: checked_tensor(path, tensors, name, shape)
        pairs = PairStatistics(
            n, n_rows if n_rows is not None else int(n), {l: get(f"layers.{l}.mean_x", (d,)) for l in sources},
            {l: get(f"layers.{l}.cxx", (d, d)) for l in sources}, {target: get(f"targets.{target}.mean_y", (d,))},
            {target: get(f"targets.{target}.cyy", (d, d))},
            {target: get(f"targets.{target}.cxy", (len(sources) * d, d))}, info["input_norm"], meta)
    return pairs.for_target(target)


def accumulate_pairs(source, *, sources, targets, input_norm: str = "none", device="cpu", chunk_rows: int = 4096,
                     float64: bool = False, progress: bool = True, skip_positions: int | None = None) -> PairStatistics:
    """One pass over ``source``'s training rows: the statistics of every pair ``l < t`` of ``sources`` and
    ``targets``; the other settings as in :func:`~njtc_solve.solve.statistics_pass.accumulate_statistics`."""
    skip = source.default_skip_positions if skip_positions is None else int(skip_positions)
    acc = PairAccumulator(sources=sources, targets=targets, input_norm=input_norm, device=device, float64=float64)
    reading = sorted(set(acc.sources) | set(acc.targets))
    start = time.perf_counter()
    with training_bar(source, skip, "pair statistics", progress) as bar:
        for _, chunk in source.iter_chunks(reading, split="train", chunk_rows=chunk_rows, skip_positions=skip):
            acc.update(chunk)
            bar.update(len(chunk[reading[-1]]))
    n_pairs = len(pair_layers(sources=acc.sources, targets=acc.targets))
    meta = {**pass_meta(source, device=device, start=start, n_rows=acc.n_rows,
                        products=n_pairs + len(acc.sources) + len(acc.targets), skip_positions=skip),
            "d_model": source.d_model}
    pairs = acc.finalize(meta)
    check_finite_tensors([*pairs.cxx.values(), *pairs.cyy.values(), *pairs.cxy.values()])
    return pairs


def iter_fit_targets(pairs, *, targets, solve, release: bool = True):
    """Yield ``(target, solve(statistics of target))`` for each target of ``pairs`` (a
    :class:`PairStatistics`, or a file read one target at a time), freeing each target after."""
    for t in targets:
        stats = load_target_statistics(pairs, t) if not isinstance(pairs, PairStatistics) else pairs.for_target(t)
        stats.check_finite()
        fits = solve(stats)
        del stats
        if release and isinstance(pairs, PairStatistics):
            pairs.release(t)
        yield t, fits
