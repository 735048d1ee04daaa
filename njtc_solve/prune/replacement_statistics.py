"""The sufficient statistics of block replacements, gathered in one pass for every start and K.

The map folded into block ``S-1``'s MLP output ``x`` fits ``t_K = h_{S+K} - h_S``
(:mod:`njtc_solve.prune.replacement`); the statistics are the moments of ``x`` against ``t_K``
over every position, plain and row-weighted by ``1 / mean(h_S²)``, from shifted float32 GEMMs
added into float64.

Examples
--------
>>> import torch
>>> from njtc_solve.prune.replacement import solve_replacement
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

from njtc_solve.core.architectures import FoldSpec
from njtc_solve.core.decoder import Decoder
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import check_finite
from njtc_solve.core.params import Check, check_params
from njtc_solve.data.capture import forward_batches
from njtc_solve.prune.checkpoint import jsonable
from njtc_solve.solve.stats import add_gram, highest_float32_matmul, uncentred

__all__ = ["STATS_FORMAT", "WEIGHTINGS", "ReplacementAccumulator", "ReplacementStatistics", "batch_states",
           "replacement_statistics"]

STATS_FORMAT = "njtc-prune-statistics"  # the ``format`` metadata of a block statistics file
WEIGHTINGS = ("plain", "rms")  # rms: each row weighted by 1 / mean(h_S²), its squared RMS
SOME_WEIGHTINGS = Check(lambda ws: bool(ws) and all(w in WEIGHTINGS for w in ws), invalid=[],
                        says=f"among {', '.join(WEIGHTINGS)}")  # what a `weightings` setting may be


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
    """Moments of ``x = m_{S-1}`` against ``t_K = h_{S+K} - h_S`` per start, K and weighting.

    ``moments[(start, k, weighting)]``: ``n`` (total weight), ``mean_x``, ``mean_t``, centred ``cxx``,
    ``cxt`` (float64) and ``tr_ctt``. ``cosine[(start, k)]``: the mean cosine similarity of ``h_S``
    and ``h_{S+K}`` over every row (``all``) and over the last positions (``last``), and ReplaceMe's
    angular distance there (``angular_last``). ``meta``: the provenance :meth:`check_serves` compares.
    """

    moments: dict
    cosine: dict
    n_rows: int
    meta: dict = field(default_factory=dict)

    def raw(self, start: int, k: int, weighting: str):
        """Uncentred ``(Σ w xᵀx, Σ w xᵀt)`` for fits without an intercept."""
        m = self.moments[(start, k, weighting)]
        return uncentred(m["n"], m["mean_x"], m["mean_t"], m["cxx"], m["cxt"])

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
        """Write the statistics to a safetensors file, atomically.

        ``C_xx`` and ``mean_x`` are stored once per start and weighting. An existing file is
        replaced only with ``overwrite`` and only when it is block statistics.
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
                "weightings": json.dumps(self.weightings), "meta": json.dumps(self.meta, default=jsonable)}
        tensors = {k: v.detach().double().contiguous().cpu() if v.is_floating_point() else v.contiguous().cpu()
                   for k, v in tensors.items()}
        check_finite(tensors, path)
        with atomic_output(path) as tmp:
            save_file(tensors, tmp, metadata=info)
        return path

    @classmethod
    def load(cls, path) -> ReplacementStatistics:
        """Read statistics written by :meth:`save`, every tensor and metadata key checked.

        Raises
        ------
        NJTCError
            A foreign file, a missing tensor or key, a wrong shape, a count that is not
            positive or a value that is not finite, naming the file and the entry.
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
        """Refuse statistics of another model, without a needed start, K or weighting, or of another plan.

        Each check runs only for what is given. ``plan`` holds the job's ``seq_len``,
        ``max_tokens``, ``val_fraction``, ``seed`` and ``bos``: another plan could put held-out
        documents among the statistics' training ones.
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
    """Streaming statistics of block replacements, for many starts and K in one pass.

    Parameters
    ----------
    pairs : dict of int to list of int
        ``start → [K, ...]``: per first removed block ``S``, the numbers of blocks removed.
    weightings : tuple of {"plain", "rms"}
        ``rms`` weights each row by ``1 / mean(h_S²)``.
    device : str
        Where the GEMMs run and the sums live.
    """

    def __init__(self, pairs: dict, *, weightings=WEIGHTINGS, device="cpu"):
        check_params({"weightings": [SOME_WEIGHTINGS]}, {"weightings": list(weightings)})
        self.pairs = {int(s): sorted({int(k) for k in ks}) for s, ks in pairs.items()}
        self.weightings = tuple(weightings)
        self.device = torch.device(device)
        self.sums: dict = {}
        self.shift: dict = {}
        self.cos: dict = {}
        self.n_rows = 0
        self.n_last = 0

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1]).to(self.device, torch.float32)

    def update(self, hidden, mlp) -> None:
        """Add one forward pass: ``hidden[l]`` (batch, seq, d) for layers 0..L, ``mlp[i]`` block i's MLP output."""
        with highest_float32_matmul():
            last = hidden[0].shape[1] - 1
            for start, ks in self.pairs.items():
                x = self._rows(mlp[start - 1])
                h_s = self._rows(hidden[start])
                ts = [self._rows(hidden[start + k]) - h_s for k in ks]
                if start not in self.shift:  # the first chunk's means
                    self.shift[start] = (x.mean(0), torch.stack([t.mean(0) for t in ts]))
                s_x, s_t = self.shift[start]
                xc = x - s_x
                block = torch.cat([xc] + [t - s_t[j] for j, t in enumerate(ts)], dim=1)
                for weighting in self.weightings:
                    w = None if weighting == "plain" else 1.0 / h_s.pow(2).mean(-1).clamp_min(1e-30)
                    self._add(start, weighting, block, w, len(ks), x.shape[1])
                for k in ks:
                    h_e = hidden[start + k].float()
                    cos = torch.nn.functional.cosine_similarity(hidden[start].float(), h_e, dim=-1).double()
                    angle = torch.acos(cos[:, last].clamp(-1, 1)) / torch.pi  # ReplaceMe's angular distance
                    sums = self.cos.get((start, k), (0.0, 0.0, 0.0))
                    self.cos[(start, k)] = (sums[0] + float(cos.sum()), sums[1] + float(cos[:, last].sum()),
                                            sums[2] + float(angle.sum()))
            self.n_rows += hidden[0].shape[0] * hidden[0].shape[1]
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


def batch_states(batch, mlp: dict, seq_len: int):
    """A captured batch as ``(hidden, mlp)`` lists of (batch, seq, d) tensors."""
    shape = (-1, seq_len, batch.hidden[0].shape[-1])
    return [h.reshape(shape) for h in batch.hidden], [mlp[i].reshape(shape) for i in range(len(mlp))]


def replacement_statistics(model, plan, pairs: dict, *, weightings=WEIGHTINGS, batch_size: int = 8,
                           device="cpu", bar=None, extra=None, fold: FoldSpec | None = None, meta: dict | None = None):
    """One forward pass over ``plan``'s sequences (every position): the statistics of every ``start → [K]``.

    ``bar`` (tqdm) advances by each batch's tokens; ``extra(hidden, mlp)``, when given, also
    sees every batch; ``fold`` is the family's checked fold; ``meta`` extra provenance.
    """
    acc = ReplacementAccumulator(pairs, weightings=weightings, device=device)
    with Decoder.of(model).mlp_outputs(fold) as mlp:
        for batch in forward_batches(model, plan, batch_size):
            states = batch_states(batch, mlp, plan.seq_len)
            acc.update(*states)
            if extra is not None:
                extra(*states)
            if bar is not None:
                bar.update(batch.tokens.numel())
    return acc.finalize({"rows": plan.n_rows, **(meta or {})})
