"""Honest pruning statistics: samples spread across documents, errors clustered by document, and the
refinement's before → after KL on tokens that neither chose nor trained the map."""

from __future__ import annotations

import math

import numpy as np
import pytest

from njtc_solve.core.metrics import Reference, kl_divergence
from njtc_solve.core.models import load_model
from njtc_solve.data.corpus import load_corpus
from njtc_solve.data.plan import plan_extraction
from njtc_solve.data.rows import TRAIN, VALIDATION
from njtc_solve.prune.replacement import Replacement
from njtc_solve.prune.scoring import clustered_se, collect_reference, replaced_stream, score_replacement, tail_logits
from njtc_solve.prune.selection import _plans, paired_se, prune_model

PLAN = dict(seq_len=32, max_tokens=2400)


def brute_force_clustered_se(values, documents) -> float:
    """The cluster-robust sandwich (X'X)^-1 (Σ_g X_g'e_g e_g'X_g) (X'X)^-1 · G/(G-1) of the mean's
    regression on a constant, one document at a time, in float64."""
    values = np.asarray(values, dtype=np.float64)
    X = np.ones((len(values), 1))
    bread = np.linalg.inv(X.T @ X)
    residual = values - values.mean()
    meat = np.zeros((1, 1))
    groups = sorted(set(documents.tolist()))
    for g in groups:
        rows = np.flatnonzero(documents == g)
        score = X[rows].T @ residual[rows][:, None]
        meat += score @ score.T
    return float(math.sqrt((bread @ meat @ bread)[0, 0] * len(groups) / (len(groups) - 1)))


def test_clustered_se_against_brute_force():
    rng = np.random.default_rng(3)
    documents = rng.integers(0, 9, size=300)
    values = rng.gamma(2.0, size=300) + documents * 0.3  # correlated within a document
    sums = np.bincount(documents, weights=values)
    counts = np.bincount(documents)
    assert clustered_se(sums, counts) == pytest.approx(brute_force_clustered_se(values, documents), rel=1e-12)
    # one token per cluster: the usual standard error of a mean
    assert clustered_se(values, np.ones(300)) == pytest.approx(values.std(ddof=1) / math.sqrt(300), rel=1e-12)
    assert math.isnan(clustered_se([1.0], [3]))
    # paired over the same tokens: the clustered error of the per-token differences
    other = values + rng.normal(size=300) * 0.1
    assert paired_se(sums, np.bincount(documents, weights=other), counts) == pytest.approx(
        brute_force_clustered_se(values - other, documents), rel=1e-12)


@pytest.fixture(scope="module")
def setup(tiny_models):
    model, tok, _ = load_model(str(tiny_models["llama"]))
    documents = load_corpus()[1]
    return model, tok, documents, plan_extraction(tok, documents, val_fraction=0.25, **PLAN)


def test_scoring_error_is_clustered_by_document(setup):
    """score_replacement's kl_se equals the brute-force clustered error of the per-token KLs it scores."""
    model, tok, documents, plan = setup
    _, score_plan, _, _ = _plans(plan, 256, 0)
    held = collect_reference(model, score_plan, starts=[1])
    rep = Replacement.drop(1, 1, held.hidden[1].shape[-1])
    score = score_replacement(model, held, rep)
    logits = tail_logits(model, held.token_ids, replaced_stream(held, rep, slice(None)), first_block=2).float()
    flat = held.logp.reshape(-1, held.logp.shape[-1])
    per_token = kl_divergence(Reference(flat, flat.exp(), None), logits.reshape(-1, logits.shape[-1])).double().numpy()
    owners = np.asarray(score_plan.document).reshape(-1)
    assert len(set(owners.tolist())) >= 2
    assert score["kl"] == pytest.approx(per_token.mean(), rel=1e-9)
    assert score["kl_se"] == pytest.approx(brute_force_clustered_se(per_token, owners), rel=1e-9)


def test_scoring_and_refinement_samples_spread_across_documents(setup):
    """The scoring, rescoring and fresh sequences are disjoint seeded samples that visit every held-out
    document before a second sequence of any; the refinement's sample likewise over training documents."""
    _, _, _, plan = setup

    def owners(p):
        return [int(np.bincount(row - row.min()).argmax() + row.min()) for row in p.document]

    _, score, more, fresh = _plans(plan, 4 * 32, 4 * 32, seed=0, fresh_tokens=4 * 32)
    val_docs = set(owners(plan.sequences(np.flatnonzero(plan.split == VALIDATION))))
    assert len(set(owners(score))) == min(4, len(val_docs)) >= 2
    taken = [set(p.sequence.tolist()) for p in (score, more, fresh)]
    assert not (taken[0] & taken[1] or taken[0] & taken[2] or taken[1] & taken[2])
    train = plan.spread_order(TRAIN, 0)
    train_docs = set(owners(plan.sequences(train)))
    assert len(set(owners(plan.sequences(train[:6])))) == min(6, len(train_docs))
    assert not np.array_equal(plan.spread_order(TRAIN, 1), train)  # seeded


def test_refinement_reports_fresh_tokens(setup):
    """The before → after KL of the refinement is also measured on tokens no choice, stop or training saw."""
    model, tok, documents, _ = setup
    result = prune_model(model, tok, documents, remove=1, start=1, score_tokens=64, rescore_tokens=0,
                         refine="kl", progress=False, **PLAN)
    fresh = result.refine["held_out_fresh"]
    assert fresh is not None and fresh["tokens"] == 64 and fresh["documents"] >= 1
    assert {"kl", "kl_se"} <= set(fresh["start"]) and {"kl", "kl_se"} <= set(fresh["best"])
    assert result.record["plan"]["score_documents"] >= 2
    if not result.refine["improved"]:
        assert fresh["start"]["kl"] == fresh["best"]["kl"]
