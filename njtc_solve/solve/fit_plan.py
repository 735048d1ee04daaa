"""A fit's plan before the long work: passes, memory, FLOPs and an estimated time, from a config alone.

:func:`plan_fit` reads the model's configuration or a store's metadata, splits the source layers
into passes as the fit will (:meth:`~njtc_solve.solve.fit.FitSpec.passes`), counts the FLOPs and
turns them into a time with rates measured now on the fit's device (:func:`measured_rates`).

Examples
--------
>>> from njtc_solve.solve.fit import FitSpec
>>> plan = FitSpec(method="njtc", chunk_rows=64, max_memory="150kB").plan(store="activations.h5")
>>> plan.d_model, plan.passes
(32, ((0,), (1,), (2,)))
>>> print(plan)  # doctest: +ELLIPSIS
fit plan: njtc, target layer 3, 3 source layers of activations.h5 (d = 32, 3 layers)
...
  passes: 3 (1 + 1 + 1 source layers: 0 | 1 | 2), one read of the store each
...
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.models import MODEL_DTYPES, model_shape
from njtc_solve.data.store import opened
from njtc_solve.solve.budget import (FREE_FRACTION, accumulator_bytes, default_budget, format_size, pair_pass_bytes,
                                     pass_bytes)
from njtc_solve.solve.pair_statistics import pair_layers
from njtc_solve.solve.solvers import gram_eigh, solve_reduced_rank
from njtc_solve.solve.stats import GEMM_ROWS, MomentAccumulator, highest_float32_matmul

__all__ = ["FitPlan", "measured_rates", "plan_fit"]


@dataclass(frozen=True)
class FitPlan:
    """What a fit will do and roughly how long it will take; ``str(plan)`` is the readable plan.

    Attributes
    ----------
    target : int or "all"
    passes : tuple of tuple of int
        Per pass over the rows, its source layers (its target layers for ``target="all"``).
    budget_bytes, budget_from : int, str
        Bytes a pass's statistics may take, and where that number comes from.
    pass_bytes, accumulator_bytes : int
        Peak bytes of the largest pass; of every source layer's accumulator at once.
    n_params, weights_bytes : int or None
        The model's parameters and their bytes (``None`` for a store).
    tokens : int or None
        Training rows the pass reads (``None``: unknown; the times are then per million tokens).
    statistics_flops, forward_flops : float
        FLOPs per token over all passes.
    gemm_flops_per_s, statistics_flops_per_s : float
        The float32 GEMM and statistics rates measured now (:func:`measured_rates`).
    solve_s : float
        The solves' time, extrapolated by ``d³`` from a measured one.
    """

    source: str
    method: str
    target: int | str
    d_model: int
    n_layers: int
    layers: tuple
    passes: tuple
    budget_bytes: int
    budget_from: str
    pass_bytes: int
    accumulator_bytes: int
    n_params: int | None
    weights_bytes: int | None
    weights_dtype: str
    live: bool
    tokens: int | None
    statistics_flops: float
    forward_flops: float
    gemm_flops_per_s: float
    statistics_flops_per_s: float
    rate_width: int
    solve_s: float
    solve_from: str
    device: str
    accumulation: str = "float32"

    @property
    def pass_seconds(self) -> float:
        """Estimated seconds of the passes over ``tokens`` rows (a million where unknown)."""
        tokens = self.tokens if self.tokens is not None else 1_000_000
        return tokens * (self.statistics_flops / self.statistics_flops_per_s
                         + self.forward_flops / self.gemm_flops_per_s)

    @property
    def seconds(self) -> float:
        """Estimated seconds of the whole fit: the passes (:attr:`pass_seconds`) and the solves."""
        return self.pass_seconds + self.solve_s

    def as_dict(self) -> dict:
        """The plan's fields and its estimates, for JSON."""
        from dataclasses import asdict

        return {**asdict(self), "pass_seconds": self.pass_seconds, "seconds": self.seconds}

    def __str__(self) -> str:
        what = "target layers" if self.target == "all" else "source layers"
        sizes = " + ".join(str(len(p)) for p in self.passes)
        ranges = " | ".join(_ranges(p) for p in self.passes)
        reads = "one forward pass of the model each" if self.live else "one read of the store each"
        tokens = "per million tokens" if self.tokens is None else f"{self.tokens:,} training tokens"
        lines = [f"fit plan: {self.method}, target layer {self.target}, {len(self.layers)} source layers of "
                 f"{self.source} (d = {self.d_model}, {self.n_layers} layers)"]
        if self.n_params is not None:
            lines.append(f"  weights: {self.n_params / 1e9:.2f} B parameters, {format_size(self.weights_bytes)} "
                         f"in {self.weights_dtype}")
        lines += [
            f"  memory budget: {format_size(self.budget_bytes)} ({self.budget_from})",
            f"  passes: {len(self.passes)} ({sizes} {what}: {ranges}), {reads}",
            f"  statistics: {format_size(self.pass_bytes)} at the peak of the largest pass (float64 accumulators, "
            f"their centred copy and one chunk of rows, {self.accumulation} GEMMs); "
            f"{format_size(self.accumulator_bytes)} of accumulators for every layer at once",
            f"  FLOPs per token: statistics {self.statistics_flops:.3g}" + (
                f", forward {self.forward_flops:.3g} (2 x parameters x {len(self.passes)} "
                f"pass{'es' if len(self.passes) > 1 else ''})" if self.live else ""),
            f"  estimated time ({tokens}): {_duration(self.seconds)} = passes {_duration(self.pass_seconds)} + "
            f"solves {_duration(self.solve_s)}",
            f"    measured on {self.device} now at width {self.rate_width}: statistics "
            f"{self.statistics_flops_per_s / 1e9:.0f} GFLOP/s, float32 GEMM {self.gemm_flops_per_s / 1e9:.0f} GFLOP/s "
            "(the forward pass's rate: a lower bound on its time)",
            f"    solves: extrapolated by d^3 from {self.solve_from}, likely high (larger solves run nearer peak)",
            "    not counted: " + ("tokenizing, loading and hashing the weights" if self.live else
                                   "reading and decoding the store") + "; GEMMs run below peak at other shapes",
        ]
        return "\n".join(lines)


def _ranges(layers) -> str:
    """``0-26`` for consecutive layers, else a comma list."""
    layers = list(layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _duration(seconds: float) -> str:
    """``seconds`` in s, min or h."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


@functools.cache
def measured_rates(device: str = "cpu", d: int = 1024, solve_d: int = 512,
                   input_norm: str = "layer", float64: bool = False) -> tuple[float, float, float]:
    """``(float32 GEMM FLOP/s, statistics FLOP/s, seconds of one layer's solve at width solve_d)`` measured
    once per process on ``device``: a GEMM ``Xᵀ[X | Y]`` of width ``d``, one layer's
    :meth:`~njtc_solve.solve.stats.MomentAccumulator.update`, and a solve on random statistics."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    x = torch.randn(GEMM_ROWS, 2 * d, device=device)
    with highest_float32_matmul():
        x[:, :d].T @ x  # warm-up
        sync()
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < 0.3 or calls < 3:
            x[:, :d].T @ x
            calls += 1
            sync()
        gemm = 2.0 * GEMM_ROWS * d * 2 * d * calls / (time.perf_counter() - start)
    acc = MomentAccumulator([0], input_norm, device, float64=float64)  # the fit's GEMM type
    acc.update({0: x[:, :d]}, x[:, d:])  # warm-up, allocation
    best = float("inf")
    for _ in range(3):
        sync()
        start = time.perf_counter()
        acc.update({0: x[:, :d]}, x[:, d:])
        sync()
        best = min(best, time.perf_counter() - start)
    statistics = 3 * 2.0 * GEMM_ROWS * d * d / best
    a = torch.randn(4 * solve_d, solve_d, dtype=torch.float64, device=device)
    cxx, cxy = a.T @ a, a.T @ torch.randn(4 * solve_d, solve_d, dtype=torch.float64, device=device)
    solve_reduced_rank(cxx, cxy, eigh=gram_eigh(cxx)).factors(8)  # warm-up
    sync()
    start = time.perf_counter()
    solve_reduced_rank(cxx, cxy, eigh=gram_eigh(cxx)).factors(8)
    sync()
    return gemm, statistics, time.perf_counter() - start


def plan_fit(spec, *, model: str | None = None, store=None, tokens: int | None = None,
             model_dtype: str = "float32", trust_remote_code: bool = False, save_stats=None) -> FitPlan:
    """The plan of the fit ``spec`` (a :class:`~njtc_solve.solve.fit.FitSpec`) without doing it; refuses
    what the fit would refuse once it knows the width and the budget.

    Parameters
    ----------
    spec : FitSpec
    model : str, optional
        A live fit's model (``None`` with no ``store``: the default model); only its configuration is read.
    store : str, path or row source, optional
        A store fit: its width, layers and training rows from its metadata.
    tokens : int, optional
        Training rows of a live fit (default: unknown; the times are then per million tokens).
    model_dtype : str
        The parameter type the model loads in.
    trust_remote_code : bool
    save_stats : str or path, optional
        The fit's ``save_stats``.
    """
    if model is not None and store is not None:
        raise NJTCError("plan a fit of a model or of a store, not both")
    if model_dtype not in MODEL_DTYPES:
        raise NJTCError(f"`model_dtype` must be one of {', '.join(MODEL_DTYPES)}, not {model_dtype!r}")
    if tokens is not None and tokens < 1:
        raise NJTCError("`tokens` must be positive")
    live = store is None
    if live:
        shape = model_shape(model, trust_remote_code=trust_remote_code)
        source, d, n_layers, held = shape.name, shape.d_model, shape.n_layers, list(range(shape.n_layers + 1))
        n_params = shape.n_params
        weights = n_params * MODEL_DTYPES[model_dtype].itemsize
    else:
        with opened(store) as rows:
            source, d, n_layers = str(rows.path), rows.d_model, rows.n_layers
            held = list(getattr(rows, "layers", range(n_layers + 1)))
            skip = rows.default_skip_positions if spec.skip_positions is None else spec.skip_positions
            tokens = rows.count("train", skip)
            if spec.layers is not None:
                rows.check_layers(spec.layers)
        n_params = weights = None
    every = spec.target_layer == "all"
    target = n_layers if spec.target_layer is None or every else int(spec.target_layer)
    if not every and not 1 <= target <= n_layers:
        raise NJTCError(f"`target_layer` {target} is out of range (1..{n_layers})")
    layers = [l for l in held if l < target] if spec.layers is None else list(spec.layers)
    if not every and any(l >= target for l in layers):
        raise NJTCError(f"source layer {max(layers)} is not below the target layer {target}")
    if spec.max_memory is not None:
        budget, budget_from = spec.max_memory, "as given"
    else:
        free = default_budget(spec.device)
        on_device = live and weights is not None
        budget = free - (weights if on_device else 0)
        budget_from = f"{FREE_FRACTION:.0%} of the free memory of {spec.device} now" + (
            f", less the weights' {format_size(weights)}" if on_device else "")
        if budget < 1:
            raise NJTCError(f"the weights ({format_size(weights)}) do not fit in {FREE_FRACTION:.0%} of the free memory "
                            f"of {spec.device} ({format_size(free)}): give `max_memory` to plan for another machine")
    gemm, statistics_rate, solve_small = measured_rates(str(spec.device), min(d, 1024), min(d, 512),
                                                        "layer" if spec.normalize == "layer" else "none", spec.float64)
    solve_one = solve_small * (d / min(d, 512)) ** 3
    sizes = {"chunk_rows": spec.chunk_rows, "float64": spec.float64}
    if every:
        targets = [t for t in held if t > min(layers)]
        passes = spec.passes(d, layers, targets=targets, budget=budget, save_stats=save_stats)
        peak = max(pair_pass_bytes(layers, p, d, **sizes) for p in passes)
        products = sum(len(pair_layers(sources=[l for l in layers if l < max(p)], targets=p))
                       + sum(l < max(p) for l in layers) + len(p) for p in passes)
        n_solves = len(pair_layers(sources=layers, targets=targets))
        all_bytes = pair_pass_bytes(layers, targets, d)
    else:
        passes = spec.passes(d, layers, budget=budget, save_stats=save_stats)
        peak = max(pass_bytes(len(p), d, one_jump=bool(spec.one_jump), **sizes) for p in passes)
        products = 2 * len(layers) + len(passes)  # [x | y]ᵀx per source layer, yᵀy once per pass
        n_solves = len(layers)
        all_bytes = accumulator_bytes(len(layers), d)
    return FitPlan(
        source=source, method=spec.method, target="all" if every else target, d_model=d, n_layers=n_layers,
        layers=tuple(layers), passes=tuple(tuple(p) for p in passes), budget_bytes=int(budget),
        budget_from=budget_from, pass_bytes=peak, accumulator_bytes=all_bytes, n_params=n_params,
        weights_bytes=weights, weights_dtype=model_dtype, live=live, tokens=tokens,
        statistics_flops=2.0 * d * d * products, forward_flops=2.0 * n_params * len(passes) if live else 0.0,
        gemm_flops_per_s=gemm, statistics_flops_per_s=statistics_rate, rate_width=min(d, 1024),
        solve_s=solve_one * n_solves, solve_from=f"one solve at d = {min(d, 512)} ({solve_small * 1e3:.1f} ms)",
        device=str(spec.device), accumulation="float64" if spec.float64 else "float32")
