"""Choosing a block replacement by its held-out KL to the full model: the library behind ``prune``.

:func:`prune_model` gathers the statistics on the training sequences, caches a sample of held-out
sequences spread across documents and scores every candidate there; the lowest KL wins, dropping
included. When the best two starts are within two standard errors both are rescored on more
sequences; each start's cosine distance and training residual are reported with how well each
predicts the KL.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from njtc_solve.core.architectures import FoldSpec, check_foldable
from njtc_solve.core.decoder import Decoder
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.models import model_sha256 as weights_sha256
from njtc_solve.core.params import Interval, Options, check_params
from njtc_solve.data.plan import PlanSpec, plan_extraction
from njtc_solve.data.rows import TRAIN, VALIDATION
from njtc_solve.prune.checkpoint import check_output_folder, save_pruned
from njtc_solve.prune.refine_fold import RefineFoldSpec, refine_fold
from njtc_solve.prune.replacement import Replacement, apply_replacement, check_removal, solve_replacement
from njtc_solve.prune.replacement_statistics import (SOME_WEIGHTINGS, WEIGHTINGS, ReplacementStatistics,
                                                     replacement_statistics)
from njtc_solve.prune.scoring import ReferenceSample, clustered_se, collect_reference, score_replacement

__all__ = ["PruneResult", "PruneSpec", "candidate_replacements", "choose_replacement", "paired_se", "prune_model",
           "spearman"]


@dataclass(frozen=True)
class PruneSpec:
    """The settings of one prune job, validated once (:meth:`check`) before any model loads.

    ``fold`` is the family's checked fold and ``intercepts`` where the candidates' intercept goes
    (``"none"``, ``"bias"`` or the config's option, e.g. ``"mlp_bias"``); the other fields are
    :func:`prune_model`'s settings.
    """

    model_type: str
    n_blocks: int
    fold: FoldSpec
    remove: int
    start: int | None = None
    weightings: tuple = WEIGHTINGS
    ridge: tuple = ()
    intercept: str = "auto"
    intercepts: tuple = ("none",)
    score_tokens: int = 2048
    rescore_tokens: int = 4096
    val_fraction: float = PlanSpec.val_fraction
    refine: RefineFoldSpec | None = None

    constraints: ClassVar[dict] = {
        "weightings": [SOME_WEIGHTINGS],
        "intercept": [Options(("auto", "none", "bias"), says="auto, none or bias")],
        "score_tokens": [Interval(float, 1, None, says="positive")],
        "rescore_tokens": [Interval(float, 0, None, says="0 or more")],
        "val_fraction": [Interval(float, 0, None, closed="neither", show_value=False,
                                  says="above 0: candidates are scored on held-out documents")],
    }

    @property
    def starts(self) -> list[int]:
        """Every start the job scores."""
        return [self.start] if self.start is not None else list(range(1, self.n_blocks - self.remove + 1))

    @classmethod
    def check(cls, config, n_blocks: int | None = None, *, remove: int, start: int | None = None,
              weightings=WEIGHTINGS, ridge=(), intercept: str = "auto", score_tokens: int = 2048,
              rescore_tokens: int = 4096, val_fraction: float = PlanSpec.val_fraction, refine=None) -> PruneSpec:
        """Validate a job against the model's configuration alone (no weights needed).

        Parameters
        ----------
        config : transformers.PretrainedConfig or object with ``model_type``
        n_blocks : int, optional
            Blocks of the model (default: ``config.num_hidden_layers``).
        remove, start, weightings, ridge, intercept, score_tokens, rescore_tokens, val_fraction, refine
            As :func:`prune_model`.

        Raises
        ------
        NJTCError
            One line naming the parameter.
        """
        fold = check_foldable(config)
        if isinstance(refine, str):
            refine = RefineFoldSpec.check(refine)
        elif refine is not None and not isinstance(refine, RefineFoldSpec):
            raise NJTCError(f"`refine` must be 'kl' or a RefineSpec, not {refine!r}")
        n_blocks = int(config.num_hidden_layers if n_blocks is None else n_blocks)
        check_removal(n_blocks, remove, start)
        weightings = tuple(weightings)
        check_params(cls.constraints, {"weightings": list(weightings), "intercept": intercept,
                                       "score_tokens": score_tokens, "rescore_tokens": rescore_tokens,
                                       "val_fraction": val_fraction})
        try:
            ridge = tuple(float(a) for a in ridge)
        except (TypeError, ValueError):
            raise NJTCError(f"`ridge` penalties must be positive numbers, not {ridge!r}") from None
        if any(not (a > 0 and math.isfinite(a)) for a in ridge):
            raise NJTCError(f"`ridge` penalties must be positive numbers, not {list(ridge)!r}")
        kind = config.model_type
        has_bias = fold.has_bias or bool(fold.bias_option and getattr(config, fold.bias_option, False))
        if intercept == "none":
            intercepts = ("none",)
        elif has_bias:
            intercepts = ("bias",)
        elif intercept == "bias" and fold.bias_option is None:
            raise NJTCError(f"`intercept` bias: {kind}'s MLP output projection has no bias and its config no option "
                            "for one; use `intercept` none or auto")
        else:
            options = (fold.bias_option,) if fold.bias_option else ()
            intercepts = options if intercept == "bias" else ("none",) + options
        return cls(kind, n_blocks, fold, int(remove), None if start is None else int(start), weightings, ridge,
                   intercept, intercepts, int(score_tokens), int(rescore_tokens), float(val_fraction), refine)

    def check_model(self, model) -> None:
        """Refuse a model that is not the one this job was checked against (another family or depth)."""
        n = Decoder.of(model).n_blocks
        kind = getattr(model.config, "model_type", None)
        if kind != self.model_type or n != self.n_blocks:
            raise NJTCError(f"the prune settings were checked for a {self.model_type} model of {self.n_blocks} "
                            f"blocks, not this {kind} model of {n}")

    def describe(self) -> dict:
        """The settings, for ``njtc_prune.json``."""
        return {"remove": self.remove, "selection": "auto" if self.start is None else "start",
                "weightings": list(self.weightings), "ridge": list(self.ridge), "intercepts": list(self.intercepts),
                "score_tokens": self.score_tokens, "rescore_tokens": self.rescore_tokens,
                "refine_settings": None if self.refine is None else self.refine.describe()}


@dataclass
class PruneResult:
    """What :func:`prune_model` chose and why.

    ``chosen`` the replacement to apply (the refined fold where refinement improved it);
    ``candidates`` every scored candidate (settings, held-out ``kl``, ``kl_se``, ``top1``,
    ``ppl``, training losses); ``full`` the full model's held-out perplexity; ``cosine`` per
    start the mean cosine similarity of ``h_S`` and ``h_{S+K}``, ``cosine_choice`` the start each
    picks; ``ranking`` per start the criteria, how well each predicts the held-out KL, and any
    rescoring; ``refine`` the refinement's summary or ``None``; ``stats`` the block statistics;
    ``spec`` the settings; ``record`` the provenance for ``njtc_prune.json``; ``timings`` in seconds.
    """

    chosen: Replacement
    candidates: list[dict]
    full: dict
    cosine: dict
    cosine_choice: dict
    record: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    ranking: dict = field(default_factory=dict)
    refine: dict | None = None
    stats: ReplacementStatistics | None = None
    spec: PruneSpec | None = None

    def best(self, start: int, fitted_only: bool = False) -> dict:
        """The best-scoring candidate at ``start`` (among the fitted maps only, with ``fitted_only``)."""
        pool = [c for c in self.candidates if c["start"] == start and not (fitted_only and c["name"] == "drop")]
        return min(pool, key=lambda c: c["kl"])

    def save(self, model, tokenizer, out, *, model_name: str = "", corpus_name: str = "",
             model_sha256: str | None = None, overwrite: bool = False) -> tuple[Path, dict]:
        """Apply the chosen replacement to ``model`` (in place) and write the smaller checkpoint.

        ``out`` is checked before ``model`` is touched. Returns the folder
        (:func:`~njtc_solve.prune.checkpoint.save_pruned`) and its ``njtc_prune.json`` record.
        """
        check_output_folder(out, overwrite=overwrite)  # before the model changes
        chosen = self.chosen
        sha = model_sha256 or weights_sha256(model)
        before = sum(p.numel() for p in model.parameters())
        apply_replacement(model, chosen, None if self.spec is None else self.spec.fold)
        params = {"before": before, "after": sum(p.numel() for p in model.parameters())}  # mlp_bias adds some
        record = {"parameters": params, "format": "njtc-prune", "format_version": 1, "model": model_name,
                  "model_sha256": sha, "architecture": model.config.model_type, "corpus": corpus_name,
                  "start": chosen.start, "removed_blocks": [chosen.start, chosen.start + chosen.remove - 1],
                  "method": chosen.name, "replacement": chosen.describe(), "full_model": self.full,
                  "cosine_choice": self.cosine_choice, "cosine": {str(s): v for s, v in self.cosine.items()},
                  "ranking": self.ranking, "refine": self.refine,
                  "candidates": self.candidates, "timings_s": self.timings, **self.record}
        return save_pruned(model, tokenizer, out, record=record, overwrite=overwrite), record


def candidate_replacements(stats, *, remove: int, starts, weightings=WEIGHTINGS, ridge=(),
                           intercepts=("none",)) -> list[Replacement]:
    """Every candidate at every start: plain dropping, then each weighting × ridge penalty × intercept."""
    maps = []
    for s in starts:
        d = next(m for key, m in stats.moments.items() if key[0] == s)["cxx"].shape[0]
        maps.append(Replacement.drop(s, remove, d))
        for weighting in weightings:
            for alpha in [0.0, *ridge]:
                for where in intercepts:
                    maps.append(solve_replacement(stats, start=s, remove=remove, weighting=weighting, alpha=alpha,
                                                  intercept=where != "none", intercept_name=where))
    return maps


def choose_replacement(model, stats, held: ReferenceSample, *, remove: int, starts, weightings=WEIGHTINGS, ridge=(),
                       intercepts=("none",), progress: bool = False) -> tuple[Replacement, list[dict], list]:
    """Solve and score every candidate; the one with the lowest held-out KL wins (dropping included).

    Returns the chosen replacement, every candidate's record (settings and
    :func:`~njtc_solve.prune.scoring.score_replacement`'s metrics) and the candidates, in order.
    """
    maps = candidate_replacements(stats, remove=remove, starts=starts, weightings=weightings, ridge=ridge,
                                  intercepts=intercepts)
    candidates = [{**rep.describe(), **score_replacement(model, held, rep)}
                  for rep in tqdm(maps, desc="prune: score", leave=False, disable=not progress)]
    best = min(range(len(maps)), key=lambda i: candidates[i]["kl"])
    return maps[best], candidates, maps


def paired_se(a, b, counts=None) -> float:
    """Standard error of the difference of two means over the same tokens, clustered by document.

    ``a`` and ``b`` are per document the two candidates' sums (``kl_by_document``) and ``counts``
    the tokens per document; without ``counts``, per-sequence means, each sequence a cluster.
    """
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return clustered_se(diff, np.ones(len(diff)) if counts is None else counts)


def _brief(score: dict) -> dict:
    return {k: score[k] for k in ("kl", "kl_se", "top1", "ppl")}


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties; ``nan`` below 3 values or for a constant one)."""
    from scipy.stats import rankdata

    if len(a) < 3:
        return math.nan
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _residual(stats: ReplacementStatistics, candidates: list[dict], start: int) -> float:
    """The lowest fitted map's training residual per row at ``start`` (row-weighted fits first)."""
    fitted = [c for c in candidates if c["start"] == start and c["name"] != "drop" and c["train_loss"] is not None]
    if not fitted:
        return math.nan
    rms = [c for c in fitted if c["weighting"] == "rms"] or fitted
    return min(c["train_loss"] for c in rms) / stats.n_rows


def _rank_starts(model, spec: PruneSpec, stats, held, candidates, maps, rescore_plan, batch_size):
    """``(chosen index into maps, ranking record)``: the best two starts rescored when within noise."""
    starts = spec.starts
    best = {s: min((i for i, c in enumerate(candidates) if c["start"] == s), key=lambda i: candidates[i]["kl"])
            for s in starts}
    kl = {s: candidates[best[s]]["kl"] for s in starts}
    rescore = None
    order = sorted(starts, key=lambda s: kl[s])
    if len(order) >= 2:
        a, b = order[:2]
        se = paired_se(candidates[best[a]]["kl_by_document"], candidates[best[b]]["kl_by_document"],
                       held.clusters()[1])
        gap = kl[b] - kl[a]
        rescore = {"starts": [a, b], "gap": gap, "gap_se": se, "within_noise": bool(not gap > 2 * se)}
        if rescore["within_noise"] and rescore_plan is not None:
            more = collect_reference(model, rescore_plan, batch_size=batch_size, starts=[a, b], fold=spec.fold)
            n0, n1 = held.n_rows, more.n_rows
            for s in (a, b):
                extra = score_replacement(model, more, maps[best[s]])
                rescore[f"kl_more_{s}"] = extra["kl"]
                kl[s] = (kl[s] * n0 + extra["kl"] * n1) / (n0 + n1)
            rescore.update({"tokens": n1, "kl_combined": {str(s): kl[s] for s in (a, b)}})
            order = sorted(starts, key=lambda s: kl[s])
    chosen_start = order[0]
    per_start = {str(s): {"kl": kl[s], "kl_se": candidates[best[s]]["kl_se"], "method": candidates[best[s]]["name"],
                          "angular_last": stats.cosine[(s, spec.remove)]["angular_last"],
                          "cosine_distance": 1 - stats.cosine[(s, spec.remove)]["all"],
                          "residual": _residual(stats, candidates, s)} for s in starts}
    kls = [kl[s] for s in starts]
    predicts = {name: spearman([per_start[str(s)][name] for s in starts], kls)
                for name in ("angular_last", "cosine_distance", "residual")}
    ranking = {"per_start": per_start, "rescore": rescore, "spearman_with_held_out_kl": predicts,
               "choice_by": {name: min(starts, key=lambda s, n=name: (per_start[str(s)][n], s))
                             for name in ("kl", "angular_last", "cosine_distance", "residual")}}
    ranking["choice_by"]["kl"] = chosen_start
    return best[chosen_start], ranking


def prune_model(model, tokenizer, documents, *, remove: int | None = None, start: int | None = None,
                weightings=WEIGHTINGS, ridge=(), intercept: str = "auto", seq_len: int = PlanSpec.seq_len,
                max_tokens: int | None = PlanSpec.max_tokens, val_fraction: float = PlanSpec.val_fraction,
                seed: int = PlanSpec.seed, bos: str = PlanSpec.bos, batch_size: int = PlanSpec.batch_size,
                score_tokens: int = 2048, rescore_tokens: int = 4096, refine=None,
                spec: PruneSpec | None = None, stats: ReplacementStatistics | None = None, stats_remove=(),
                model_sha256: str | None = None, progress: bool = True) -> PruneResult:
    """Fit, score and choose the replacement of ``remove`` consecutive blocks; the model is not changed.

    Parameters
    ----------
    model, tokenizer
        A causal LM of a foldable family (:data:`njtc_solve.core.architectures.FOLDABLE`) and its tokenizer.
    documents : list of str
        The corpus: its training documents give the statistics, held-out sequences the scores.
    remove : int
        Consecutive blocks to remove (at least 1, fewer than the blocks).
    start : int, optional
        First removed block (0-based, at least 1); ``None`` scores every start.
    weightings : tuple of {"plain", "rms"}
        Row weightings of the least-squares candidates (``rms``: 1 / mean(h_S²)).
    ridge : sequence of float
        Relative ridge penalties (units of ``tr C_xx / d``) of extra candidates.
    intercept : {"auto", "none", "bias"}
        ``auto``: into the projection's bias where it has one, else candidates without an
        intercept and with the config's bias option (Llama's ``mlp_bias``).
    seq_len, max_tokens, val_fraction, seed, bos, batch_size
        The corpus plan (:func:`njtc_solve.data.plan.plan_extraction`).
    score_tokens, rescore_tokens : int
        Held-out tokens the candidates are scored on, and further ones the best two starts are
        rescored on when within two standard errors (0: never).
    refine : {"kl"} or RefineFoldSpec, optional
        Refine the chosen fold by KL (:func:`~njtc_solve.prune.refine_fold.refine_fold`), kept
        only if its held-out KL is lower; both are then scored on ``score_tokens`` fresh
        held-out tokens (``refine["held_out_fresh"]``, ``None`` where none are left).
    spec : PruneSpec, optional
        The settings already checked; replaces ``remove`` ... ``refine`` (not the plan).
    stats : ReplacementStatistics, optional
        Block statistics of an earlier run of this model and plan: no pass over the training documents.
    stats_remove : sequence of int
        Further numbers of removed blocks to gather statistics for, at every start.
    model_sha256 : str, optional
        The hash of ``model``'s weights, where the caller has it.
    progress : bool
        Show progress bars.

    Returns
    -------
    PruneResult
        The choice and every candidate's scores; :meth:`PruneResult.save` writes the checkpoint.

    Examples
    --------
    >>> import copy
    >>> result = prune_model(model, tokenizer, documents, remove=1, start=1, seq_len=32, max_tokens=1024,
    ...                      score_tokens=64, progress=False)
    >>> result.chosen.start, sorted({c["name"] for c in result.candidates})[:1]
    (1, ['drop'])
    >>> out, record = result.save(copy.deepcopy(model), tokenizer, "pruned", model_name="tiny-llama")
    >>> record["n_blocks_before"] - record["n_blocks_after"], (out / "njtc_prune.json").is_file()
    (1, True)
    """
    if spec is None:
        if remove is None:
            raise NJTCError("`remove` is required (or a checked `spec`)")
        spec = PruneSpec.check(model.config, Decoder.of(model).n_blocks, remove=remove, start=start,
                               weightings=weightings, ridge=ridge, intercept=intercept, score_tokens=score_tokens,
                               rescore_tokens=rescore_tokens, val_fraction=val_fraction, refine=refine)
    elif remove is not None or start is not None or refine is not None:
        raise NJTCError("pass the job's settings in `spec` or as arguments, not both")
    spec.check_model(model)
    starts = spec.starts
    plan_record = {"seq_len": seq_len, "max_tokens": max_tokens, "val_fraction": spec.val_fraction, "seed": seed,
                   "bos": bos}
    stats_ks = sorted({spec.remove, *(int(k) for k in stats_remove)})
    for k in stats_ks:
        check_removal(spec.n_blocks, k)
    timings = {}
    t0 = time.perf_counter()
    plan = plan_extraction(tokenizer, documents, seq_len=seq_len, max_tokens=max_tokens,
                           val_fraction=spec.val_fraction, seed=seed, bos=bos)
    train_plan, score_plan, rescore_plan, fresh_plan = _plans(  # one start given: nothing to rescore
        plan, spec.score_tokens, spec.rescore_tokens if spec.start is None else 0, seed,
        spec.score_tokens if spec.refine is not None else 0)
    device = next(model.parameters()).device
    sha = model_sha256 or weights_sha256(model)
    if stats is not None:
        stats.check_serves(model_sha256=sha, model_type=spec.model_type, n_blocks=spec.n_blocks, remove=spec.remove,
                           starts=starts, weightings=spec.weightings, plan=plan_record)
    with tqdm(total=(0 if stats is not None else train_plan.n_rows) + score_plan.n_rows, unit="tok",
              unit_scale=True, desc="prune: pass", leave=False, disable=not progress) as bar:
        if stats is None:
            pairs = {s: [k for k in stats_ks if s + k <= spec.n_blocks] for s in range(1, spec.n_blocks)}
            pairs = {s: ks for s, ks in pairs.items() if ks and (s in starts or stats_remove)}
            meta = {"model_sha256": sha, "model_type": spec.model_type, "n_blocks": spec.n_blocks, "plan": plan_record}
            stats = replacement_statistics(model, train_plan, pairs, weightings=spec.weightings,
                                           batch_size=batch_size, device=device, bar=bar, fold=spec.fold, meta=meta)
        timings["train_pass_s"] = time.perf_counter() - t0
        held = collect_reference(model, score_plan, batch_size=batch_size, starts=starts, fold=spec.fold, bar=bar)
    timings["pass_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    _, candidates, maps = choose_replacement(model, stats, held, remove=spec.remove, starts=starts,
                                             weightings=spec.weightings, ridge=spec.ridge,
                                             intercepts=spec.intercepts, progress=progress)
    chosen_i, ranking = _rank_starts(model, spec, stats, held, candidates, maps, rescore_plan, batch_size)
    chosen = maps[chosen_i]
    timings["solve_and_score_s"] = time.perf_counter() - t1
    refined = None
    if spec.refine is not None:
        t2 = time.perf_counter()
        n_seq = max(1, -(-spec.refine.train_tokens // plan.seq_len))
        sample = np.sort(plan.spread_order(TRAIN, seed)[:n_seq])  # spread across the training documents
        train_cache = collect_reference(model, plan.sequences(sample), batch_size=batch_size,
                                        starts=[chosen.start], fold=spec.fold, logp_dtype=torch.float16)
        result = refine_fold(model, chosen, train_cache, held, spec.refine, progress=progress)
        del train_cache
        refined = {**result.describe(), "train_tokens": len(sample) * plan.seq_len, "from": chosen.name,
                   "total_seconds": time.perf_counter() - t2, "held_out_fresh": None}
        if fresh_plan is not None:  # tokens that neither chose the fold, nor stopped nor trained the refinement
            fresh = collect_reference(model, fresh_plan, batch_size=batch_size, starts=[chosen.start], fold=spec.fold)
            refined["held_out_fresh"] = {
                "tokens": fresh.n_rows, "documents": len(fresh.clusters()[1]),
                "start": _brief(score_replacement(model, fresh, chosen)),
                "best": _brief(score_replacement(model, fresh, result.replacement))}
            del fresh
        if result.improved:
            chosen = result.replacement
            candidates.append({**chosen.describe(), **result.best})
        timings["refine_s"] = time.perf_counter() - t2
    cosine = {s: stats.cosine[(s, spec.remove)] for s in starts}
    cosine_choice = {"all": max(starts, key=lambda s: cosine[s]["all"]),
                     "angular_last": min(starts, key=lambda s: cosine[s]["angular_last"])}
    timings["total_s"] = time.perf_counter() - t0
    record = {**spec.describe(), "n_blocks_before": spec.n_blocks, "n_blocks_after": spec.n_blocks - spec.remove,
              "plan": {**plan_record, "bos": plan.bos, "train_rows": stats.n_rows, "score_rows": held.n_rows,
                       "score_documents": len(held.clusters()[1]),
                       "positions": "all (position 0 included)",
                       "validation_documents": plan.validation_documents.tolist()}}
    return PruneResult(chosen, candidates, held.full_metrics(), cosine, cosine_choice, record, timings, ranking,
                       refined, stats, spec)


def _plans(plan, score_tokens: int, rescore_tokens: int, seed: int = 0, fresh_tokens: int = 0):
    """The plan's training sequences and three disjoint seeded samples of its validation sequences spread
    across documents: scoring, rescoring and fresh ones (``None`` where none are left)."""
    train = np.flatnonzero(plan.split == TRAIN)
    val = plan.spread_order(VALIDATION, seed)
    if len(train) == 0 or len(val) == 0:
        raise NJTCError("the plan has no training or no held-out sequences; raise `max_tokens` or change "
                        "`val_fraction`")
    n_score = min(len(val), max(1, -(-score_tokens // plan.seq_len)))
    n_more = min(len(val) - n_score, -(-rescore_tokens // plan.seq_len))
    n_fresh = min(len(val) - n_score - n_more, -(-fresh_tokens // plan.seq_len))
    taken = np.split(val, np.cumsum([n_score, n_more, n_fresh]))[:3]
    score, more, fresh = (plan.sequences(np.sort(part)) if len(part) else None for part in taken)
    return plan.sequences(slice(int(train[0]), int(train[-1]) + 1)), score, more, fresh
