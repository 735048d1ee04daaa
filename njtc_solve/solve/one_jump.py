"""One jump for every exit: one shared map for all source layers, in closed form (OJFA).

"One Jump Fits All" (Seshadri, arXiv 2504.13984) uses a single narrow normalised map for
every exit layer instead of one per layer. The function class is ``y ≈ x̃_l W + b`` (plus
``x_l`` for residual maps) with ``W`` (rank r) and ``b`` shared by all source layers ``l``;
only the input normalisation is the layer's own (``batch``: ``x̃_l = (x_l - μ_l) / σ_l``
with layer l's training mean and standard deviation). Its least-squares optimum over the
stacked rows of every layer is a solve on pooled moments, computed here from the per-layer
statistics of one pass (:class:`~njtc_solve.solve.stats.Statistics`), every rank from one
decomposition:

* per layer, the centred moments of the regression actually solved (normalised input
  ``x̃_l``, target ``t_l = y`` or ``y - x_l``), with means ``m_l`` and ``m_t,l``;
* pooled over the ``L`` layers (``n`` rows each), centred on the pooled means
  ``m̄ = mean_l m_l``: ``S_xx = Σ_l C_xx,l + n Σ_l (m_l - m̄)(m_l - m̄)ᵀ`` and likewise
  ``S_xt``, ``S_tt`` (the between-layer scatter; zero for ``batch`` inputs, whose ``m_l = 0``);
  without an intercept, the uncentred ``S + L n m̄ m̄ᵀ``;
* then the usual (reduced-rank) solve, ``b = m̄_t - m̄ W``.

The loss of any map ``(W, b)`` on layer ``l`` is also a function of the moments,
``tr C_tt - 2 tr WᵀC_xt + tr WᵀC_xx W + n ‖m_t - m W - b‖²``, so the choice of the best single
per-layer map for every exit (``one_jump="select"``, OJFA's own recipe made exact) is an
``L × L`` table with no second pass over the rows.

Examples
--------
>>> from njtc_solve import fit_shortcuts
>>> [one] = fit_shortcuts("activations.h5", method="nnjtc", normalize="batch", ranks=[4], one_jump=True,
...                       progress=False)
>>> one.name, sorted(one.maps), one.maps[0].U is one.maps[2].U
('nnjtc-batch-r4-onejump', [0, 1, 2], True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts
from njtc_solve.solve.fit import FitSpec, _fit_statistics, _prepare, _shortcuts
from njtc_solve.solve.solvers import gcv_alpha, gram_eigh, solve_reduced_rank, weight_root
from njtc_solve.solve.stats import Statistics

__all__ = ["LayerProblem", "fit_one_jump", "layer_problem", "map_loss",
           "pooled_problem", "select_table"]


@dataclass
class LayerProblem:
    """Centred float64 moments of one regression ``t ≈ x̃ W + b`` over ``n`` rows (or a pool of them).

    ``cxx``, ``cxt``, ``ctt`` are centred on the means ``mean_x``, ``mean_t``; ``norm_mean``,
    ``norm_scale`` are the batch standardisation of the layer (``None`` otherwise).
    """

    cxx: torch.Tensor
    cxt: torch.Tensor
    ctt: torch.Tensor
    mean_x: torch.Tensor
    mean_t: torch.Tensor
    n: float
    norm_mean: torch.Tensor | None = None
    norm_scale: torch.Tensor | None = None

    def uncentred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(XᵀX, XᵀT, TᵀT)`` of the same rows, for a fit without an intercept."""
        outer = lambda a, b: self.n * torch.outer(a, b)
        return (self.cxx + outer(self.mean_x, self.mean_x), self.cxt + outer(self.mean_x, self.mean_t),
                self.ctt + outer(self.mean_t, self.mean_t))


def layer_problem(stats: Statistics, layer: int, spec: FitSpec) -> LayerProblem:
    """The centred moments of layer ``layer``'s regression under ``spec`` (its normalisation, residual target)."""
    cxx, cxt, ctt, mean_x, mean_t, norm_mean, norm_scale = _prepare(stats, layer, spec.normalize, spec.residual, True)
    return LayerProblem(cxx, cxt, ctt, mean_x, mean_t, float(stats.n), norm_mean, norm_scale)


def pooled_problem(problems: list[LayerProblem]) -> LayerProblem:
    """The moments of the rows of every problem stacked, centred on the pooled means.

    Each problem's centred moments plus the between-problem scatter of its means about the
    pooled (row-weighted) means: Chan et al.'s combination of groups.
    """
    n = sum(p.n for p in problems)
    mean_x = sum(p.n * p.mean_x for p in problems) / n
    mean_t = sum(p.n * p.mean_t for p in problems) / n
    cxx, cxt, ctt = (torch.zeros_like(t) for t in (problems[0].cxx, problems[0].cxt, problems[0].ctt))
    for p in problems:
        dx, dt = p.mean_x - mean_x, p.mean_t - mean_t
        cxx += p.cxx + p.n * torch.outer(dx, dx)
        cxt += p.cxt + p.n * torch.outer(dx, dt)
        ctt += p.ctt + p.n * torch.outer(dt, dt)
    return LayerProblem(cxx, cxt, ctt, mean_x, mean_t, n)


def map_loss(p: LayerProblem, coef: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None = None) -> float:
    """``Σ_rows ‖(t - x̃ W - b) G‖²`` of the map ``(coef, bias)`` on the rows of ``p``, from its moments.

    ``tr Γ(C_tt - 2 WᵀC_xt + WᵀC_xx W) + n eΓeᵀ`` with ``e = m_t - m_x W - b`` and ``Γ = G Gᵀ``
    (``gamma``; the identity when ``None``).
    """
    coef = coef.to(p.cxx)
    resid = p.ctt - coef.T @ p.cxt - p.cxt.T @ coef + coef.T @ p.cxx @ coef
    e = p.mean_t - p.mean_x @ coef - (0 if bias is None else bias.to(p.cxx))
    if gamma is None:
        return float(torch.trace(resid) + p.n * (e @ e))
    return float((gamma * resid).sum() + p.n * (e @ gamma @ e))


def _gamma(weight_factor):
    return None if weight_factor is None else (lambda g: g @ g.T)(weight_factor.to(torch.float64))


def fit_one_jump(stats: Statistics, spec: FitSpec, *, layers: list[int], weight_factor=None,
                 progress: bool = False) -> list[Shortcuts]:
    """One shared map for every layer of ``layers``, per rank of ``spec`` (``spec.one_jump`` pooled or select).

    Parameters
    ----------
    stats : Statistics
        Per-layer statistics of one pass, checked against ``spec`` (:func:`~njtc_solve.solve.fit.fit_shortcuts`).
    spec : FitSpec
        The fit's settings; ``spec.one_jump`` chooses the solve: ``"pooled"``, the least squares
        over the stacked rows of every layer, or ``"select"``, the per-layer map whose loss summed
        over every layer is lowest (the ``L × L`` table of :func:`select_table`).
    layers : list of int
        Source layers, two or more.
    weight_factor : Tensor, optional
        Errors measured as ``‖e G‖²`` (``weight="logits"``).

    Returns
    -------
    list of Shortcuts
        One per rank: each layer's :class:`~njtc_solve.maps.shortcuts.ShortcutMap` holds the
        same ``U``, ``V`` (or ``weight``) and ``bias`` tensors, and its own batch standardisation;
        ``stats["one_jump"]`` records the mode, the pooled losses and the parameter count.
    """
    if len(layers) < 2:
        raise NJTCError(f"`one_jump` with one source layer ({layers[0]}) is the ordinary fit: drop `one_jump`")
    start = time.perf_counter()
    problems = {l: layer_problem(stats, l, spec) for l in layers}
    pooled = pooled_problem(list(problems.values()))
    gamma = _gamma(weight_factor)
    shared, alpha = _pooled_solve(pooled, spec, stats.n_rows * len(layers), weight_factor)
    if spec.one_jump == "select":
        tables = select_table(stats, spec, layers=layers, weight_factor=weight_factor, problems=problems,
                              progress=progress)
    fits = []
    for rank, (coef, bias, u, v) in shared.items():
        info = {"mode": spec.one_jump, "layers": list(layers), "pooled_sse": map_loss(pooled, coef, bias, gamma)}
        if spec.one_jump == "select":
            table = tables[rank]
            chosen = int(np.argmin(table["total"]))
            info.update(pooled_fit_sse=info["pooled_sse"], from_layer=table["layers"][chosen],
                        table_mse=table["mse"].tolist())
            coef, bias, u, v = table["maps"][chosen]
            info["pooled_sse"] = map_loss(pooled, coef, bias, gamma)
        fits.append(_shared_shortcuts(stats, spec, problems, rank=rank, u=u, v=v, bias=bias, alpha=alpha,
                                      gamma=gamma, info=info, weight_factor=weight_factor,
                                      solve_s=time.perf_counter() - start))
    return fits


def _pooled_solve(pooled: LayerProblem, spec: FitSpec, n_rows: int, weight_factor):
    """``{rank: (coef, bias, U, V)}`` of the pooled regression (float64; ``V`` ``None`` for a full map)."""
    gxx, gxt, gtt = (pooled.cxx, pooled.cxt, pooled.ctt) if spec.fit_intercept else pooled.uncentred()
    eigh = gram_eigh(gxx)
    alpha = (gcv_alpha(gxx, gxt, gtt, n_rows, fit_intercept=spec.fit_intercept, eigh=eigh)[0]
             if spec.alpha == "auto" else float(spec.alpha))
    weight = None if weight_factor is None else weight_root(weight_factor.to(gxx.device))
    solution = solve_reduced_rank(gxx, gxt, alpha, weight=weight, eigh=eigh)
    out = {}
    for rank in spec.ranks:
        u, v = solution.factors(rank)
        coef = u if v is None else u @ v
        bias = pooled.mean_t - pooled.mean_x @ coef if spec.fit_intercept else None
        out[rank] = (coef, bias, u, v)
    return out, alpha


def select_table(stats: Statistics, spec: FitSpec, *, layers: list[int], weight_factor=None, problems=None,
                 progress: bool = False) -> dict:
    """The loss of each layer's own map on every layer, from the moments: OJFA's choice of one jump.

    Map ``k`` (fitted on layer ``k`` alone, as the ordinary fit does) is applied to layer ``l``
    through layer ``l``'s own normalisation. Returns, per rank, a dict with ``layers``, ``sse``
    (``L × L``, row ``k`` the map, column ``l`` the layer), ``mse`` (``sse / (n d)``), ``total``
    (each map's loss summed over the layers) and ``maps`` (each map's ``(coef, bias, U, V)`` in float64).
    """
    problems = problems or {l: layer_problem(stats, l, spec) for l in layers}
    gamma = _gamma(weight_factor)
    per_layer = _fit_statistics(stats, spec, layers=layers, weight_factor=weight_factor, progress=progress)
    d = stats.cyy.shape[0]
    tables = {}
    for sc in per_layer:
        maps = []
        for k in layers:
            m = sc.maps[k]
            f64 = lambda t: None if t is None else t.to(stats.cyy)
            u, v = (f64(m.weight), None) if m.weight is not None else (f64(m.U), f64(m.V))
            maps.append((u if v is None else u @ v, f64(m.bias), u, v))
        sse = np.array([[map_loss(problems[l], coef, bias, gamma) for l in layers] for coef, bias, _, _ in maps])
        tables[sc.rank] = {"layers": list(layers), "sse": sse, "mse": sse / (float(stats.n) * d),
                           "total": sse.sum(1), "maps": maps}
    return tables


def _shared_shortcuts(stats, spec, problems, *, rank, u, v, bias, alpha, gamma, info, weight_factor,
                      solve_s) -> Shortcuts:
    """The :class:`Shortcuts` of one shared map: one ``ShortcutMap`` per layer, sharing its tensors."""
    f32 = lambda t: None if t is None else t.to(torch.float32)
    core = {"weight": f32(u), "U": None, "V": None} if v is None else {"weight": None, "U": f32(u), "V": f32(v)}
    bias32 = f32(bias)
    coef = core["weight"] if v is None else core["U"] @ core["V"]
    d = stats.cyy.shape[0]
    maps, records = {}, {}
    for l, p in problems.items():
        maps[l] = ShortcutMap(**core, bias=bias32, norm_mean=f32(p.norm_mean), norm_scale=f32(p.norm_scale),
                              normalize=spec.normalize, residual=spec.residual)
        sse = max(map_loss(p, coef.double(), None if bias32 is None else bias32.double(), gamma), 0.0)
        total = float(torch.trace(stats.cyy))  # R² against the target's variance, as the per-layer fit reports it
        records[l] = {"train_mse": sse / (p.n * d), "train_sse": sse, "r2": 1 - sse / total if total else 0.0,
                      "params": maps[l].n_params, "reduction": 1 - maps[l].n_params / (d * d), "alpha": alpha,
                      "rank": None if v is None else u.shape[1], "solve_s": solve_s, "n_train": stats.n_rows}
    sc = _shortcuts(stats, spec, rank=rank, maps=maps, records=records,
                    weight="none" if weight_factor is None else "logits")
    sc.one_jump = info["mode"]
    info["params"] = sc.total_params
    sc.stats["one_jump"] = info
    return sc
