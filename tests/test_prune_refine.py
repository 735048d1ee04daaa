"""Pruning beyond the closed form: KL refinement of the fold, saved block statistics, starts ranked with noise.

The refined checkpoint is loaded by plain transformers in a subprocess that never imports
njtc_solve and must reproduce the logits the refinement scored; refinement never returns a
map worse than its start; statistics written once serve another start or K without a pass;
bad input is one line before the model loads.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from njtc_solve.cli import run_cli
from njtc_solve.core.errors import NJTCError
from njtc_solve.data.corpus import load_corpus
from njtc_solve.data.plan import plan_extraction
from njtc_solve.prune.checkpoint import PRUNE_RECORD
from njtc_solve.prune.refine_fold import RefineFoldSpec, refine_fold
from njtc_solve.prune.replacement import solve_replacement
from njtc_solve.prune.replacement_statistics import ReplacementStatistics
from njtc_solve.prune.scoring import collect_reference, replaced_stream, score_replacement, tail_logits
from njtc_solve.prune.selection import PruneSpec, prune_model

PLAN = dict(seq_len=32, max_tokens=2400)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()[1]


@pytest.fixture(scope="module")
def caches(llama, corpus):
    """The tiny Llama's statistics at start 1, K = 1, and cached training and held-out sequences."""
    from njtc_solve.prune.replacement_statistics import replacement_statistics

    model, tok = llama
    plan = plan_extraction(tok, corpus, val_fraction=0.25, **PLAN)
    n_train = int((plan.split == 0).sum())
    train = plan.sequences(slice(0, n_train))
    stats = replacement_statistics(model, train, {1: [1]})
    return (stats, collect_reference(model, train.sequences(slice(0, 16)), starts=[1]),
            collect_reference(model, plan.sequences(slice(n_train, n_train + 4)), starts=[1]))


_LOADER = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    ids = torch.load(sys.argv[1] + "/ids.pt")
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, sys.argv[1] + "/loaded.pt")
    assert not any(m.startswith("njtc_solve") for m in sys.modules)
""")


def test_refined_fold_loads_in_plain_transformers_and_reproduces_the_scored_logits(llama, corpus, tmp_path):
    model, tok = llama
    refine = RefineFoldSpec.check(lr=3e-3, steps=30, check_every=10, patience=0, train_tokens=512)
    result = prune_model(model, tok, corpus, remove=1, start=1, score_tokens=128, rescore_tokens=0, refine=refine,
                         progress=False, **PLAN)
    r = result.refine
    assert r["improved"] and result.chosen.name.endswith("+kl"), r
    assert r["held_out_best"]["kl"] < r["held_out_start"]["kl"] and r["steps"] > 0
    if r["from"] == "drop":  # the start was plain dropping: T = I
        closed = torch.eye(32, dtype=torch.float64)
    else:
        closed = solve_replacement(result.stats, start=1, remove=1, weighting=result.chosen.weighting,
                                   intercept=result.chosen.c is not None, intercept_name=result.chosen.intercept).T
    assert (result.chosen.T - closed).abs().max() > 1e-4  # trained away from the closed form
    # the logits the refinement scored: the full model's tail on the refined stream
    plan = plan_extraction(tok, corpus, val_fraction=0.25, **PLAN)
    val = int((plan.split == 0).sum())
    held = collect_reference(model, plan.sequences(slice(val, val + 2)), starts=[1])
    scored = tail_logits(model, held.token_ids, replaced_stream(held, result.chosen, slice(0, 2)), first_block=2)
    assert result.best(1)["kl"] == r["held_out_best"]["kl"]
    out, record = result.save(copy.deepcopy(model), tok, tmp_path / "refined", model_name="tiny-llama")
    assert record["method"].endswith("+kl") and record["refine"]["improved"]
    torch.save(held.token_ids, out / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _LOADER, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = torch.load(out / "loaded.pt")
    assert (loaded - scored).abs().max() <= 1e-5 * scored.abs().max()


def test_refinement_never_returns_a_worse_map(llama, caches):
    """A learning rate that wrecks the map: every check is worse than the start, so the start comes back."""
    model, _ = llama
    stats, train, held = caches
    start = solve_replacement(stats, start=1, remove=1, weighting="plain", intercept=False)
    result = refine_fold(model, start, train, held, RefineFoldSpec.check(lr=30.0, steps=6, check_every=2, patience=0,
                                                                    train_tokens=512))
    assert result.history and all(h["kl"] > result.start["kl"] for h in result.history), result.history
    assert not result.improved and result.replacement is start and result.best["kl"] == result.start["kl"]


def test_refinement_keeps_its_best_checked_map(llama, caches):
    model, _ = llama
    stats, train, held = caches
    start = solve_replacement(stats, start=1, remove=1, weighting="rms", intercept=True, intercept_name="mlp_bias")
    result = refine_fold(model, start, train, held, RefineFoldSpec.check(lr=3e-3, steps=20, check_every=5, patience=0,
                                                                    train_tokens=512))
    assert result.improved and result.best["kl"] == min(h["kl"] for h in result.history) < result.start["kl"]
    assert result.replacement.c is not None and result.replacement.name == start.name + "+kl"
    assert score_replacement(model, held, result.replacement)["kl"] == pytest.approx(result.best["kl"], rel=1e-9)


def test_refine_spec_refusals():
    for bad, message in [(dict(lr=float("nan")), "`lr` must be a finite positive number"),
                         (dict(lr=float("inf")), "`lr` must be a finite positive number"),
                         (dict(lr=0.0), "`lr` must be a finite positive number"),
                         (dict(steps=0), "`steps` must be at least 1"),
                         (dict(patience=-1), "`patience` must be 0 or more"),
                         (dict(time_budget=float("nan")), "`time_budget` must be")]:
        with pytest.raises(NJTCError, match=message):
            RefineFoldSpec.check(**bad)
        with pytest.raises(NJTCError, match=message):  # a spec made by hand is checked as well
            RefineFoldSpec(**bad)
    with pytest.raises(NJTCError, match="`refine` must be one of kl"):
        RefineFoldSpec.check("mse")


def _bad(argv, capsys, monkeypatch):
    import njtc_solve.core.models as models
    from njtc_solve.cli.prune import main

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = run_cli(main, argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("extra,message", [
    (["--refine", "kl", "--lr", "nan"], "--lr must be a finite positive number, not nan"),
    (["--refine", "kl", "--lr", "-1"], "--lr must be a finite positive number, not -1.0"),
    (["--refine", "kl", "--lr", "inf"], "--lr must be a finite positive number"),
    (["--refine", "kl", "--steps", "0"], "--steps must be at least 1"),
    (["--refine", "kl", "--refine-batch", "0"], "--refine-batch must be at least 1"),
    (["--lr", "1e-3"], "--lr is a refinement setting; add --refine kl"),
    (["--stats-remove", "2"], "--stats-remove gathers statistics to save; add --save-stats"),
    (["--rescore-tokens", "-1"], "--rescore-tokens must be 0 or more"),
])
def test_bad_refine_input_before_the_model_loads(tiny_models, tmp_path, capsys, monkeypatch, extra, message):
    out = tmp_path / "out"
    code, err = _bad(["--model", str(tiny_models["llama"]), "--remove", "1", "--auto", "--out", str(out), *extra],
                     capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_statistics_round_trip(caches, tmp_path):
    stats = caches[0]
    path = stats.save(tmp_path / "stats.safetensors")
    back = ReplacementStatistics.load(path)
    assert back.pairs == stats.pairs and back.n_rows == stats.n_rows and back.cosine == stats.cosine
    for w in ("plain", "rms"):
        a = solve_replacement(stats, start=1, remove=1, weighting=w, intercept=True)
        b = solve_replacement(back, start=1, remove=1, weighting=w, intercept=True)
        assert torch.equal(a.T, b.T) and torch.equal(a.c, b.c)
    with pytest.raises(NJTCError, match="exists; pass `overwrite=True`"):
        stats.save(path)
    stats.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]  # no temporary file left


def test_damaged_statistics_refused(caches, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = caches[0].save(tmp_path / "stats.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    cases = {"nan": ({**tensors, "s1.plain.cxx": tensors["s1.plain.cxx"] * float("nan")}, meta,
                     "s1.plain.cxx is not finite float64"),
             "shape": ({**tensors, "s1.k1.rms.cxt": tensors["s1.k1.rms.cxt"][:3]}, meta,
                       "s1.k1.rms.cxt has shape (3, 32), expected (32, 32)"),
             "missing": ({k: v for k, v in tensors.items() if k != "s1.k1.plain.mean_t"}, meta,
                         "it has no tensor s1.k1.plain.mean_t"),
             "foreign": (tensors, {**meta, "format": "njtc-statistics"}, "is not an njtc block statistics file")}
    for name, (t, m, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        save_file(t, bad, metadata=m)
        with pytest.raises(NJTCError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            ReplacementStatistics.load(bad)
        assert len(str(err.value).splitlines()) == 1


def test_saved_statistics_serve_another_start_and_k_without_a_pass(tiny_models, tmp_path, capsys, monkeypatch):
    from njtc_solve.cli.prune import main
    from njtc_solve.prune import selection

    model = str(tiny_models["llama"])
    stats = tmp_path / "stats.safetensors"
    base = ["--model", model, "--seq-len", "32", "--max-tokens", "1600", "--score-tokens", "128", "--no-progress"]
    assert run_cli(main, [*base, "--remove", "1", "--start", "1", "--out", str(tmp_path / "a"),
                          "--save-stats", str(stats), "--stats-remove", "2"]) == 0
    assert "block statistics of K = 1, 2 at every start" in capsys.readouterr().out
    fresh = json.loads((tmp_path / "a" / PRUNE_RECORD).read_text())
    # the same job from the file: the same candidates and scores, and no pass over the training documents
    real = selection.replacement_statistics
    monkeypatch.setattr(selection, "replacement_statistics", lambda *a, **k: pytest.fail("a statistics pass ran"))
    assert run_cli(main, [*base, "--remove", "1", "--start", "1", "--out", str(tmp_path / "b"), "--stats",
                          str(stats)]) == 0
    again = json.loads((tmp_path / "b" / PRUNE_RECORD).read_text())
    assert [(c["name"], c["kl"]) for c in again["candidates"]] == [(c["name"], c["kl"]) for c in fresh["candidates"]]
    # another K at another start, from the same file
    assert run_cli(main, [*base, "--remove", "2", "--start", "1", "--out", str(tmp_path / "c"), "--stats",
                          str(stats)]) == 0
    assert json.loads((tmp_path / "c" / PRUNE_RECORD).read_text())["n_blocks_after"] == 1
    monkeypatch.setattr(selection, "replacement_statistics", real)
    capsys.readouterr()
    # refused before the model loads: a K the file cannot serve, another model, another plan; an input kept
    import njtc_solve.core.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cases = [([*base, "--remove", "1", "--auto", "--stats", str(stats), "--max-tokens", "1000"],
              "were gathered with --max-tokens 1600, not --max-tokens 1000"),
             (["--model", str(tiny_models["gpt2"]), "--remove", "1", "--start", "1", "--stats", str(stats)],
              "are from another model: its model type 'llama' is not this model's 'gpt2'"),
             ([*base, "--remove", "1", "--start", "1", "--stats", str(stats), "--seed", "5"],
              "were gathered with --seed 0, not --seed 5"),
             ([*base, "--remove", "1", "--start", "1", "--save-stats", model + "/model.safetensors"],
              "an output never goes into an input's folder; choose another --save-stats"),
             ([*base, "--remove", "1", "--start", "1", "--save-stats", str(stats)], "exists; pass --overwrite")]
    for argv, message in cases:
        code = run_cli(main, [*argv, "--out", str(tmp_path / "d")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert message is None or message in err, err
    assert not (tmp_path / "d").exists()


def test_stats_that_cannot_serve_a_k(caches, tmp_path, tiny_models, capsys, monkeypatch):
    from njtc_solve.cli.prune import main

    stats = caches[0]
    only_k1 = ReplacementStatistics(stats.moments, stats.cosine, stats.n_rows, {"model_type": "llama", "n_blocks": 3})
    path = only_k1.save(tmp_path / "only-k1.safetensors")
    code, err = _bad(["--model", str(tiny_models["llama"]), "--remove", "2", "--start", "1", "--out",
                      str(tmp_path / "o"), "--stats", str(path)], capsys, monkeypatch)
    assert code == 2 and "hold no statistics for --remove 2 at start 1" in err, err
    assert main is not None


def test_starts_ranked_with_standard_errors(llama, corpus):
    model, tok = llama
    result = prune_model(model, tok, corpus, remove=1, score_tokens=128, rescore_tokens=256, progress=False, **PLAN)
    assert all(c["kl_se"] > 0 and len(c["kl_per_sequence"]) == 4 for c in result.candidates)
    ranking = result.ranking
    assert set(ranking["per_start"]) == {"1", "2"}
    for s in ("1", "2"):
        assert {"kl", "kl_se", "angular_last", "cosine_distance", "residual"} <= set(ranking["per_start"][s])
        assert ranking["per_start"][s]["residual"] > 0
    assert set(ranking["spearman_with_held_out_kl"]) == {"angular_last", "cosine_distance", "residual"}
    again = ranking["rescore"]
    assert again["starts"] == sorted(again["starts"], key=lambda s: result.best(s)["kl"])
    if again["within_noise"]:
        assert again["tokens"] == 256 and set(again["kl_combined"]) == {str(s) for s in again["starts"]}
        assert result.chosen.start == min(again["starts"], key=lambda s: again["kl_combined"][str(s)])
    else:
        assert "tokens" not in again and result.chosen.start == again["starts"][0]


def test_rescoring_decides_between_close_starts(llama, corpus, monkeypatch):
    """Two starts within noise: the extra tokens decide, and the start they favour is chosen."""
    from njtc_solve.prune import selection

    model, tok = llama
    real = selection.score_replacement
    calls = []

    def rigged(model, held, rep, **kw):  # identical scores on the first tokens; start 2 better on the extra ones
        score = real(model, held, rep, **kw)
        calls.append(held.n_rows)
        if held.n_rows == 128:
            return {**score, "kl": 1.0 + (0 if rep.name == "drop" else -0.5),
                    "kl_by_document": [0.5] * len(score["kl_by_document"])}
        return {**score, "kl": 0.1 if rep.start == 2 else 0.2}

    monkeypatch.setattr(selection, "score_replacement", rigged)
    result = prune_model(model, tok, corpus, remove=1, score_tokens=128, rescore_tokens=256, progress=False, **PLAN)
    again = result.ranking["rescore"]
    assert again["within_noise"] and again["tokens"] == 256 and result.chosen.start == 2, again


def test_prune_spec_checked_once_and_handed_down(llama, corpus, monkeypatch):
    """prune_model with a checked PruneSpec checks foldability nowhere else."""
    from njtc_solve.core import architectures
    from njtc_solve.prune import replacement

    model, tok = llama
    spec = PruneSpec.check(model.config, remove=1, start=2, score_tokens=64, rescore_tokens=0)
    for module in (architectures, replacement):  # the decoder checks through the first, the fold through its own name
        monkeypatch.setattr(module, "check_foldable", lambda *a: pytest.fail("foldability checked again"))
    result = prune_model(model, tok, corpus, spec=spec, progress=False, **PLAN)
    assert result.spec is spec and result.chosen.start == 2
    with pytest.raises(NJTCError, match="not both"):
        prune_model(model, tok, corpus, spec=spec, remove=1, progress=False, **PLAN)
    from transformers import GPT2Config

    other = PruneSpec.check(GPT2Config(n_layer=3), remove=1)
    with pytest.raises(NJTCError, match="checked for a gpt2 model of 3 blocks, not this llama model of 3"):
        prune_model(model, tok, corpus, spec=other, progress=False, **PLAN)


def test_prune_command_refines(tiny_models, tmp_path, capsys):
    from njtc_solve.cli.prune import main

    out = tmp_path / "pruned"
    argv = ["--model", str(tiny_models["llama"]), "--remove", "1", "--start", "1", "--out", str(out), "--seq-len",
            "32", "--max-tokens", "1600", "--score-tokens", "128", "--no-progress", "--refine", "kl", "--lr", "3e-3",
            "--steps", "20", "--check-every", "5", "--refine-tokens", "512"]
    assert run_cli(main, argv) == 0
    printed = capsys.readouterr().out
    assert "refined lsq" in printed and "held-out KL" in printed, printed
    assert "tokens of" in printed and "that neither chose nor trained the map" in printed, printed
    assert "(optimistic)" in printed
    record = json.loads((out / PRUNE_RECORD).read_text())
    assert record["refine"]["steps"] > 0 and record["refine"]["held_out_best"]["kl"] <= \
        record["refine"]["held_out_start"]["kl"]


def test_linearpatch_construction():
    """The benchmark's LinearPatch: an orthogonal Hadamard matrix of SmolLM2's width, and P = H diag(s) Hᵀ."""
    from conftest import benchmark_module

    bench = benchmark_module("prune_quality")
    H = bench.hadamard(576)
    assert torch.allclose(H @ H.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert set((H * 24).round().unique().tolist()) == {-1.0, 1.0}
    rot = bench.RotatedAbs(bench.hadamard(32))
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, 4, 32, generator=g) * (l + 1) for l in range(3)]
    rot(hidden, None)
    P = rot.patch(0, 2)  # layer 2 is 3x layer 0: the scales are about 3
    assert torch.allclose(P, P.T) and 2 < float(torch.linalg.eigvalsh(P).mean()) < 4
