"""The closed-form replacement of K consecutive blocks and its fold into the block before.

Block ``S-1`` writes ``h_S = r + m``, ``m`` its MLP output. A map with ``r + m·T + c ≈ h_{S+K}``
(least squares of ``m`` onto ``h_{S+K} - h_S + m``) folds into the MLP's output projection
(``W ← Tᵀ W``, ``b ← b·T + c``), so the pruned model is an ordinary checkpoint with K fewer
blocks (ReplaceMe, arXiv 2505.02819; docs/pruning.md, Background).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from njtc_solve.core.architectures import FoldSpec, check_foldable
from njtc_solve.core.decoder import Decoder
from njtc_solve.core.errors import NJTCError
from njtc_solve.prune.replacement_statistics import ReplacementStatistics

__all__ = ["Replacement", "apply_replacement", "check_removal", "fold_replacement", "remove_blocks",
           "solve_replacement"]


def check_removal(n_blocks: int, remove: int, start: int | None = None) -> None:
    """Refuse a removal that is empty, leaves no block to fold into, or runs past the last block.

    ``start`` is the first removed block (0-based, at least 1); ``None`` checks ``remove`` only.
    """
    if remove < 1:
        raise NJTCError(f"`remove` must be at least 1 block, not {remove}")
    if remove > n_blocks - 1:
        raise NJTCError(f"`remove` {remove} leaves no block before the removed ones to fold the map into: the model "
                        f"has {n_blocks} blocks, so at most {n_blocks - 1} can be removed")
    if start is None:
        return
    if start < 1:
        raise NJTCError(f"`start` {start}: the map folds into the block before the first removed one, and block 0 "
                        "has none; the first start is 1")
    if start + remove > n_blocks:
        raise NJTCError(f"`start` {start} with `remove` {remove} runs past the last block: the model has blocks "
                        f"0..{n_blocks - 1}, so the last start is {n_blocks - remove}")


@dataclass
class Replacement:
    """The folded map of one removal: ``m ↦ m·T + c`` on block ``start - 1``'s MLP output.

    ``T`` (d × d, float64), ``c`` (d,) or ``None`` without an intercept; ``T = I`` and
    ``c = None`` is plain dropping. ``train_loss`` and ``drop_loss`` are the weighted squared
    errors on the training rows of this map and of dropping, when known.
    """

    start: int
    remove: int
    T: torch.Tensor
    c: torch.Tensor | None
    name: str = "drop"
    weighting: str | None = None
    alpha: float = 0.0
    intercept: str = "none"  # "none", "bias" (the projection's own) or the config option's name
    train_loss: float | None = None
    drop_loss: float | None = None

    @classmethod
    def drop(cls, start: int, remove: int, d: int) -> Replacement:
        """Remove the blocks with no replacement."""
        return cls(start, remove, torch.eye(d, dtype=torch.float64), None)

    def describe(self) -> dict:
        """The replacement's settings, for ``njtc_prune.json``."""
        return {"name": self.name, "start": self.start, "remove": self.remove, "weighting": self.weighting,
                "alpha_relative": self.alpha, "intercept": self.intercept, "train_loss": self.train_loss,
                "drop_train_loss": self.drop_loss}


def _psd_solve(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(a + αI)^+ b`` for a symmetric PSD ``a`` (eigendecomposition, cut-off at d × eps × λ_max)."""
    lam, q = torch.linalg.eigh(a)
    lam = lam + alpha
    keep = lam > a.shape[0] * torch.finfo(torch.float64).eps * lam.max().clamp_min(1e-300)
    qk = q[:, keep]
    return qk @ ((qk.T @ b) / lam[keep][:, None])


def solve_replacement(stats: ReplacementStatistics, *, start: int, remove: int, weighting: str = "plain",
                      alpha: float = 0.0, intercept: bool = True, intercept_name: str = "bias") -> Replacement:
    """Least-squares (or ridge) map of one removal from the statistics, in float64.

    ``T = I + (C_xx + αI)^+ C_xt``: the ridge penalty ``α‖T - I‖²`` shrinks the map towards
    dropping, ``alpha`` in units of ``tr C_xx / d``. Without ``intercept`` the raw Grams are used
    and ``c`` is ``None``; ``intercept_name`` records where the intercept goes.
    """
    key = (start, remove, weighting)
    if key not in stats.moments:
        raise NJTCError(f"the statistics hold no start={start}, remove={remove} with weighting {weighting!r}")
    if alpha < 0:
        raise NJTCError(f"`alpha` must be non-negative, not {alpha}")
    m = stats.moments[key]
    if intercept:
        gxx, gxt = m["cxx"], m["cxt"]
    else:
        gxx, gxt = stats.raw(start, remove, weighting)
    d = gxx.shape[0]
    a = alpha * float(torch.trace(gxx)) / d
    delta = _psd_solve(gxx, gxt, a)
    c = (m["mean_t"] - m["mean_x"] @ delta) if intercept else None
    # training loss: Σ w ‖t - xΔ - c‖² (centred, or raw without intercept), against dropping: Σ w ‖t‖²
    tr_tt = m["tr_ctt"] + (0.0 if intercept else m["n"] * float(m["mean_t"].dot(m["mean_t"])))
    loss = tr_tt - 2 * float((delta * gxt).sum()) + float((delta * (gxx @ delta)).sum())
    drop = m["tr_ctt"] + m["n"] * float(m["mean_t"].dot(m["mean_t"]))
    name = "lsq" + ("-rms" if weighting == "rms" else "") + (f"-ridge{alpha:g}" if alpha else "")
    name += f"+{intercept_name}" if intercept else ""
    return Replacement(start, remove, torch.eye(d, dtype=torch.float64) + delta, c, name, weighting, alpha,
                       intercept_name if intercept else "none", loss, drop)


def fold_replacement(model, replacement: Replacement, fold: FoldSpec | None = None) -> None:
    """Fold ``m ↦ m·T + c`` into block ``start - 1``'s MLP output projection, in place.

    ``Linear``: ``W ← Tᵀ W``, ``b ← b·T + c``; ``Conv1D`` (weight ``in × out``): ``W ← W T``;
    products in float64. Without a bias, an intercept switches on the family's bias option
    (Llama's ``mlp_bias``). ``fold`` is the family's checked fold (checked here when not given).
    """
    decoder = Decoder.of(model)
    spec = fold if fold is not None else check_foldable(model.config)
    proj = decoder.mlp_projections(spec)[replacement.start - 1]
    T = replacement.T.double().cpu()
    bias = getattr(proj, "bias", None)
    if bias is None and replacement.c is not None and (spec.bias_option is None
                                                       or replacement.intercept != spec.bias_option):
        raise NJTCError(f"{model.config.model_type}'s MLP output projection has no bias for the intercept")
    with torch.no_grad():  # refused above before any weight changes
        w = proj.weight
        new_w = (T.T @ w.double().cpu()) if spec.kind == "linear" else (w.double().cpu() @ T)
        w.copy_(new_w.to(w.dtype))
        if bias is not None:
            b = bias.double().cpu() @ T + (0 if replacement.c is None else replacement.c.double().cpu())
            bias.copy_(b.to(bias.dtype))
        elif replacement.c is not None:
            decoder.enable_bias_option(spec)
            proj.bias.copy_(replacement.c.to(proj.bias.dtype))


def remove_blocks(model, start: int, remove: int) -> None:
    """Delete blocks ``start .. start+remove-1`` in place (:meth:`~njtc_solve.core.decoder.Decoder.remove_blocks`)."""
    decoder = Decoder.of(model)
    check_removal(decoder.n_blocks, remove, start)
    decoder.remove_blocks(start, remove)


def apply_replacement(model, replacement: Replacement, fold: FoldSpec | None = None) -> None:
    """Fold the replacement (unless it is plain dropping) and remove its blocks, in place."""
    if replacement.name != "drop":
        fold_replacement(model, replacement, fold)
    remove_blocks(model, replacement.start, replacement.remove)
