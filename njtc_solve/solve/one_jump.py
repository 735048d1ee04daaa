"""One jump for every exit: one map shared by all source layers, in closed form (OJFA, arXiv 2504.13984).

The map ``y ≈ x̃_l W + b`` (plus ``x_l`` for residual maps) has ``W`` and ``b`` shared by every
source layer ``l``; only the input normalisation is the layer's own. ``pooled`` solves it on the
moments of every layer's rows stacked (each layer's centred moments plus the between-layer
scatter of its means); ``select`` picks the per-layer map whose loss over all layers, a function
of the moments (:func:`map_loss`), is lowest.

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

from njtc_solve.maps.shortcuts import Shortcuts
from njtc_solve.solve.solvers import fitted_map, solve_ranks, train_record, weight_root
from njtc_solve.solve.stats import uncentred

__all__ = ["LayerProblem", "map_loss", "pooled_problem", "select_table", "solve_one_jump"]


@dataclass
class LayerProblem:
    """Centred float64 moments of one regression ``t ≈ x̃ W + b`` over ``n`` rows; ``norm_mean``,
    ``norm_scale``: the layer's batch standardisation (``None`` otherwise)."""

    cxx: torch.Tensor
    cxt: torch.Tensor
    ctt: torch.Tensor
    mean_x: torch.Tensor
    mean_t: torch.Tensor
    n: float
    norm_mean: torch.Tensor | None = None
    norm_scale: torch.Tensor | None = None


def pooled_problem(problems: list[LayerProblem]) -> LayerProblem:
    """The moments of the rows of every problem stacked, centred on the pooled means (Chan et al.)."""
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


def map_loss(p: LayerProblem, coef: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None = None,
             factors: tuple | None = None) -> float:
    """``Σ_rows ‖(t - x̃ W - b) G‖²`` of the map ``(coef, bias)`` on the rows of ``p``, from its moments:
    ``tr Γ(C_tt - 2 WᵀC_xt + WᵀC_xx W) + n eΓeᵀ``, ``e = m_t - m_x W - b``, ``Γ = G Gᵀ`` (``gamma``,
    default the identity). ``factors``: ``(U, V)`` with ``W = U V``, for an ``O(d² r)`` cost."""
    coef = coef.to(p.cxx)
    gamma = torch.eye(p.ctt.shape[0], dtype=p.cxx.dtype, device=p.cxx.device) if gamma is None else gamma
    e = p.mean_t - p.mean_x @ coef - (0 if bias is None else bias.to(p.cxx))
    if factors is None or factors[1] is None:
        cross, quad = (coef * (p.cxt @ gamma)).sum(), (gamma * (coef.T @ p.cxx @ coef)).sum()
    else:  # tr Γ VᵀUᵀC_xt = Σ (Uᵀ C_xt Γ) ∘ V;  tr Γ VᵀUᵀC_xx U V = Σ (UᵀC_xx U) ∘ (V Γ Vᵀ)
        u, v = (f.to(p.cxx) for f in factors)
        cross, quad = ((u.T @ p.cxt @ gamma) * v).sum(), ((u.T @ p.cxx @ u) * (v @ gamma @ v.T)).sum()
    return float((gamma * p.ctt).sum() - 2 * cross + quad + p.n * (e @ gamma @ e))


def solve_one_jump(problems: dict[int, LayerProblem], *, mode: str, ranks, fit_intercept: bool, alpha,
                   normalize: str, residual: bool, n_rows: int, total_var: float, weight_factor=None,
                   per_layer: list[Shortcuts] | None = None) -> dict:
    """One shared map for every layer of ``problems``, per rank: ``{rank: (maps, records, info)}``.

    Parameters
    ----------
    problems : dict of int to LayerProblem
        Each source layer's centred moments (two or more layers).
    mode : {"pooled", "select"}
    ranks, fit_intercept, alpha, normalize, residual
        As in :class:`~njtc_solve.solve.fit.FitSpec` (``alpha`` ``"auto"``: GCV on the pooled rows).
    n_rows : int
        Rows per layer (GCV's count).
    total_var : float
        ``tr C_yy`` of the target, for each layer's R².
    weight_factor : Tensor, optional
        Errors measured as ``‖e G‖²`` (``weight="logits"``).
    per_layer : list of Shortcuts, optional
        The ordinary per-layer fits of the same settings, one per rank (``select`` only).

    Returns
    -------
    dict
        Per rank: each layer's :class:`~njtc_solve.maps.shortcuts.ShortcutMap` (sharing one map's
        tensors), each layer's training record, and ``info`` (mode, layers, loss over all layers
        and, for ``select``, the table and the chosen layer).
    """
    start = time.perf_counter()
    layers = list(problems)
    pooled = pooled_problem(list(problems.values()))
    gamma = _gamma(weight_factor)
    gxx, gxt, gtt = (pooled.cxx, pooled.cxt, pooled.ctt)
    if not fit_intercept:
        gxx, gxt, gtt = uncentred(pooled.n, pooled.mean_x, pooled.mean_t, gxx, gxt, gtt)
    weight = None if weight_factor is None else weight_root(weight_factor.to(gxx.device))
    alpha, shared = solve_ranks(gxx, gxt, gtt, pooled.mean_x, pooled.mean_t, ranks=ranks, alpha=alpha,
                                n_rows=n_rows * len(layers), fit_intercept=fit_intercept, weight=weight)
    tables = select_table(problems, per_layer, weight_factor=weight_factor) if mode == "select" else {}
    out = {}
    for rank, (coef, bias, u, v) in shared.items():
        info = {"mode": mode, "layers": layers, "pooled_sse": map_loss(pooled, coef, bias, gamma)}
        if mode == "select":
            table = tables[rank]
            chosen = int(np.argmin(table["total"]))
            info.update(pooled_fit_sse=info["pooled_sse"], from_layer=layers[chosen], table_mse=table["mse"].tolist())
            coef, bias, u, v = table["maps"][chosen]
            info["pooled_sse"] = map_loss(pooled, coef, bias, gamma)
        maps, records = _shared_maps(problems, u=u, v=v, bias=bias, normalize=normalize, residual=residual,
                                     alpha=alpha, n_rows=n_rows, total_var=total_var,
                                     solve_s=time.perf_counter() - start)
        out[rank] = (maps, records, info)
    return out


def _gamma(weight_factor):
    """``Γ = G Gᵀ`` of the weight factor ``G`` (``None``: unweighted)."""
    return None if weight_factor is None else (lambda g: g @ g.T)(weight_factor.to(torch.float64))


def select_table(problems: dict[int, LayerProblem], per_layer: list[Shortcuts], *, weight_factor=None) -> dict:
    """The loss of each layer's own map (of ``per_layer``) on every layer, from the moments.

    Per rank: ``sse`` (``L × L``, row ``k`` the map, column ``l`` the layer), ``mse``, ``total`` (each
    map's loss over all layers) and ``maps`` (each map's ``(coef, bias, U, V)`` in float64).
    """
    gamma = _gamma(weight_factor)
    like = next(iter(problems.values())).cxx  # float64, where the moments are
    f64 = lambda t: None if t is None else t.to(like)
    tables = {}
    for sc in per_layer:
        maps = []
        for k in problems:
            m = sc.maps[k]
            u, v = (f64(m.weight), None) if m.weight is not None else (f64(m.U), f64(m.V))
            maps.append((u if v is None else u @ v, f64(m.bias), u, v))
        sse = np.array([[map_loss(p, coef, bias, gamma, factors=(u, v)) for p in problems.values()]
                        for coef, bias, u, v in maps])
        p = next(iter(problems.values()))
        tables[sc.rank] = {"sse": sse, "mse": sse / (p.n * p.ctt.shape[0]), "total": sse.sum(1), "maps": maps}
    return tables


def _shared_maps(problems, *, u, v, bias, normalize, residual, alpha, n_rows, total_var, solve_s):
    """One :class:`ShortcutMap` per layer, all holding the same float32 map, and each layer's record
    (its unweighted training loss, as a per-layer fit records it)."""
    f32 = lambda t: None if t is None else t.to(torch.float32)
    u, v, bias = f32(u), f32(v), f32(bias)  # float32 once: every layer's map holds these tensors
    coef = (u if v is None else u @ v).double()
    maps, records = {}, {}
    for l, p in problems.items():
        maps[l] = fitted_map(u, v, bias, p.norm_mean, p.norm_scale, normalize=normalize, residual=residual)
        sse = max(map_loss(p, coef, None if bias is None else bias.double()), 0.0)
        records[l] = train_record(maps[l], sse, n=p.n, total_var=total_var, alpha=alpha, solve_s=solve_s,
                                  n_train=n_rows)
    return maps, records
