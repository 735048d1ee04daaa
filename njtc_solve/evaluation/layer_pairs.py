"""Evaluation of maps between any two layers: how well layer ``l`` predicts a later layer ``l'``.

Per pair ``(l, l')`` and method, on held-out rows: the relative error ``‖ŷ − y‖_F / ‖y‖_F``
and ``R²`` of the mapped vector against ``h_l'``, beside the identity (the blocks removed). With a
live model, also ``KL(p_full ‖ p_skip)`` and top-1 agreement of the model run with blocks
``l..l'-1`` replaced by the map (:mod:`njtc_solve.evaluation.block_skip`), and dropped; positions
below the fit's own ``skip_positions`` keep the model's state.

Examples
--------
>>> from njtc_solve.solve.fit import fit_all_targets
>>> fits = [sc for _, scs in fit_all_targets("activations.h5", method="jtc", progress=False) for sc in scs]
>>> result = evaluate_pairs("activations.h5", fits, progress=False)
>>> r = result.record("jtc", 1, 2)
>>> r["r2"] > r["identity_r2"], 0 <= r["rel_err"] < 1
(True, True)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from njtc_solve.core.errors import NJTCError
from njtc_solve.data.rows import VALIDATION
from njtc_solve.data.store import opened
from njtc_solve.evaluation.block_skip import SkipRunner, skip_scores
from njtc_solve.evaluation.evaluate import EvaluateSpec, check_unseen
from njtc_solve.maps.compatibility import check_compatible
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts

__all__ = ["SKIP_ROWS", "PairwiseResult", "evaluate_pairs"]

# held-out tokens of the skip scores when neither ``skip_rows`` nor ``max_rows`` bounds them: each pair
# reruns the model's blocks after its target on every scored sequence
SKIP_ROWS = 8192


@dataclass
class PairwiseResult:
    """One record per (method, source, target): ``rel_err``, ``r2``, ``identity_rel_err``, ``identity_r2``,
    ``n_rows`` and, with a live model, ``skip_kl``, ``skip_top1``, ``drop_kl``, ``drop_top1``, ``skip_rows``."""

    records: list[dict]
    meta: dict = field(default_factory=dict)

    def record(self, method: str, source: int, target: int) -> dict:
        """The record of one pair."""
        for r in self.records:
            if (r["method"], r["source"], r["target"]) == (method, source, target):
                return r
        raise KeyError((method, source, target))

    def to_pandas(self):
        """The records as a ``pandas.DataFrame`` (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.records)


def _check(source, loaded, allow_overlap, skip):
    """Refuse maps that do not belong to ``source``, twins, and (without ``allow_overlap``) seen rows."""
    seen = set()
    for sc in loaded:
        check_compatible(sc, source, target="any", head=False)  # maps between layers: no head reads them
        if (sc.name, sc.target_layer) in seen:
            raise NJTCError(f"two shortcut files are {sc.name} to target layer {sc.target_layer}")
        seen.add((sc.name, sc.target_layer))
        if not allow_overlap:
            check_unseen(source, sc, skip_positions=skip)


def evaluate_pairs(source, shortcuts, *, max_rows: int | None = None, chunk_rows: int = 1024, device: str = "cpu",
                   progress: bool = True, skip_positions: int | None = None, allow_overlap: bool = False,
                   skip_model: bool | None = None, skip_rows: int | None = None,
                   batch_size: int = 8) -> PairwiseResult:
    """Relative error and R² per (source, target) pair on held-out rows, and skip KL / top-1 with a model.

    Parameters
    ----------
    source : str, Path, ActivationStore or LiveSource
        The held-out rows.
    shortcuts : list of paths or Shortcuts
        Maps to any target layer (one file per method and target).
    max_rows : int, optional
        At most this many held-out rows for the relative error and R².
    skip_model : bool, optional
        Score the skips (default: when ``source`` is a live model; needs one).
    skip_rows : int, optional
        Held-out tokens for the skip scores (whole sequences); default ``max_rows``, else :data:`SKIP_ROWS`.
    batch_size : int
        Sequences per forward pass of the skip scores.
    """
    EvaluateSpec(max_rows=max_rows, skip_rows=skip_rows, chunk_rows=chunk_rows, device=device,
                 skip_positions=skip_positions, allow_overlap=allow_overlap)  # every setting, before a row is read
    with opened(source) as source:
        loaded = [s if isinstance(s, Shortcuts) else Shortcuts.load(s) for s in shortcuts]
        if not loaded:
            raise NJTCError("no shortcut file to evaluate")
        skip = source.default_skip_positions if skip_positions is None else int(skip_positions)
        model = getattr(source, "model", None)
        if skip_model is None:
            skip_model = model is not None
        if skip_model and model is None:
            raise NJTCError("skip scores (`skip_model=True`) need a live model as `source`, not a store")
        _check(source, loaded, allow_overlap, skip)
        if source.count("validation", skip) == 0:
            raise NJTCError(f"{source.path} has no validation rows at positions >= {skip}")
        loaded = [sc.to(device) for sc in loaded]
        records = _errors(source, loaded, max_rows, chunk_rows, device, progress, skip)
        if skip_model:
            _skips(source, loaded, records, skip_rows or max_rows or SKIP_ROWS, skip, batch_size, progress)
        meta = {"store": str(source.path), "n_layers": source.n_layers, "d_model": source.d_model,
                "skip_positions": skip, "validation_rows": records[0]["n_rows"] if records else 0}
        return PairwiseResult(records, meta)


def _errors(source, loaded, max_rows, chunk_rows, device, progress, skip) -> list[dict]:
    """Relative error and R² of every pair (and of the identity) over the held-out rows."""
    layers = sorted({l for sc in loaded for l in sc.maps} | {sc.target_layer for sc in loaded})
    layers = source.check_layers(layers)
    pairs = [(sc, l) for sc in loaded for l in sorted(sc.maps)]
    sse = {(sc.name, sc.target_layer, l): 0.0 for sc, l in pairs}
    sse_id = {(sc.target_layer, l): 0.0 for sc, l in pairs}
    targets = sorted({sc.target_layer for sc in loaded})
    sum_y = {t: torch.zeros(source.d_model, dtype=torch.float64) for t in targets}
    sum_y2 = dict.fromkeys(targets, 0.0)
    n = 0
    total = min(source.count("validation", skip), max_rows or np.inf)
    with torch.no_grad(), tqdm(total=total, unit="row", desc="pair errors", leave=False, disable=not progress) as bar:
        for _, chunk in source.iter_chunks(layers, "validation", chunk_rows, max_rows, skip_positions=skip):
            xs = {l: torch.as_tensor(chunk[l]).to(device, torch.float32) for l in layers}
            for t in targets:
                y = xs[t].double()
                sum_y[t] += y.sum(0).cpu()
                sum_y2[t] += float((y ** 2).sum())
            for sc, l in pairs:
                y_hat, y = sc.maps[l].predict(xs[l]).double(), xs[sc.target_layer].double()
                sse[sc.name, sc.target_layer, l] += float(((y_hat - y) ** 2).sum())
            for t, l in sse_id:  # the identity: the blocks between the two layers removed
                sse_id[t, l] += float(((xs[l].double() - xs[t].double()) ** 2).sum())
            rows = len(next(iter(xs.values())))
            n += rows
            bar.update(rows)
    records = []
    for sc, l in pairs:
        t = sc.target_layer
        sst = sum_y2[t] - float((sum_y[t] ** 2).sum()) / n
        records.append({"method": sc.name, "family": sc.method, "rank": sc.rank, "source": l, "target": t,
                        "rel_err": (sse[sc.name, t, l] / sum_y2[t]) ** 0.5, "r2": 1 - sse[sc.name, t, l] / sst,
                        "identity_rel_err": (sse_id[t, l] / sum_y2[t]) ** 0.5, "identity_r2": 1 - sse_id[t, l] / sst,
                        "n_rows": n})
    return records


def _apply(m: ShortcutMap):
    """A map on (batch, seq, d) hidden states, in their dtype."""
    return lambda h: m.predict(h.reshape(-1, h.shape[-1]).float()).reshape(h.shape).to(h.dtype)


def _skips(source, loaded, records, max_tokens, skip, batch_size, progress) -> None:
    """Skip KL and top-1 agreement of every pair (and of dropping the blocks), added to ``records``."""
    plan = source.plan
    sequences = np.flatnonzero(plan.split == VALIDATION)
    if max_tokens is not None:
        per_sequence = max(plan.seq_len - skip, 1)
        sequences = sequences[:max(1, -(-max_tokens // per_sequence))]
    runner = SkipRunner(source.model)
    device = next(source.model.parameters()).device
    by_pair = {(r["method"], r["target"], r["source"]): r for r in records}
    totals = {key: Counter() for key in by_pair}  # skip_scores's sums "kl", "agree" and "n", added up
    drops = {(t, l): Counter() for _, t, l in by_pair}
    batches = range(0, len(sequences), batch_size)
    with tqdm(total=len(batches) * len(by_pair), unit="pair", desc="skip", leave=False,
              disable=not progress) as bar:
        for b in batches:
            ids = torch.as_tensor(plan.token_ids[sequences[b:b + batch_size]], device=device)
            runner.record(ids)
            dropped_here = set()
            for sc in loaded:
                keep = int(sc.provenance.get("skip_positions", 0) or 0)
                t = sc.target_layer
                for l in sorted(sc.maps):
                    totals[sc.name, t, l].update(
                        skip_scores(runner, l, t, _apply(sc.maps[l]), keep_positions=keep, from_position=skip))
                    if (t, l) not in dropped_here:  # the blocks dropped (identity), once per pair
                        dropped_here.add((t, l))
                        drops[t, l].update(skip_scores(runner, l, t, lambda h: h, keep_positions=keep,
                                                       from_position=skip))
                    bar.update(1)
    for key, r in by_pair.items():
        got, dropped = totals[key], drops[key[1], key[2]]
        r.update({"skip_kl": got["kl"] / got["n"], "skip_top1": got["agree"] / got["n"],
                  "drop_kl": dropped["kl"] / dropped["n"], "drop_top1": dropped["agree"] / dropped["n"],
                  "skip_rows": got["n"]})

