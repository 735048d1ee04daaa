"""Stage 2: fit shortcut maps in closed form from one streaming pass over a store or a model.

Command line::

    python -m njtc_solve.fit --rank 32                       # N-NJTC (LayerNorm), all layers
    python -m njtc_solve.fit --method njtc --rank 8,16,32,64 # one file per rank, one pass
    python -m njtc_solve.fit --method jtc --alpha auto       # full maps, ridge by GCV
    python -m njtc_solve.fit --model gpt2-xl --max-tokens 1000000 --save-stats s.safetensors  # no store
    python -m njtc_solve.fit --stats s.safetensors --method njtc --rank 64                 # no rows at all
    python -m njtc_solve.fit --model M --max-memory 40GB --dry-run  # the plan: passes, memory, time (config only)

Methods: ``jtc`` (full least squares), ``njtc`` (reduced rank), ``nnjtc`` (reduced rank on
normalised inputs: ``--normalize layer`` (default), ``rms`` or ``batch``). ``--residual`` fits
identity plus a low-rank correction; ``--weight logits`` measures the error in logit space.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from numbers import Integral, Real
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.params import BOOLEAN, DEVICE, Check, Interval, ListOf, Options, check_spec
from njtc_solve.data.store import opened
from njtc_solve.maps.shortcuts import Shortcuts
from njtc_solve.solve.budget import (check_budget, default_budget, join_layers, layer_groups, merge_fits,
                                     target_groups)
from njtc_solve.solve.pair_statistics import accumulate_pairs, check_pair_statistics, iter_fit_targets
from njtc_solve.solve.saved_statistics import check_fit_inputs, check_input_norm, pair_file, saved_statistics
from njtc_solve.solve.solvers import fitted_map, gram_eigh, solve_ranks, sum_squared_error, train_record, weight_root
from njtc_solve.solve.statistics_pass import store_statistics
from njtc_solve.solve.stats import Statistics, uncentred

__all__ = [
    "METHODS",
    "FitSpec",
    "check_method",
    "check_sources",
    "check_target",
    "fit_all_targets",
    "fit_from_statistics",
    "fit_shortcuts",
    "row_norm_warning",
]


METHODS = ("jtc", "njtc", "nnjtc")


def _check_alpha(alpha) -> bool:
    """A ridge penalty: a finite number, 0 or more, or ``"auto"`` (generalised cross-validation)."""
    if alpha == "auto":
        return True
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        raise NJTCError(f"`alpha` must be a number or auto, not {alpha!r}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise NJTCError("`alpha` must be a non-negative number")
    return True


@dataclass(frozen=True)
class FitSpec:
    """The settings of one fit, checked when made; what needs the data (a rank above the width, a
    layer the store lacks) is checked once the data are open. ``ranks`` and ``normalize`` hold their
    completed values (:func:`check_method`).

    Parameters
    ----------
    method : {"jtc", "njtc", "nnjtc"}
    ranks : sequence of int, optional
        Ranks of the narrow maps, all from one decomposition (default: 32; ``(None,)`` for jtc).
    layers : sequence of int, optional
        Source layers (default: every layer below the target).
    normalize : {"none", "batch", "layer", "rms"}, optional
        Input normalisation (default ``layer`` for nnjtc, else ``none``).
    residual : bool
        Fit identity plus a low-rank correction.
    fit_intercept : bool
    alpha : float or "auto"
        Ridge penalty (finite, 0 or more), or generalised cross-validation per layer.
    weight : {"none", "logits"}
        ``logits`` measures the error in logit space (the last layer's target only).
    device : str
        Where the statistics and the solve live.
    target_layer : int, "all" or None
        The layer the maps predict (default: the last); ``"all"``: every layer above a source
        (:meth:`fit_all_targets`).
    skip_positions : int, optional
        Leave out rows at positions below this (default: the store's).
    chunk_rows : int
        Rows per streamed chunk.
    float64 : bool
        Accumulate with float64 GEMMs.
    max_memory : int or str, optional
        Bytes (or a size such as ``"40GB"``) the statistics of one pass may take on ``device``
        (default: its free memory); more layers than fit run in several passes
        (:mod:`njtc_solve.solve.budget`), with the same maps.
    one_jump : {None, True, "pooled", "select"}
        One map shared by every source layer (:mod:`njtc_solve.solve.one_jump`): ``"pooled"``
        (``True``) solves it on the stacked rows of all layers, ``"select"`` picks the per-layer
        map whose loss over all layers is lowest.

    Examples
    --------
    >>> FitSpec(method="njtc", ranks=[8, 16]).ranks
    (8, 16)
    >>> FitSpec(method="jtc").ranks, FitSpec().normalize
    ((None,), 'layer')
    """

    method: str = "nnjtc"
    ranks: tuple | None = None
    layers: tuple | None = None
    normalize: str | None = None
    residual: bool = False
    fit_intercept: bool = True
    alpha: float | str = 0.0
    weight: str = "none"
    device: str = "cpu"
    target_layer: int | str | None = None
    skip_positions: int | None = None
    chunk_rows: int = 4096
    float64: bool = False
    max_memory: int | str | None = None
    one_jump: bool | str | None = None

    constraints: ClassVar[dict] = {
        "method": [Options(METHODS)],  # check_method refuses it first, and checks ranks and normalize with it
        "layers": [None, ListOf(Interval(int, 0, None),
                                says="a list of layer indices (whole numbers, 0 or more)")],
        "residual": [BOOLEAN],
        "fit_intercept": [BOOLEAN],
        "alpha": [Check(_check_alpha, says="a non-negative number or auto", invalid=-1.0)],
        "weight": [Options(("none", "logits"), says="none or logits", show_value=False)],
        "device": [DEVICE],
        "target_layer": [None, Check(lambda t: t == "all" or (isinstance(t, Integral) and not isinstance(t, bool)),
                                     says="a layer number or all", invalid="last")],
        "skip_positions": [None, Interval(int, 0, None, says="0 or more", show_value=False)],
        "chunk_rows": [Interval(int, 1, None, says="positive", show_value=False)],
        "float64": [BOOLEAN],
    }

    def __post_init__(self):
        method, ranks, normalize = check_method(self.method, self.ranks, self.normalize)
        check_spec(self)
        if self.residual and normalize in ("layer", "rms"):
            raise NJTCError("`residual=True` works with `normalize` none or batch")
        target = self.target_layer
        if self.weight == "logits" and target == "all":
            raise NJTCError("`weight` logits needs the last layer as the target (only it has a head); "
                            "`target_layer` all fits intermediate targets too")
        one_jump = _one_jump_mode(self.one_jump, target, self.layers)
        set_ = lambda name, value: object.__setattr__(self, name, value)  # completing a frozen instance
        set_("max_memory", check_budget(self.max_memory))
        set_("ranks", tuple(None if r is None else int(r) for r in ranks))
        twice = sorted({r for r in self.ranks if self.ranks.count(r) > 1}, key=str)
        if twice:
            raise NJTCError(f"`ranks` lists {', '.join(map(str, twice))} more than once; give each rank once")
        set_("normalize", normalize)
        set_("one_jump", one_jump)
        set_("alpha", "auto" if self.alpha == "auto" else float(self.alpha))
        if self.layers is not None:
            set_("layers", tuple(int(l) for l in self.layers))
        if target not in (None, "all"):
            set_("target_layer", int(target))

    def plan(self, *, model: str | None = None, store=None, tokens: int | None = None,
             model_dtype: str = "float32", trust_remote_code: bool = False, save_stats=None):
        """The plan of this fit, without doing it (:func:`njtc_solve.solve.fit_plan.plan_fit`)."""
        from njtc_solve.solve.fit_plan import plan_fit

        return plan_fit(self, model=model, store=store, tokens=tokens, model_dtype=model_dtype,
                        trust_remote_code=trust_remote_code, save_stats=save_stats)

    def memory_budget(self, comm=None) -> int:
        """Bytes the statistics of one pass may take: ``max_memory``, else the default budget of ``device``
        (the least over the processes of ``comm``, so that all split the layers alike)."""
        if self.max_memory is not None:
            return self.max_memory
        return default_budget(self.device) if comm is None else comm.minimum(default_budget(self.device))

    def passes(self, d: int, sources, *, budget: int, targets=None, save_stats=None) -> list[list[int]]:
        """The source layers (with ``targets``: the targets) of each pass over rows of width ``d`` within
        ``budget`` bytes; refuses a rank above ``d``, and ``save_stats`` or ``one_jump`` in several passes."""
        self.check_width(d)
        sizes = {"chunk_rows": self.chunk_rows, "float64": self.float64}
        if targets is not None:
            passes = target_groups(sources, targets, d, budget, **sizes)
            if len(passes) > 1 and save_stats is not None:
                raise NJTCError(f"`save_stats` keeps every pair's statistics at once, and `max_memory` holds "
                                f"{len(passes[0])} of {len(targets)} targets per pass: raise `max_memory`")
            return passes
        passes = layer_groups(sources, d, budget, one_jump=bool(self.one_jump), **sizes)
        if len(passes) > 1 and save_stats is not None:
            raise NJTCError(f"`save_stats` keeps every layer's statistics at once, and `max_memory` holds "
                            f"{len(passes[0])} of {len(sources)} layers per pass: raise `max_memory` or fit fewer "
                            "`layers`")
        if len(passes) > 1 and self.one_jump:
            raise NJTCError(f"`one_jump` solves from every layer's statistics at once, and `max_memory` holds "
                            f"{len(passes[0])} of {len(sources)} layers per pass: raise `max_memory` or fit fewer "
                            "`layers`")
        return passes

    @property
    def row_weight(self) -> str:
        """The row weighting of the statistics this fit needs: ``inv_sigma2`` for ``weight="logits"``."""
        return "inv_sigma2" if self.weight == "logits" else "none"

    @property
    def input_norm(self) -> str:
        """The per-token normalisation of the statistics' source rows."""
        return self.normalize if self.normalize in ("layer", "rms") else "none"

    def check_width(self, d: int | None) -> None:
        """Refuse a rank above the width ``d`` of the rows (``None``: unknown, nothing to check)."""
        for r in self.ranks:
            if d is not None and r is not None and r > d:
                raise NJTCError(f"`ranks`: rank {r} is out of range (1..{d})")

    def fit(self, store=None, *, statistics=None, save_stats=None, progress: bool = True,
            comm=None) -> list[Shortcuts]:
        """:func:`fit_shortcuts` with these settings: one :class:`Shortcuts` per rank."""
        if self.target_layer == "all":
            raise NJTCError("`target_layer` all gives one fit per target: use fit_all_targets")
        return _fit_shortcuts(self, store, statistics=statistics, save_stats=save_stats, progress=progress,
                              comm=comm)

    def fit_all_targets(self, store=None, *, statistics=None, save_stats=None, progress: bool = True,
                        check_outputs=None):
        """:func:`fit_all_targets` with these settings (``target_layer`` ``None`` or ``"all"``)."""
        if self.target_layer not in (None, "all"):
            raise NJTCError(f"`target_layer` {self.target_layer}: fit_all_targets fits every target")
        return _fit_all_targets(self, store, statistics=statistics, save_stats=save_stats, progress=progress,
                                check_outputs=check_outputs)


def _one_jump_mode(one_jump, target, layers) -> str | None:
    """``one_jump`` completed (``None``, ``"pooled"`` or ``"select"``)."""
    if one_jump not in (None, False, True, "pooled", "select"):
        raise NJTCError(f"`one_jump` must be true, pooled or select, not {one_jump!r}")
    mode = "pooled" if one_jump is True else one_jump or None
    if mode and target == "all":
        raise NJTCError("`one_jump` fits one map for the source layers of one target; `target_layer` all fits "
                        "every target on its own")
    if mode and layers is not None:
        check_one_jump_layers(layers)
    return mode


def check_one_jump_layers(layers) -> None:
    """Refuse a one jump over a single source layer: it is the ordinary fit."""
    if len(set(layers)) == 1:
        raise NJTCError(f"`one_jump` with one source layer ({layers[0]}) is the ordinary fit: drop `one_jump`")


def _prepare(stats: Statistics, layer: int, normalize: str, residual: bool, fit_intercept: bool):
    """``(gxx, gxt, gtt, mean_x, mean_t, norm_mean, norm_scale)`` of the regression solved: ``x`` the
    normalised input, ``t`` the target (``y``, or ``y - x`` for residual maps)."""
    m = stats.layers[layer]
    n = stats.n
    cxx, cxy, mean_x = m.cxx, m.cxy, m.mean_x
    cov_x_raw = cxx  # covariance of the normalised input with the raw input (residual maps)
    norm_mean = norm_scale = None
    if normalize == "batch":
        std = (torch.diagonal(cxx) / n).clamp_min(0).sqrt()
        scale = torch.where(std > 1e-12 * std.max(), 1.0 / std, torch.zeros_like(std))
        cov_x_raw = scale[:, None] * cxx
        cxx, cxy = cov_x_raw * scale[None, :], scale[:, None] * cxy
        norm_mean, norm_scale, mean_x = m.mean_x, scale, torch.zeros_like(mean_x)
    cxt, ctt, mean_t = cxy, stats.cyy, stats.mean_y
    if residual:
        cxt = cxy - cov_x_raw
        ctt = stats.cyy - m.cxy - m.cxy.T + m.cxx
        mean_t = stats.mean_y - m.mean_x
    if not fit_intercept:
        cxx, cxt, ctt = uncentred(n, mean_x, mean_t, cxx, cxt, ctt)
    return cxx, cxt, ctt, mean_x, mean_t, norm_mean, norm_scale


def fit_from_statistics(stats: Statistics, *, method: str = "nnjtc", ranks: list[int] | None = (32,),
                        layers: list[int] | None = None, normalize: str | None = None, residual: bool = False,
                        weight_factor: torch.Tensor | None = None, fit_intercept: bool = True,
                        alpha: float | str = 0.0, progress: bool = False,
                        one_jump: bool | str | None = None) -> list[Shortcuts]:
    """Solve shortcut maps from statistics; one :class:`Shortcuts` per rank.

    Parameters
    ----------
    stats : Statistics
        From :func:`~njtc_solve.solve.statistics_pass.accumulate_statistics` (its ``input_norm``
        must match ``normalize``).
    method, ranks, layers, normalize, residual, fit_intercept, alpha, one_jump
        As in :class:`FitSpec` (``layers`` default: all in ``stats``).
    weight_factor : Tensor (d, m), optional
        Measure errors as ``‖e G‖²`` (:meth:`njtc_solve.core.head.Head.logit_weight_factor`).
    progress : bool
        Show a bar over the layers' solves.
    """
    spec = FitSpec(method=method, ranks=ranks, layers=layers, normalize=normalize, residual=residual,
                   fit_intercept=fit_intercept, alpha=alpha, one_jump=one_jump)
    spec.check_width(stats.meta.get("d_model"))
    check_input_norm(stats.input_norm, spec.normalize)
    stats.check_finite()
    if spec.one_jump:
        return _fit_one_jump(stats, spec, layers=sorted(stats.layers) if layers is None else list(spec.layers),
                             weight_factor=weight_factor)
    return _fit_statistics(stats, spec, layers=spec.layers, weight_factor=weight_factor, progress=progress)


def _fit_statistics(stats: Statistics, spec: FitSpec, *, layers, weight_factor, progress=False,
                    decompositions: dict | None = None) -> list[Shortcuts]:
    """:func:`fit_from_statistics` on statistics checked against ``spec``; ``decompositions`` keeps each
    source layer's :func:`~njtc_solve.solve.solvers.gram_eigh` for another target of the same pass."""
    layers = sorted(stats.layers) if layers is None else layers
    weight = None if weight_factor is None else weight_root(weight_factor.to(stats.cyy.device))
    _check_has_layers(stats, layers)
    outputs = {r: {} for r in spec.ranks}
    records = {r: {} for r in spec.ranks}
    for layer in tqdm(layers, desc="solve", unit="layer", leave=False, disable=not progress):
        solved = _solve_layer(stats, layer, ranks=spec.ranks, normalize=spec.normalize, residual=spec.residual,
                              weight=weight, fit_intercept=spec.fit_intercept, alpha=spec.alpha,
                              decompositions={} if decompositions is None else decompositions)
        for rank, (shortcut_map, record) in solved.items():
            outputs[rank][layer], records[rank][layer] = shortcut_map, record
    return [_shortcuts(stats, spec, rank=r, maps=outputs[r], records=records[r],
                       weight="none" if weight_factor is None else "logits")
            for r in spec.ranks]


def _check_has_layers(stats: Statistics, layers) -> None:
    """Refuse a source layer the statistics lack."""
    missing = [l for l in layers if l not in stats.layers]
    if missing:
        raise NJTCError(f"the statistics have no layer {missing[0]} (they have {sorted(stats.layers)})")


def _solve_layer(stats: Statistics, layer: int, *, ranks, normalize, residual, weight, fit_intercept, alpha,
                 decompositions: dict) -> dict:
    """``{rank: (ShortcutMap, record)}`` of one source layer, every rank from one decomposition."""
    start = time.perf_counter()
    gxx, gxt, gtt, mean_x, mean_t, norm_mean, norm_scale = _prepare(stats, layer, normalize, residual, fit_intercept)
    if layer not in decompositions:
        decompositions[layer] = gram_eigh(gxx)
    layer_alpha, solved = solve_ranks(gxx, gxt, gtt, mean_x, mean_t, ranks=ranks, alpha=alpha, n_rows=stats.n_rows,
                                      fit_intercept=fit_intercept, weight=weight, eigh=decompositions[layer])
    solve_s = time.perf_counter() - start
    total_var = float(torch.trace(stats.cyy))
    for rank, (coef, bias, u, v) in solved.items():
        sse = max(sum_squared_error(coef, gxx, gxt, gtt), 0.0)
        shortcut_map = fitted_map(u, v, bias, norm_mean, norm_scale, normalize=normalize, residual=residual)
        solved[rank] = (shortcut_map, train_record(shortcut_map, sse, n=stats.n, total_var=total_var,
                                                   alpha=layer_alpha, solve_s=solve_s, n_train=stats.n_rows))
    return solved


def _shortcuts(stats: Statistics, spec: FitSpec, *, rank, maps, records, weight) -> Shortcuts:
    """The maps of one rank with the fit's settings, training records and the statistics' provenance."""
    meta = stats.meta
    timing = ("seconds", "rows_per_s", "gflops", "device", "accumulation")
    fit_stats = {"layers": records, "accumulation": {k: meta.get(k) for k in timing},
                 **({"n_layers": int(meta["n_layers"])} if "n_layers" in meta else {}),
                 **({"target_row_norms": meta["target_row_norms"]}
                    if isinstance(meta.get("target_row_norms"), dict) else {})}
    return Shortcuts(spec.method, maps, target_layer=int(meta.get("target_layer", -1)),
                     model_sha256=meta.get("model_sha256", ""), rank=rank, normalize=spec.normalize,
                     residual=spec.residual, fit_intercept=spec.fit_intercept, alpha=spec.alpha, weight=weight,
                     stats=fit_stats, provenance=meta.get("provenance", {}))


def check_method(method: str, ranks, normalize: str | None, d: int | None = None) -> tuple[str, list, str]:
    """Refuse a method, rank list or normalization that cannot be fitted; return them completed.

    ``ranks`` defaults to ``[32]`` (``[None]``, full, for ``jtc``), ``normalize`` to ``"layer"`` for
    ``nnjtc``; with the width ``d`` each rank must lie in ``1..d``.

    Examples
    --------
    >>> check_method("nnjtc", None, None)
    ('nnjtc', [32], 'layer')
    """
    if method not in METHODS:
        raise NJTCError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "jtc":
        if ranks not in (None, [None], (None,)):
            raise NJTCError("jtc fits full-rank maps; drop `ranks` (or use `method` njtc)")
        ranks = [None]
    else:
        ranks = list(ranks) if ranks is not None else [32]
        for r in ranks:
            if r is not None and (isinstance(r, bool) or not isinstance(r, Integral)):
                raise NJTCError(f"`ranks`: rank {r!r} is not a whole number")
            if r is None or r <= 0 or (d is not None and r > d):
                raise NJTCError(f"`ranks`: rank {r} is out of range (1..{d if d else 'd'})")
    if normalize is None:
        normalize = "layer" if method == "nnjtc" else "none"
    if normalize not in ("none", "batch", "layer", "rms"):
        raise NJTCError(f"unknown normalization {normalize!r}; choose none, batch, layer or rms")
    if method == "njtc" and normalize != "none":
        raise NJTCError("njtc has no input normalization; use `method` nnjtc")
    if method == "nnjtc" and normalize == "none":
        raise NJTCError("nnjtc needs `normalize` batch, layer or rms")
    return method, ranks, normalize


def fit_shortcuts(store=None, *, method: str = "nnjtc", ranks: list[int] | None = None,
                  layers: list[int] | None = None, normalize: str | None = None, residual: bool = False,
                  weight: str = "none", fit_intercept: bool = True, alpha: float | str = 0.0, device: str = "cpu",
                  statistics=None, save_stats=None, chunk_rows: int = 4096, float64: bool = False,
                  progress: bool = True, comm=None, skip_positions: int | None = None,
                  target_layer: int | None = None, max_memory: int | str | None = None,
                  one_jump: bool | str | None = None) -> list[Shortcuts]:
    """Fit shortcuts of ``method`` in closed form; one :class:`Shortcuts` per rank.

    The rows come from ``store`` (an activation store, its path, or a live model's
    :class:`~njtc_solve.data.live.LiveSource`), read once, or from none when ``statistics`` (saved by
    an earlier fit's ``save_stats``, with the model's head and provenance) is given. The settings are
    :class:`FitSpec`'s; the pass is :func:`~njtc_solve.solve.statistics_pass.accumulate_statistics`.
    Under a distributed run (``comm``) each process reads its share of the rows and solves its share
    of the layers; rank 0 returns them all, the others an empty list.

    Examples
    --------
    >>> fits = fit_shortcuts("activations.h5", method="njtc", ranks=[2, 8], progress=False,
    ...                      save_stats="stats.safetensors")
    >>> [sc.name for sc in fits], tuple(fits[1].maps[1].U.shape)
    (['njtc-r2', 'njtc-r8'], (32, 8))
    >>> fits[1].save("njtc-r8.safetensors")
    >>> [r4] = fit_shortcuts(method="njtc", ranks=[4], statistics="stats.safetensors")  # no rows read
    >>> r4.provenance == fits[0].provenance
    True
    """
    spec = FitSpec(method=method, ranks=ranks, layers=layers, normalize=normalize, residual=residual, weight=weight,
                   fit_intercept=fit_intercept, alpha=alpha, device=device, target_layer=target_layer,
                   skip_positions=skip_positions, chunk_rows=chunk_rows, float64=float64, max_memory=max_memory,
                   one_jump=one_jump)
    return spec.fit(store, statistics=statistics, save_stats=save_stats, progress=progress, comm=comm)


def _fit_shortcuts(spec: FitSpec, store, *, statistics, save_stats, progress, comm) -> list[Shortcuts]:
    """:meth:`FitSpec.fit`: the checks that need the data, the pass (or the saved statistics), the solve."""
    with opened(store) as store:
        check_fit_inputs(store, statistics=statistics, save_stats=save_stats)
        layers = None if spec.layers is None else list(spec.layers)
        stats = None
        if store is None:
            stats, head = saved_statistics(statistics, spec, spec.target_layer)
            d_model = int(stats.meta.get("d_model", stats.cyy.shape[0]))
            target = int(stats.meta.get("target_layer", -1))
            layers = sorted(stats.layers) if layers is None else check_sources(layers, target)
            last = int(stats.meta.get("n_layers", target))
        else:
            d_model, head, last = store.d_model, store.head(), store.n_layers
            target = check_target(spec.target_layer, store.n_layers)
            store.check_layers([target])
            layers = ([l for l in store.source_layers if l < target] if layers is None
                      else check_sources(store.check_layers(layers), target))
        if spec.weight == "logits" and target != last:
            raise NJTCError(f"`weight` logits needs the last layer ({last}) as the target: only it has a head "
                            f"(the target here is {target})")
        spec.check_width(d_model)
        if not layers:
            raise NJTCError("no source layer to fit (the store holds the target layer alone?)")
        if spec.one_jump:
            check_one_jump_layers(layers)
        if spec.weight == "logits" and head is None:
            raise NJTCError("`weight` logits needs the model's head, and these statistics were saved without it")
        passes = [layers] if store is None or statistics is not None else \
            spec.passes(d_model, layers, budget=spec.memory_budget(comm), save_stats=save_stats)
        factor = head.logit_weight_factor() if spec.weight == "logits" else None
        first = comm is None or comm.rank == 0

        def solve(stats, share):
            if save_stats is not None and first:
                stats.save(save_stats, head)
            solved = _fit_statistics(stats, spec, layers=share, weight_factor=factor, progress=progress and first) \
                if not spec.one_jump else _fit_one_jump(stats, spec, layers=share, weight_factor=factor)
            return _for_head(solved, head)

        fits = []
        for group in passes:  # one pass over the rows per group; its statistics are freed once solved
            group_stats = stats if store is None else store_statistics(
                store, group, target, spec, statistics=statistics, progress=progress, comm=comm)
            group_stats.meta["d_model"] = d_model
            if comm is None:
                fits.append(solve(group_stats, group))
            elif spec.one_jump:  # one map from every layer's statistics: rank 0 solves it
                fits.append(_solve_shared(comm, lambda share, s=group_stats, g=group: solve(s, g) if comm.rank == 0
                                          else [], group))
            else:
                fits.append(_solve_shared(comm, functools.partial(solve, group_stats), group))
            group_stats = None
        return merge_fits(fits)


def _fit_one_jump(stats: Statistics, spec: FitSpec, *, layers, weight_factor) -> list[Shortcuts]:
    """One map shared by every layer of ``layers``, per rank (:mod:`njtc_solve.solve.one_jump`)."""
    from njtc_solve.solve.one_jump import LayerProblem, solve_one_jump

    check_one_jump_layers(layers)
    _check_has_layers(stats, layers)
    problems = {}
    for l in layers:  # centred moments of each layer's own regression (its normalisation, its target)
        cxx, cxt, ctt, mean_x, mean_t, norm_mean, norm_scale = _prepare(stats, l, spec.normalize, spec.residual, True)
        problems[l] = LayerProblem(cxx, cxt, ctt, mean_x, mean_t, float(stats.n), norm_mean, norm_scale)
    per_layer = _fit_statistics(stats, spec, layers=layers, weight_factor=weight_factor) \
        if spec.one_jump == "select" else None
    solved = solve_one_jump(problems, mode=spec.one_jump, ranks=spec.ranks, fit_intercept=spec.fit_intercept,
                            alpha=spec.alpha, normalize=spec.normalize, residual=spec.residual, n_rows=stats.n_rows,
                            total_var=float(torch.trace(stats.cyy)), weight_factor=weight_factor, per_layer=per_layer)
    fits = []
    for rank, (maps, records, info) in solved.items():
        sc = _shortcuts(stats, spec, rank=rank, maps=maps, records=records,
                        weight="none" if weight_factor is None else "logits")
        sc.one_jump, info["params"] = spec.one_jump, sc.total_params
        sc.stats["one_jump"] = info
        fits.append(sc)
    return fits


def _for_head(fits: list[Shortcuts], head) -> list[Shortcuts]:
    """Record on each fit the head its maps are for (the lens and evaluation refuse another)."""
    for sc in fits if head is not None else ():
        sc.head_description, sc.head_sha256 = head.describe(), head.fingerprint()
    return fits


def fit_all_targets(store=None, *, method: str = "nnjtc", ranks: list[int] | None = None,
                    layers: list[int] | None = None, normalize: str | None = None, residual: bool = False,
                    fit_intercept: bool = True, alpha: float | str = 0.0, device: str = "cpu", statistics=None,
                    save_stats=None, chunk_rows: int = 4096, float64: bool = False, progress: bool = True,
                    skip_positions: int | None = None, check_outputs=None, max_memory: int | str | None = None):
    """Fit maps from every source layer to every later layer from one pass, solved target by target.

    The pass (:func:`~njtc_solve.solve.pair_statistics.accumulate_pairs`) keeps ``C_xx`` per source,
    ``C_yy`` per target and one ``C_xy`` per pair; each source's input Gram is decomposed once for
    every target above it. The checks and the first pass run when this is called; each target is
    solved, yielded and its cross moments freed as the returned iterator is consumed.

    Parameters
    ----------
    store : ActivationStore, LiveSource, path or None
        The rows; ``None`` with ``statistics``, an all-pairs statistics file (``save_stats`` of
        an earlier call).
    layers : list of int, optional
        Source layers (default: every stored layer but the last); the targets are every stored
        layer above the lowest source.
    method, ranks, normalize, residual, fit_intercept, alpha, device, chunk_rows, float64, progress, skip_positions
        As in :func:`fit_shortcuts`.
    check_outputs : callable, optional
        Called with the target layers before the pass and before ``save_stats`` is written.
    max_memory : int or str, optional
        Bytes the statistics of one pass may take (default: the free memory of ``device``): the
        targets go in groups (:func:`~njtc_solve.solve.budget.target_groups`), one pass each.

    Returns
    -------
    iterator of (int, list of Shortcuts)
        Per target layer, in ascending order: one :class:`Shortcuts` per rank.

    Examples
    --------
    >>> fits = dict(fit_all_targets("activations.h5", method="jtc", progress=False))
    >>> sorted(fits), sorted(fits[2][0].maps), fits[2][0].target_layer
    ([1, 2, 3], [0, 1], 2)
    """
    spec = FitSpec(method=method, ranks=ranks, layers=layers, normalize=normalize, residual=residual,
                   fit_intercept=fit_intercept, alpha=alpha, device=device, target_layer="all",
                   skip_positions=skip_positions, chunk_rows=chunk_rows, float64=float64, max_memory=max_memory)
    return spec.fit_all_targets(store, statistics=statistics, save_stats=save_stats, progress=progress,
                                check_outputs=check_outputs)


def _fit_all_targets(spec: FitSpec, store, *, statistics, save_stats, progress, check_outputs):
    """:meth:`FitSpec.fit_all_targets`: the checks that need the data and the pass, now; the solves, lazily."""
    layers, given = (None if spec.layers is None else list(spec.layers)), store
    with opened(store) as store:
        if store is None:
            held, sources, d_model, head, saved_norm = pair_file(statistics, layers, spec.skip_positions)
        else:
            d_model, head = store.d_model, store.head()
            held = list(getattr(store, "layers", range(store.n_layers + 1)))
            sources = check_sources(store.source_layers if layers is None else store.check_layers(layers),
                                    store.n_layers)
        spec.check_width(d_model)
        if not sources:
            raise NJTCError("no source layer to fit")
        targets = sorted(t for t in held if t > min(sources))
        if store is None:  # every tensor the solves will read, before the first file is written
            check_input_norm(saved_norm, spec.normalize)
            check_pair_statistics(statistics, targets)
        passes = [targets] if store is None else spec.passes(d_model, sources, targets=targets,
                                                              budget=spec.memory_budget(), save_stats=save_stats)
        if check_outputs is not None:
            check_outputs(targets)

        def accumulate(rows, group):
            return accumulate_pairs(rows, sources=[l for l in sources if l < max(group)], targets=group,
                                    input_norm=spec.input_norm, device=spec.device, chunk_rows=spec.chunk_rows,
                                    float64=spec.float64, progress=progress, skip_positions=spec.skip_positions)

        # each pass's statistics, held here only until its solves take them (the budget holds one pass)
        pending = {0: statistics if store is None else accumulate(store, passes[0])}
        if store is not None and save_stats is not None:
            pending[0].save(save_stats, head)
    decompositions = {}  # each source's input Gram is the same for every target: decomposed once

    def solve(stats):  # of the input normalisation checked above, finite (iter_fit_targets checks each target)
        stats = stats.to(spec.device)
        target = stats.meta["target_layer"]
        fits = _fit_statistics(stats, spec, layers=[l for l in sources if l < target], weight_factor=None,
                               decompositions=decompositions)
        return _for_head(fits, head)

    def in_passes():  # the first pass's statistics are at hand; a later pass reads the rows again
        for i, group in enumerate(passes):
            if i > 0:
                with opened(given) as rows:  # a store given by its path was closed after the first pass
                    pending[i] = accumulate(rows, group)
            yield from iter_fit_targets(pending.pop(i), targets=group, solve=solve)

    def solved():
        yield from tqdm(in_passes(), total=len(targets), desc="solve", unit="target", leave=False,
                        disable=not progress)

    return solved()


def check_target(target_layer: int | None, n_layers: int) -> int:
    """The target layer asked for (``None``: the last, ``n_layers``), refused when out of range."""
    if target_layer is None:
        return n_layers
    target = int(target_layer)
    if target > n_layers:
        raise NJTCError(f"target layer {target} is beyond the last layer {n_layers}")
    if target < 1:
        raise NJTCError(f"target layer {target} has no source layer below it (targets are 1..{n_layers})")
    return target


def check_sources(layers: list[int], target: int) -> list[int]:
    """Source layers, each of which must be below ``target``."""
    layers = [int(l) for l in layers]
    bad = [l for l in layers if l >= target]
    if bad:
        raise NJTCError(f"source layer {bad[0]} is not below the target layer {target}")
    return layers


def _solve_shared(comm, solve, layers) -> list[Shortcuts]:
    """Each process solves every ``world_size``-th layer; rank 0 gathers and merges the maps."""
    share, failure = [], None
    try:
        share = [sc.to("cpu") for sc in solve(layers[comm.rank::comm.world_size])]
    except Exception as err:  # tell the peers before failing
        failure = err
    if not comm.vote(failure is None):
        raise failure or NJTCError("another process failed while solving; no output written")
    parts = comm.gather_to_root(share)
    return join_layers(parts) if comm.rank == 0 else []


def row_norm_warning(sc: Shortcuts) -> str | None:
    """A one-line warning when the fit's training rows hold target states far above the rest (an
    attention sink the plan did not skip), from ``stats["target_row_norms"]``."""
    norms = sc.stats.get("target_row_norms") or {}
    ratio = norms.get("max_over_median")
    if not isinstance(ratio, (int, float)) or not ratio > norms.get("ratio", 20.0):
        return None
    return (f"{norms.get('rows_above', '?')} training rows have a hidden state at target layer "
            f"{sc.target_layer} far above the rest (largest row norm {ratio:.0f}x the median; attention-sink-like); "
            "they can dominate the fit: consider `skip_positions` or a BOS token")

