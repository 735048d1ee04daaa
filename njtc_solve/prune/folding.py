"""Training-free block replacement: remove K consecutive blocks, fold a linear map into the block before.

Removing blocks ``S .. S+K-1`` (0-based) of a pre-norm decoder turns ``h_S`` (the stream
entering block ``S``) into ``h_{S+K}``. Block ``S-1`` writes ``h_S = r + m``, ``m`` its MLP
output. A map fitted so that ``r + m·T + c ≈ h_{S+K}`` (least squares of ``m`` onto
``y = h_{S+K} - h_S + m``) folds into the MLP's output projection (``W ← Tᵀ W``, bias
``b ← b·T + c``), so the pruned model is an ordinary checkpoint with K fewer blocks
(ReplaceMe, arXiv 2505.02819; docs/pruning.md, Background).

This module holds the mechanics: the capture of every block's MLP output (through
:class:`~njtc_solve.core.decoder.Decoder`; which families fold is the architecture table's
:data:`FOLDABLE`), the sufficient statistics of every start and K from one pass
(:class:`ReplacementAccumulator`: shifted float32 GEMMs added into float64, plain and
row-weighted by ``1 / mean(h_S²)``), the closed-form solve (:func:`solve_replacement`), the
fold and the block removal (:func:`apply_replacement`) and the atomic save
(:func:`save_pruned`). Every position is in the statistics, position 0 included: it is the
attention sink every later position reads.

Examples
--------
>>> import torch
>>> acc = ReplacementAccumulator({1: [1]}, weightings=("plain",))
>>> g = torch.Generator().manual_seed(0)
>>> h = [torch.randn(2, 5, 8, generator=g) for _ in range(4)]      # layers 0..3, (batch, seq, d)
>>> m = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]      # MLP outputs of blocks 0..2
>>> acc.update(h, m)
>>> stats = acc.finalize()
>>> rep = solve_replacement(stats, start=1, remove=1, weighting="plain", intercept=True)
>>> tuple(rep.T.shape), rep.c is not None, stats.n_rows
((8, 8), True, 10)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from njtc_solve.core.architectures import FOLDABLE, FoldSpec, check_foldable
from njtc_solve.core.decoder import Decoder
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import FolderKind, atomic_folder, check_finite, check_folder_output, check_writable
from njtc_solve.solve.stats import add_gram, highest_float32_matmul

__all__ = ["FOLDABLE", "FoldSpec", "PRUNE_RECORD", "STATS_FORMAT", "Replacement", "ReplacementAccumulator", "ReplacementStatistics",
           "WEIGHTINGS", "apply_replacement", "capture_mlp_outputs", "check_foldable", "check_removal",
           "check_output_folder", "fold_replacement", "remove_blocks", "save_pruned", "solve_replacement"]

PRUNE_RECORD = "njtc_prune.json"
STATS_FORMAT = "njtc-prune-statistics"  # the ``format`` metadata of a block statistics file
WEIGHTINGS = ("plain", "rms")  # rms: each row weighted by 1 / mean(h_S²), its squared RMS


def check_removal(n_blocks: int, remove: int, start: int | None = None) -> None:
    """Refuse a removal that is empty, leaves no block to fold into, or runs past the last block.

    ``start`` is the first removed block (0-based); the map folds into block ``start - 1``,
    so the first start is 1. ``None`` (every start) only checks ``remove``.
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


def capture_mlp_outputs(model, fold: FoldSpec | None = None):
    """Hook every block's MLP output projection; a context that yields a dict ``block index → its latest output``.

    The output is what the block adds to the residual stream as its MLP part (the projection's
    bias included), ``(batch, seq, d)`` in the model's dtype, overwritten by each forward pass.
    ``fold`` is the family's checked fold (checked here when not given). Every hook is removed
    on the way out (:meth:`njtc_solve.core.decoder.Decoder.mlp_outputs`).
    """
    return Decoder.of(model).mlp_outputs(fold)


@dataclass
class _Moments:
    """Weighted shifted sums for one start and one weighting (float64)."""

    w: torch.Tensor  # total weight (scalar)
    sx: torch.Tensor  # (d,) Σ w (x - s_x)
    st: torch.Tensor  # (nK, d) Σ w (t_K - s_t)
    stt: torch.Tensor  # (nK,) Σ w ‖t_K - s_t‖²
    sxxt: torch.Tensor  # (d, d + nK·d) Σ w (x - s_x)ᵀ [x - s_x | t_K1 - s_t | ...]


@dataclass
class ReplacementStatistics:
    """Centred (and raw) moments of ``x = m_{S-1}`` against ``t_K = h_{S+K} - h_S`` per start, K and weighting.

    ``moments[(start, k, weighting)]`` is a dict with ``n`` (total weight), ``mean_x``,
    ``mean_t``, ``cxx``, ``cxt`` (centred) and ``tr_ctt`` (float64); ``cosine[(start, k)]``
    the mean cosine similarity of ``h_S`` and ``h_{S+K}`` over every row (``all``) and over
    the last position of each sequence (``last``), and ReplaceMe's angular distance
    ``acos(cos)/π`` over the last positions (``angular_last``). ``n_rows`` counts the rows,
    every position included. ``meta`` is the provenance (``model_sha256``, ``model_type``,
    ``n_blocks``, ``plan``) that :meth:`check_serves` compares with a later run.

    :meth:`save` writes them to a safetensors file, :meth:`load` reads one back with every
    tensor checked, so another start or K is solved without a pass over the documents.
    """

    moments: dict
    cosine: dict
    n_rows: int
    meta: dict = field(default_factory=dict)

    def raw(self, start: int, k: int, weighting: str):
        """Uncentred ``(Σ w xᵀx, Σ w xᵀt)`` for fits without an intercept."""
        m = self.moments[(start, k, weighting)]
        n = m["n"]
        return (m["cxx"] + n * torch.outer(m["mean_x"], m["mean_x"]),
                m["cxt"] + n * torch.outer(m["mean_x"], m["mean_t"]))

    @property
    def pairs(self) -> dict[int, list[int]]:
        """``start → [K, ...]`` the statistics hold."""
        found: dict[int, set] = {}
        for start, k, _ in self.moments:
            found.setdefault(start, set()).add(k)
        return {s: sorted(ks) for s, ks in sorted(found.items())}

    @property
    def weightings(self) -> list[str]:
        """The row weightings the statistics hold."""
        return sorted({w for _, _, w in self.moments}, key=WEIGHTINGS.index)

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write the statistics to a safetensors file, atomically (temporary name, then rename).

        ``C_xx`` and ``mean_x`` are stored once per start and weighting (every K shares them).
        An existing file is replaced only with ``overwrite`` and only when it is block
        statistics this project wrote.
        """
        from safetensors.torch import save_file

        from njtc_solve.core.outputs import atomic_output, check_file_output

        path = check_file_output(path, "`path`", [STATS_FORMAT], "a block statistics file")
        if path.exists() and not overwrite:
            raise NJTCError(f"{path} exists; pass `overwrite=True` to replace it")
        tensors = {"n_rows": torch.tensor([self.n_rows], dtype=torch.int64)}
        for (s, k, w), m in self.moments.items():
            tensors.setdefault(f"s{s}.{w}.n", torch.tensor([m["n"]], dtype=torch.float64))
            tensors.setdefault(f"s{s}.{w}.mean_x", m["mean_x"])
            tensors.setdefault(f"s{s}.{w}.cxx", m["cxx"])
            tensors[f"s{s}.k{k}.{w}.mean_t"] = m["mean_t"]
            tensors[f"s{s}.k{k}.{w}.cxt"] = m["cxt"]
            tensors[f"s{s}.k{k}.{w}.tr_ctt"] = torch.tensor([m["tr_ctt"]], dtype=torch.float64)
        for (s, k), c in self.cosine.items():
            tensors[f"s{s}.k{k}.cosine"] = torch.tensor([c["all"], c["last"], c["angular_last"]], dtype=torch.float64)
        d = next(iter(self.moments.values()))["cxx"].shape[0]
        info = {"format": STATS_FORMAT, "format_version": "1", "d_model": str(d),
                "pairs": json.dumps({str(s): ks for s, ks in self.pairs.items()}),
                "weightings": json.dumps(self.weightings), "meta": json.dumps(self.meta, default=_jsonable)}
        tensors = {k: v.detach().double().contiguous().cpu() if v.is_floating_point() else v.contiguous().cpu()
                   for k, v in tensors.items()}
        check_finite(tensors, path)
        with atomic_output(path) as tmp:
            save_file(tensors, tmp, metadata=info)
        return path

    @classmethod
    def load(cls, path) -> ReplacementStatistics:
        """Read statistics written by :meth:`save`, every tensor and metadata key checked.

        A foreign file, a missing tensor or key, a shape that disagrees with ``d_model``, a
        count that is not positive or a value that is not finite is a one-line
        :class:`NJTCError` naming the file and the entry.
        """
        from njtc_solve.core.outputs import read_safetensors
        from njtc_solve.solve.stats import checked_tensor, invalid

        tensors, info = read_safetensors(path, "block statistics", STATS_FORMAT)
        if info.get("format_version") != "1":
            raise invalid(path, f"format_version {info.get('format_version')!r} is not 1")
        try:
            d = int(info["d_model"])
            pairs = {int(s): [int(k) for k in ks] for s, ks in json.loads(info["pairs"]).items()}
            weightings = json.loads(info["weightings"])
            meta = json.loads(info.get("meta", "{}"))
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise invalid(path, f"its metadata is incomplete or not JSON ({type(err).__name__}: {err})") from None
        if d < 1 or not pairs or not isinstance(meta, dict) or not weightings or \
                any(w not in WEIGHTINGS for w in weightings):
            raise invalid(path, "its metadata (d_model, pairs, weightings, meta) is out of range")
        n_rows = int(checked_tensor(path, tensors, "n_rows", (1,))[0])
        if n_rows < 1:
            raise invalid(path, f"n_rows = {n_rows}: it holds no rows")
        moments, cosine = {}, {}
        for s, ks in pairs.items():
            for w in weightings:
                n = float(checked_tensor(path, tensors, f"s{s}.{w}.n", (1,))[0])
                if not n > 0:
                    raise invalid(path, f"s{s}.{w}.n = {n:g}: it holds no rows")
                shared = {"n": n, "mean_x": checked_tensor(path, tensors, f"s{s}.{w}.mean_x", (d,)),
                          "cxx": checked_tensor(path, tensors, f"s{s}.{w}.cxx", (d, d))}
                for k in ks:
                    moments[(s, k, w)] = {**shared,
                                          "mean_t": checked_tensor(path, tensors, f"s{s}.k{k}.{w}.mean_t", (d,)),
                                          "cxt": checked_tensor(path, tensors, f"s{s}.k{k}.{w}.cxt", (d, d)),
                                          "tr_ctt": float(checked_tensor(path, tensors, f"s{s}.k{k}.{w}.tr_ctt",
                                                                         (1,))[0])}
            for k in ks:
                c = checked_tensor(path, tensors, f"s{s}.k{k}.cosine", (3,)).tolist()
                cosine[(s, k)] = {"all": c[0], "last": c[1], "angular_last": c[2]}
        return cls(moments, cosine, n_rows, {**meta, "path": str(path)})

    def check_serves(self, *, model_sha256: str | None = None, model_type: str | None = None,
                     n_blocks: int | None = None, remove: int | None = None, starts=(), weightings=(),
                     plan: dict | None = None) -> None:
        """Refuse statistics that cannot serve a job: another model, a missing start or K, another plan.

        Each check runs only for what is given (a command checks the model's type and depth
        and the job before the model loads, the weights' hash after). ``plan`` is the job's
        plan settings (``seq_len``, ``max_tokens``, ``val_fraction``, ``seed``, ``bos``): they
        must be the statistics', or held-out documents could be among their training ones.
        """
        where = self.meta.get("path", "the statistics")
        for key, value in (("model_type", model_type), ("n_blocks", n_blocks), ("model_sha256", model_sha256)):
            theirs = self.meta.get(key)
            if value is not None and theirs != value:
                what = "weights" if key == "model_sha256" else key.replace("_", " ")
                raise NJTCError(f"`stats` {where} are from another model: its {what} {theirs!r} is not this "
                                f"model's {value!r}")
        missing = [s for s in starts if remove not in self.pairs.get(s, [])] if remove is not None else []
        if missing:
            held = sorted({k for ks in self.pairs.values() for k in ks})
            raise NJTCError(f"`stats` {where} hold no statistics for `remove={remove}` at start {missing[0]} "
                            f"(they hold K = {', '.join(map(str, held))} at starts "
                            f"{min(self.pairs)}..{max(self.pairs)}); gather them with `stats_remove`")
        lacking = [w for w in weightings if w not in self.weightings]
        if lacking:
            raise NJTCError(f"`stats` {where} hold no {lacking[0]!r} weighting (they hold "
                            f"{', '.join(self.weightings)}); choose `weightings` among them")
        theirs = self.meta.get("plan", {})
        for key, value in (plan or {}).items():
            if key in theirs and theirs[key] != value:
                raise NJTCError(f"`stats` {where} were gathered with `{key}={theirs[key]}`, not `{key}={value}`: "
                                "use the same plan, so that no held-out document is among their training ones")


class ReplacementAccumulator:
    """Streaming sufficient statistics of block replacements, for many starts and K in one pass.

    Parameters
    ----------
    pairs : dict of int to list of int
        ``start → [K, ...]``: for each first removed block ``S``, the numbers of blocks removed.
        The input rows are block ``S-1``'s MLP output, the targets ``h_{S+K} - h_S``.
    weightings : tuple of {"plain", "rms"}
        ``rms`` weights each row by ``1 / mean(h_S²)``.
    device : str
        Where the GEMMs run and the sums live.

    Each chunk is shifted by the first chunk's means, multiplied in float32 (``highest``
    precision) in blocks of :data:`njtc_solve.solve.stats.GEMM_ROWS` rows and added into float64.
    """

    def __init__(self, pairs: dict, *, weightings=WEIGHTINGS, device="cpu"):
        bad = [w for w in weightings if w not in WEIGHTINGS]
        if bad or not weightings:
            raise NJTCError(f"`weightings` must be among {', '.join(WEIGHTINGS)}, not {list(weightings)!r}")
        self.pairs = {int(s): sorted({int(k) for k in ks}) for s, ks in pairs.items()}
        self.weightings = tuple(weightings)
        self.device = torch.device(device)
        self.sums: dict = {}
        self.shift: dict = {}
        self.cos: dict = {}
        self.n_rows = 0
        self.n_last = 0

    def update(self, hidden, mlp) -> None:
        """Add one forward pass: ``hidden[l]`` (batch, seq, d) for layers 0..L, ``mlp[i]`` block i's MLP output."""
        with highest_float32_matmul():
            self._update(hidden, mlp)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1]).to(self.device, torch.float32)

    def _update(self, hidden, mlp):
        last = hidden[0].shape[1] - 1
        n = hidden[0].shape[0] * hidden[0].shape[1]
        for start, ks in self.pairs.items():
            x = self._rows(mlp[start - 1])
            h_s = self._rows(hidden[start])
            ts = [self._rows(hidden[start + k]) - h_s for k in ks]
            if start not in self.shift:
                self.shift[start] = (x.mean(0), torch.stack([t.mean(0) for t in ts]))
            s_x, s_t = self.shift[start]
            xc = x - s_x
            block = torch.cat([xc] + [t - s_t[j] for j, t in enumerate(ts)], dim=1)
            for weighting in self.weightings:
                w = None if weighting == "plain" else 1.0 / h_s.pow(2).mean(-1).clamp_min(1e-30)
                self._add(start, weighting, block, w, len(ks), x.shape[1])
            for k in ks:
                h_e = hidden[start + k]
                cos = torch.nn.functional.cosine_similarity(hidden[start].float(), h_e.float(), dim=-1).double()
                angle = torch.acos(cos[:, last].clamp(-1, 1)) / torch.pi  # ReplaceMe's angular distance
                sums = self.cos.get((start, k), (0.0, 0.0, 0.0))
                self.cos[(start, k)] = (sums[0] + float(cos.sum()), sums[1] + float(cos[:, last].sum()),
                                        sums[2] + float(angle.sum()))
        self.n_rows += n
        self.n_last += hidden[0].shape[0]

    def _add(self, start, weighting, block, w, n_k, d):
        key = (start, weighting)
        if key not in self.sums:
            f64 = dict(dtype=torch.float64, device=self.device)
            self.sums[key] = _Moments(torch.zeros((), **f64), torch.zeros(d, **f64), torch.zeros(n_k, d, **f64),
                                      torch.zeros(n_k, **f64), torch.zeros(d, block.shape[1], **f64))
        s = self.sums[key]
        if w is not None:
            block = block * w.sqrt()[:, None]  # the GEMMs then give Σ w (…)
        xc = block[:, :d]
        t_part = block[:, d:].reshape(block.shape[0], n_k, d)
        root = torch.ones(block.shape[0], device=self.device) if w is None else w.sqrt()
        s.w += root.double().pow(2).sum()
        s.sx += (root[:, None] * xc).double().sum(0)
        s.st += (root[:, None, None] * t_part).double().sum(0)
        s.stt += t_part.double().pow(2).sum((0, 2))
        add_gram(s.sxxt, xc, block)

    def finalize(self, meta: dict | None = None) -> ReplacementStatistics:
        """Centred float64 moments of every start, K and weighting."""
        if self.n_rows == 0:
            raise NJTCError("no rows were accumulated (the plan has no training sequences?)")
        moments = {}
        for (start, weighting), s in self.sums.items():
            s_x, s_t = (v.double() for v in self.shift[start])
            d = s.sx.shape[0]
            n = float(s.w)
            mx = s.sx / n
            cxx = s.sxxt[:, :d] - n * torch.outer(mx, mx)
            for j, k in enumerate(self.pairs[start]):
                mt = s.st[j] / n
                cxt = s.sxxt[:, d * (j + 1):d * (j + 2)] - n * torch.outer(mx, mt)
                moments[(start, k, weighting)] = {"n": n, "mean_x": mx + s_x, "mean_t": mt + s_t[j], "cxx": cxx,
                                                  "cxt": cxt, "tr_ctt": float(s.stt[j] - n * mt.dot(mt))}
        cosine = {key: {"all": a / self.n_rows, "last": b / self.n_last, "angular_last": c / self.n_last}
                  for key, (a, b, c) in self.cos.items()}
        return ReplacementStatistics(moments, cosine, self.n_rows, dict(meta or {}))


@dataclass
class Replacement:
    """The folded map of one removal: ``m ↦ m·T + c`` on block ``start - 1``'s MLP output.

    ``T`` (d × d, float64), ``c`` (d,) or ``None`` without an intercept; ``T = I`` and
    ``c = None`` is plain dropping. ``train_loss`` and ``drop_loss`` are the weighted squared
    errors on the training rows of this map and of dropping (``T = I``), when known.
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
    """Least-squares (or ridge) map of one removal from the statistics, solved in float64.

    The fit is ``y ≈ x·T + c`` with ``x = m_{S-1}``, ``y = h_{S+K} - h_S + m_{S-1}``, written
    ``T = I + Δ`` with ``Δ = (C_xx + αI)^+ C_xt`` (``t = h_{S+K} - h_S``): the ridge penalty
    ``α‖T - I‖²`` shrinks the map towards plain dropping (``T = I``), and ``α`` is relative,
    in units of ``tr C_xx / d``. Without ``intercept`` the raw (uncentred) Grams are used and
    ``c`` is ``None``; ``intercept_name`` records where the intercept goes.
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

    ``Linear``: ``W ← Tᵀ W``, ``b ← b·T + c``; ``Conv1D`` (weight ``in × out``): ``W ← W T``.
    Products in float64, stored in the weight's dtype. Where the projection has no bias and
    the replacement has an intercept, the family's bias option (Llama's ``mlp_bias``) is
    switched on in the config and zero biases are given to every projection it covers.
    ``fold`` is the family's checked fold (checked here when not given).
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
    """Delete blocks ``start .. start+remove-1`` in place and make the model consistent again.

    The remaining blocks' attention ``layer_idx`` (which the KV cache indexes by) is
    renumbered, the config's layer count set and per-layer config lists (``layer_types``)
    shortened.
    """
    decoder = Decoder.of(model)
    check_removal(decoder.n_blocks, remove, start)
    decoder.remove_blocks(start, remove)


def apply_replacement(model, replacement: Replacement, fold: FoldSpec | None = None) -> None:
    """Fold the replacement (unless it is plain dropping) and remove its blocks, in place."""
    if replacement.name != "drop":
        fold_replacement(model, replacement, fold)
    remove_blocks(model, replacement.start, replacement.remove)


# a checkpoint folder: njtc_prune.json marks it and lists the files written (the patterns stand
# for them in a record written before the list was kept)
CHECKPOINT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                    "pytorch_model*.bin", "config.json", "generation_config.json", "tokenizer*",
                    "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.*", "added_tokens.json",
                    PRUNE_RECORD)
PRUNED_KIND = FolderKind("a pruned model", PRUNE_RECORD, lambda c: c.get("format") == "njtc-prune", CHECKPOINT_FILES)


def save_pruned(model, tokenizer, out: str | Path, *, record: dict, overwrite: bool = False) -> Path:
    """Write a pruned model as a standard checkpoint folder, atomically, with ``njtc_prune.json``.

    The folder is written under a temporary name beside ``out`` and swapped in when complete
    (:func:`~njtc_solve.core.outputs.atomic_folder`). An existing ``out`` is written again only
    with ``overwrite`` and only when this function wrote it (its ``njtc_prune.json``, whose
    content is ``record``, its ``format`` and the list of files written); the files in it that this project did
    not write (notes, a statistics file) are kept. A failure leaves ``out`` as it was.
    """
    out = Path(out)
    check_output_folder(out, overwrite=overwrite)
    check_finite(dict(model.named_parameters()), out)  # in the dtype saved: a fold past float16's range
    _drop_gguf_quantizer(model)
    with atomic_folder(out, PRUNED_KIND) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PRUNE_RECORD).write_text(json.dumps({"format": "njtc-prune", **record}, indent=1,
                                                   default=_jsonable))
    return out


def _drop_gguf_quantizer(model) -> None:
    """A model read from a GGUF file holds dequantized weights but still names GGUF as its quantizer,
    which transformers refuses to save: it is saved as the plain model it is (in its loaded dtype)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    method = str(getattr(method, "value", method))
    if method != "gguf":
        raise NJTCError(f"a model quantized with {method} cannot be saved pruned; load it unquantized")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def check_output_folder(out, *, overwrite: bool = False, inputs=()) -> None:
    """Refuse an output folder that exists (unless ``overwrite`` and written by us) or is an input.

    ``inputs`` are paths the run reads (the model, the corpus): the output may be none of them,
    nor a folder holding one, nor inside one. Files in ``out`` that this project did not write
    are never replaced: a folder it did not write is refused, ``overwrite`` or not.
    """
    out = Path(out)
    check_writable(out.parent, out)
    target = out.resolve()
    for path in inputs:
        if path is None:
            continue
        p = Path(path).resolve()
        if p == target or target in p.parents or p in target.parents:
            raise NJTCError(f"the output {out} is an input ({path}); choose another folder")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise NJTCError(f"{out} exists; pass `overwrite=True` to replace it")
        if not out.is_dir() or not PRUNED_KIND.is_own(out):
            raise NJTCError(f"{out} exists and is not a pruned model written by njtc_solve (no {PRUNE_RECORD}); "
                            "it is not replaced")
        check_folder_output(out, "`out`", CHECKPOINT_FILES, PRUNED_KIND)


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
