"""Evaluate shortcuts against the model's own final prediction, on held-out rows.

``python -m njtc_solve.evaluate --shortcuts jtc.safetensors nnjtc.safetensors --out report``

Per source layer and method, on validation rows (leaving out the first ``--skip-positions``
positions): Precision@k against the model's own top-k, surprisal ``-log p_final(argmax
shortcut)``, ``KL(p_final ‖ p_shortcut)``, MSE and R² against ``h_L``, beside the identity map
(the logit lens), and confidence-based early exit. A shortcut fitted on some of the rows
evaluated is refused (:func:`check_unseen`). Maps to an intermediate layer get a pairwise table
instead (:mod:`njtc_solve.evaluation.layer_pairs`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head
from njtc_solve.core.metrics import Reference, hits_at_k, kl_divergence, surprisal
from njtc_solve.core.params import BOOLEAN, DEVICE, Interval, ListOf, check_spec
from njtc_solve.data.rows import RowSource
from njtc_solve.data.store import opened
from njtc_solve.maps.compatibility import check_compatible
from njtc_solve.maps.shortcuts import Shortcuts

__all__ = ["EvaluateSpec", "EvaluationResult", "check_rows_overlap", "check_unseen", "evaluate_shortcuts",
           "early_exit_curve"]


KS = (1, 5, 10)

_POSITIVE = Interval(int, 1, None, says="positive", show_value=False)


@dataclass(frozen=True)
class EvaluateSpec:
    """The settings of an evaluation, checked when made, before a row is read or a model loads.

    Parameters
    ----------
    layers : list of int, optional
        Source layers.
    max_rows, skip_rows, chunk_rows : int
        Validation rows at most, held-out tokens of the skip scores, rows per chunk (positive).
    device : str
    thresholds : list of float, optional
        Early-exit confidence thresholds, each in [0, 1].
    skip_positions : int, optional
        Leave out rows at positions below this.
    allow_overlap : bool

    Examples
    --------
    >>> EvaluateSpec(max_rows=0)
    Traceback (most recent call last):
      ...
    njtc_solve.core.errors.NJTCError: `max_rows` must be positive
    """

    layers: tuple | None = None
    max_rows: int | None = None
    skip_rows: int | None = None
    chunk_rows: int = 256
    device: str = "cpu"
    thresholds: tuple | None = None
    skip_positions: int | None = None
    allow_overlap: bool = False

    constraints: ClassVar[dict] = {
        "layers": [None, ListOf(Interval(int, 0, None), says="a list of layer indices (whole numbers, 0 or more)")],
        "max_rows": [None, _POSITIVE],
        "skip_rows": [None, _POSITIVE],
        "chunk_rows": [_POSITIVE],
        "device": [DEVICE],
        "thresholds": [None, ListOf(Interval(float, 0, 1), says="a list of numbers in [0, 1]")],
        "skip_positions": [None, Interval(int, 0, None, says="0 or more", show_value=False)],
        "allow_overlap": [BOOLEAN],
    }

    def __post_init__(self):
        for name in ("layers", "thresholds"):  # a list is kept as a tuple (hashable, frozen)
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_spec(self)


@dataclass
class EvaluationResult:
    """Figures of an evaluation: one record per (method, layer), early-exit curves and meta.

    Examples
    --------
    >>> result = evaluate_shortcuts("activations.h5", progress=False)    # the identity alone
    >>> df = result.to_pandas()
    >>> df.loc[df.layer == 1, ["method", "precision@1"]].shape
    (1, 2)
    """

    records: list[dict]
    early_exit: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_pandas(self):
        """The records as a ``pandas.DataFrame`` (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.records)

    def value(self, method: str, layer: int, metric: str) -> float:
        """One figure, e.g. ``value("nnjtc-layer-r32", 10, "precision@1")``."""
        for r in self.records:
            if r["method"] == method and r["layer"] == layer:
                return r[metric]
        raise KeyError((method, layer))


class _Tally:
    """Running sums of one (method, layer)'s metrics over row chunks."""

    def __init__(self):
        self.n = 0
        self.hits = dict.fromkeys(KS, 0)
        self.surprisal = self.kl = self.sse = 0.0
        self.margins, self.correct = [], []

    def add(self, logits, y_hat, y, final: Reference, model_topk):
        top2 = logits.topk(2, -1)
        pred = top2.indices[:, 0]
        for k in KS:
            self.hits[k] += int(hits_at_k(model_topk, pred, k).sum())
        self.surprisal += float(surprisal(final, pred).sum())
        self.kl += float(kl_divergence(final, logits).sum())
        self.sse += float(((y_hat.double() - y.double()) ** 2).sum())
        probs = (top2.values - torch.logsumexp(logits, -1)[:, None]).exp()
        self.margins.append((probs[:, 0] - probs[:, 1]).cpu().numpy())
        self.correct.append((pred == model_topk[:, 0]).cpu().numpy())
        self.n += len(pred)


def check_unseen(source: RowSource, sc: Shortcuts, *, skip_positions: int = 0) -> None:
    """Refuse to evaluate ``sc`` on validation rows of ``source`` that it was fitted on.

    Rows of another corpus, or of the same corpus under the same split, are unseen; under another
    split, any evaluated document the fit trained on is refused (a store split by sequence cannot
    tell, and is refused).
    """
    fitted, here = sc.provenance, source.provenance
    if not fitted:
        raise NJTCError(f"{sc.name} records no provenance (fitted by an older version?), so its training rows "
                        "cannot be told apart from the evaluation rows; refit it, or pass `allow_overlap=True`")
    if fitted.get("corpus_sha256") != here["corpus_sha256"] or fitted.get("split_id") == here["split_id"]:
        return
    if fitted.get("split_by") == here["split_by"] == "document":
        evaluated = set(source.evaluated_documents(skip_positions).tolist())
        seen = evaluated - set(fitted["validation_documents"])
        if not seen:
            return
        raise NJTCError(f"{sc.name} was fitted on {len(seen)} of the {len(evaluated)} documents in the validation "
                        f"rows of {source.path} (another split of the same corpus); evaluate on its own store, one "
                        "extracted with the same seed and validation fraction, or pass `allow_overlap=True`")
    raise NJTCError(f"{sc.name} was fitted on another split of the same corpus as {source.path}, which is split by "
                    "sequence, so its training rows may be among the evaluation rows; pass `allow_overlap=True` to "
                    "evaluate anyway")


def check_rows_overlap(sc: Shortcuts, n_rows: int, skip: int) -> str | None:
    """A warning when the first ``n_rows`` validation rows include the rows refinement of ``sc`` stopped on."""
    refined = (sc.stats or {}).get("refined") or {}
    if refined.get("check_split", "validation") != "validation" or "check_rows" not in refined:
        return None
    first, last = refined["check_rows"]
    if refined.get("check_skip_positions", skip) == skip and n_rows <= first:
        return None
    return (f"{sc.name} was refined with early stopping on held-out rows {first}-{last - 1}, and the evaluation reads "
            f"rows 0-{n_rows - 1}: they overlap, so its figures are not fully held out (use `max_rows` {first})")


def evaluate_shortcuts(store: str | Path | RowSource, shortcuts: Sequence[str | Path | Shortcuts] = (), *,
                       layers: Sequence[int] | None = None, max_rows: int | None = None, chunk_rows: int = 256,
                       device: str | torch.device = "cpu", progress: bool = True,
                       thresholds: Sequence[float] | None = None, skip_positions: int | None = None,
                       allow_overlap: bool = False) -> EvaluationResult:
    """Evaluate shortcut maps (and the identity baseline) on the store's validation rows.

    Parameters
    ----------
    store : str, Path or RowSource
        The rows: a store's path or reader, or a live model's (``LiveSource``).
    shortcuts : list of paths or Shortcuts
        Fitted maps of the store's model.
    layers : list of int, optional
        Source layers (default: every layer any shortcut file has, else ``0..L-1``).
    max_rows : int, optional
        Evaluate on the first ``max_rows`` validation rows only.
    chunk_rows : int
        Rows per chunk of logits.
    thresholds : sequence of float, optional
        Early-exit confidence thresholds (default 0, 0.02, ..., 1).
    skip_positions : int, optional
        Leave out rows at positions ``< skip_positions`` (default: the store's).
    allow_overlap : bool
        Evaluate even where :func:`check_unseen` refuses.

    Returns
    -------
    EvaluationResult
    """
    spec = EvaluateSpec(layers=layers, max_rows=max_rows, chunk_rows=chunk_rows, device=device,
                        thresholds=thresholds, skip_positions=skip_positions, allow_overlap=allow_overlap)
    with opened(store) as store:
        skip = store.default_skip_positions if spec.skip_positions is None else int(spec.skip_positions)
        loaded = [s if isinstance(s, Shortcuts) else Shortcuts.load(s) for s in shortcuts]
        head = _check_loaded(store, loaded, skip, allow_overlap)
        layers = _layers(store, loaded, layers)
        methods = [sc.to(device) for sc in [Shortcuts.identity(layers, store.n_layers, store.model_sha256)] + loaded]
        start = time.perf_counter()
        tallies, n, sst, own_surprisal = _tally(store, methods, layers, head.to(device), skip=skip, max_rows=max_rows,
                                                chunk_rows=chunk_rows, device=torch.device(device), progress=progress)
        early = {sc.name: _early_exit(tallies, sc, layers, store.n_layers, thresholds) for sc in methods}
        meta = {"store": str(store.path), "model": getattr(store, "attrs", {}).get("model", store.path),
                "n_layers": store.n_layers, "d_model": store.d_model, "validation_rows": n, "skip_positions": skip,
                "seconds": time.perf_counter() - start, "layers": layers,
                "model_surprisal": own_surprisal / n,  # the full model's surprisal of its own top-1
                "warnings": [w for sc in loaded if (w := check_rows_overlap(sc, n, skip))]}
        return EvaluationResult(_records(tallies, methods, layers, store.d_model, sst), early, meta)


def _pieces(chunks, chunk_rows: int):
    """Chunks of a source cut into pieces of at most ``chunk_rows`` rows (a live source yields a whole pass)."""
    for rows, chunk in chunks:
        for start in range(0, len(rows), chunk_rows):
            yield rows[start:start + chunk_rows], {k: v[start:start + chunk_rows] for k, v in chunk.items()}


def _model_topk(store, head_topk, rows, chunk):
    """The model's own top-k at ``rows``: live or stored ``final_topk``, else the head's with the stored top-1."""
    if "final_topk" in chunk:
        return torch.as_tensor(chunk["final_topk"])[:, :max(KS)].to(head_topk.device)
    if "final_topk" in store.file:
        return torch.from_numpy(store.read("final_topk", rows)[:, :max(KS)].astype(np.int64)).to(head_topk.device)
    top1 = torch.from_numpy(store.read("final_top1", rows).astype(np.int64)).to(head_topk.device)
    return torch.cat([top1[:, None], head_topk[:, 1:]], dim=1)


def _check_loaded(store: RowSource, loaded: list[Shortcuts], skip: int, allow_overlap: bool) -> Head:
    """Refuse maps that cannot be judged on these rows; returns the store's head, read once."""
    head = store.head()
    for sc in loaded:
        check_compatible(sc, store, head=head)  # maps fitted through one head are never judged through another
        recorded = sc.method not in ("tuned-lens", "jacobian-lens") or sc.provenance.get("corpus_sha256")
        if not allow_overlap and recorded:  # a tuned-lens folder, a foreign Jacobian lens record no training rows
            check_unseen(store, sc, skip_positions=skip)
        fitted_skip = (sc.provenance or {}).get("skip_positions")
        if fitted_skip is not None and int(fitted_skip) != skip:
            raise NJTCError(f"{sc.name} was fitted leaving out positions < {fitted_skip}, and this evaluation leaves "
                            f"out positions < {skip}; evaluate it with `skip_positions` {fitted_skip}")
    names = [sc.name for sc in loaded]
    if len(set(names)) != len(names):
        raise NJTCError(f"two shortcut files have the same method and settings: {names}")
    if store.count("validation", skip) == 0:
        raise NJTCError(f"{store.path} has no validation rows at positions >= {skip} "
                        "(extract with a validation fraction above 0)")
    return head


def _layers(store: RowSource, loaded: list[Shortcuts], layers) -> list[int]:
    """The source layers evaluated: those asked for, else every layer of any map, else the store's."""
    if layers is None:
        layers = sorted({l for sc in loaded for l in sc.maps}) or store.source_layers
    return [l for l in store.check_layers(layers) if l < store.n_layers]


def _tally(store: RowSource, methods: list[Shortcuts], layers: list[int], head: Head, *, skip: int,
           max_rows: int | None, chunk_rows: int, device: torch.device, progress: bool):
    """Every method's tallies by ``(name, layer)``, rows read, the last layer's SST and the model's surprisal sum."""
    target = store.n_layers
    tallies = {(sc.name, l): _Tally() for sc in methods for l in layers if l in sc.maps}
    sum_y = torch.zeros(store.d_model, dtype=torch.float64)
    sum_y2 = own_surprisal = 0.0
    n_rows = min(store.count("validation", skip), max_rows or np.inf)
    chunks = store.iter_chunks(layers + [target], "validation", chunk_rows, max_rows, skip_positions=skip)
    with torch.no_grad(), tqdm(total=n_rows, unit="row", desc="evaluate", leave=False, disable=not progress) as bar:
        for rows, chunk in _pieces(chunks, chunk_rows):
            y = torch.as_tensor(chunk[target]).to(device, torch.float32)
            final_logits = head.logits(y)
            final = Reference.from_logits(final_logits)
            model_topk = _model_topk(store, final_logits.topk(max(KS), -1).indices, rows, chunk)
            sum_y += y.double().sum(0).cpu()
            sum_y2 += float((y.double() ** 2).sum())
            own_surprisal += float(-final.logp.max(-1).values.sum())
            # once per chunk, for every method
            xs = {l: torch.as_tensor(chunk[l]).to(device, torch.float32) for l in layers}
            for sc in methods:
                for l in layers:
                    if l in sc.maps:
                        y_hat, logits = sc.maps[l].predict_with_logits(xs[l], head)
                        tallies[sc.name, l].add(logits, y_hat, y, final, model_topk)
            bar.update(len(y))
    n = next(iter(tallies.values())).n
    return tallies, n, sum_y2 - float((sum_y**2).sum()) / n, own_surprisal


def _records(tallies: dict, methods: list[Shortcuts], layers: list[int], d: int, sst: float) -> list[dict]:
    """One record of figures per (method, layer) tallied."""
    records = []
    for sc in methods:
        for l in layers:
            if l not in sc.maps:
                continue
            t = tallies[sc.name, l]
            params = sc.maps[l].n_params
            records.append({
                "method": sc.name, "family": sc.method, "layer": l, "rank": sc.rank,
                "params": params, "reduction": 1 - params / (d * d) if params else None,
                "total_params": sc.total_params,  # every number of the file, a one jump's shared map once
                **{f"precision@{k}": t.hits[k] / t.n for k in KS},
                "surprisal": t.surprisal / t.n, "kl": t.kl / t.n, "mse": t.sse / (t.n * d),
                "r2": 1 - t.sse / sst if sst > 0 else float("nan"), "n_rows": t.n,
            })
    return records


def _early_exit(tallies: dict, sc: Shortcuts, layers: list[int], n_layers: int, thresholds) -> dict:
    """The early-exit curve of one method over the layers it has maps for."""
    own_layers = [l for l in layers if l in sc.maps]
    margins = np.stack([np.concatenate(tallies[sc.name, l].margins) for l in own_layers])
    correct = np.stack([np.concatenate(tallies[sc.name, l].correct) for l in own_layers])
    return early_exit_curve(margins, correct, layers=own_layers, n_layers=n_layers, thresholds=thresholds)


def early_exit_curve(margins: np.ndarray, correct: np.ndarray, *, layers: Sequence[int], n_layers: int,
                     thresholds: Sequence[float] | None = None) -> dict:
    """Confidence-based early exit for one method over a threshold sweep.

    Each row exits at the first layer whose top-1 minus top-2 probability reaches the
    threshold; a row that never exits runs the full model.

    Parameters
    ----------
    margins, correct : ndarray (n_layers_evaluated, n_rows)
        Per layer and row: the top-1 minus top-2 probability, and whether the top-1 is the model's.
    layers : list of int
        The source layer of each row of ``margins``.
    n_layers : int
        ``L``; exiting at layer ``l`` saves ``1 - l / L`` of the blocks.

    Returns
    -------
    dict
        ``thresholds``, ``agreement``, ``mean_exit_layer``, ``saved`` (one entry per threshold),
        and ``saved_at_95``/``saved_at_99``: the most saved at ≥95% / ≥99% agreement.
    """
    thresholds = list(np.round(np.linspace(0, 1, 51), 4)) if thresholds is None else list(thresholds)
    layer_of = np.asarray(layers, dtype=float)
    agreement, mean_exit = [], []
    for tau in thresholds:
        exits = margins >= tau
        any_exit = exits.any(0)
        first = exits.argmax(0)
        cols = np.arange(margins.shape[1])
        agree = np.where(any_exit, correct[first, cols], True)
        exit_layer = np.where(any_exit, layer_of[first], n_layers)
        agreement.append(float(agree.mean()))
        mean_exit.append(float(exit_layer.mean()))
    saved = [1 - e / n_layers for e in mean_exit]

    def best(target):
        ok = [s for s, a in zip(saved, agreement) if a >= target]
        return max(ok) if ok else 0.0

    return {"thresholds": [float(t) for t in thresholds], "agreement": agreement, "mean_exit_layer": mean_exit,
            "saved": saved, "saved_at_95": best(0.95), "saved_at_99": best(0.99)}

