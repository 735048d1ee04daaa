"""Statistics and evaluation straight from the forward pass equal those of extract-then-fit."""

from __future__ import annotations

import pytest
import torch
from conftest import run_command, run_module
from test_extract import _one_line_exit_2

from njtc_solve.data.corpus import load_corpus
from njtc_solve.core.errors import NJTCError
from njtc_solve.evaluation.evaluate import evaluate_shortcuts
from njtc_solve.data.extract import extract_activations
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.solve.statistics_pass import accumulate_statistics
from njtc_solve.core.models import load_model
from njtc_solve.maps.shortcuts import Shortcuts
from njtc_solve.data.live import LiveSource
from njtc_solve.solve.stats import Statistics
from njtc_solve.data.store import ActivationStore

PLAN = {"seq_len": 32, "max_tokens": 3072, "val_fraction": 0.25, "seed": 3}


@pytest.fixture(scope="module")
def live_and_store(tiny_models, tmp_path_factory):
    """The tiny Llama as a live source, and a store extracted with the same plan."""
    model, tokenizer, name = load_model(str(tiny_models["llama"]))
    _, documents = load_corpus()
    out = tmp_path_factory.mktemp("live") / "activations.h5"
    extract_activations(model, tokenizer, documents, out, model_name=name, progress=False, batch_size=5, **PLAN)
    live = LiveSource(model, tokenizer, documents, model_name=name, batch_size=3, **PLAN)
    live.tokenizer, live.documents = tokenizer, documents  # for tests that build a second source
    return live, out


def _relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(("method", "ranks", "normalize"), [("jtc", None, None), ("njtc", [4], None),
                                                            ("nnjtc", [4], "layer"), ("nnjtc", [4], "rms")])
def test_live_maps_equal_store_maps(live_and_store, method, ranks, normalize):
    """The must-show: float64 maps from the live pass within 1e-8 of extract-then-fit's."""
    live, path = live_and_store
    with ActivationStore(path) as store:
        [from_store] = fit_shortcuts(store, method=method, ranks=ranks, normalize=normalize, float64=True,
                                     progress=False)
    [from_live] = fit_shortcuts(live, method=method, ranks=ranks, normalize=normalize, float64=True, progress=False)
    assert from_live.provenance["split_id"] == from_store.provenance["split_id"]
    assert from_live.stats["layers"][1]["n_train"] == from_store.stats["layers"][1]["n_train"] > 1000
    for layer, m in from_store.maps.items():
        mine = from_live.maps[layer]
        full = (lambda s: s.weight) if method == "jtc" else (lambda s: s.U @ s.V)
        assert _relative(full(mine), full(m)) < 1e-8, layer
        assert _relative(mine.bias, m.bias) < 1e-8, layer


def test_live_statistics_are_the_store_statistics(live_and_store):
    """Not only the maps: every moment agrees, and a process's share adds up to the whole."""
    live, path = live_and_store
    with ActivationStore(path) as store:
        a = accumulate_statistics(store, [0, 2], float64=True, progress=False)
    b = accumulate_statistics(live, [0, 2], float64=True, progress=False)
    assert a.n_rows == b.n_rows
    assert _relative(b.cyy, a.cyy) < 1e-10 and _relative(b.layers[2].cxy, a.layers[2].cxy) < 1e-10
    # two shards of the training sequences, added, are the whole pass (what torchrun all-reduces)
    halves = []
    for rank in range(2):
        chunks = list(live.iter_chunks([2, 3], "train", shard=(rank, 2), skip_positions=1))
        halves.append(sum(len(rows) for rows, _ in chunks))
    assert sum(halves) == b.n_rows and min(halves) > 0


def test_live_evaluation_equals_store_evaluation(live_and_store):
    live, path = live_and_store
    [sc] = fit_shortcuts(live, method="njtc", ranks=[4], progress=False)
    with ActivationStore(path) as store:  # the live fit's held-out rows are the store's: no overlap
        on_store = evaluate_shortcuts(store, [sc], progress=False)
    on_live = evaluate_shortcuts(live, [sc], chunk_rows=50, progress=False)
    assert on_live.meta["validation_rows"] == on_store.meta["validation_rows"] > 100
    for record in on_store.records:
        other = on_live.value(record["method"], record["layer"], "kl")
        assert other == pytest.approx(record["kl"], rel=1e-5, abs=1e-7)
        assert on_live.value(record["method"], record["layer"], "precision@1") == record["precision@1"]


def test_live_source_checks_the_head_before_the_pass(live_and_store, monkeypatch):
    """A wrong head stops a live fit on its first batch, as it stops an extraction."""
    live, _ = live_and_store
    broken = LiveSource(live.model, live.tokenizer, live.documents, batch_size=3, **PLAN)
    broken._head.norm_weight = broken._head.norm_weight * 2
    calls = []
    original = live.model.forward
    monkeypatch.setattr(live.model, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    with pytest.raises(NJTCError, match="does not reproduce the model.s logits"):
        accumulate_statistics(broken, [1], progress=False)
    assert len(calls) == 1


def test_fit_and_evaluate_from_the_model_on_the_command_line(tiny_models, tmp_path):
    """`fit --model` writes shortcuts and statistics without a store; `fit --stats` alone refits
    another rank from them; `evaluate --model` takes the plan from the shortcut's provenance."""
    model = str(tiny_models["llama"])
    plan = ["--seq-len", "32", "--max-tokens", "2048", "--seed", "3"]
    stats = tmp_path / "stats.safetensors"
    done = run_module("njtc_solve.fit", "--model", model, *plan, "--method", "njtc", "--rank", "4",
                      "--save-stats", str(stats), "--out", str(tmp_path / "a.safetensors"), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob("*.h5"))
    saved = Statistics.load(stats)
    assert saved.meta["provenance"]["split_id"] and Statistics.load_head(stats).vocab_size > 100
    again = run_command("fit", "--stats", str(stats), "--method", "njtc", "--rank", "2",
                       "--out", str(tmp_path / "b.safetensors"), "--no-progress")
    assert again.returncode == 0, again.stderr
    direct = run_command("fit", "--model", model, *plan, "--method", "njtc", "--rank", "2",
                        "--out", str(tmp_path / "c.safetensors"), "--no-progress")
    assert direct.returncode == 0, direct.stderr
    a, b, c = (Shortcuts.load(tmp_path / f"{n}.safetensors") for n in "abc")
    assert b.provenance == a.provenance == c.provenance and b.maps[1].rank == 2
    for layer in b.maps:  # refitting from the saved statistics is fitting from the model again
        assert torch.allclose(b.maps[layer].U @ b.maps[layer].V, c.maps[layer].U @ c.maps[layer].V, atol=1e-5)
    report = tmp_path / "report"
    evaluated = run_command("evaluate", "--model", model, "--shortcuts", str(tmp_path / "b.safetensors"),
                           "--out", str(report), "--no-progress")
    assert evaluated.returncode == 0, evaluated.stderr
    assert (report / "results.csv").is_file()
    # a plan that contradicts the shortcut's own is refused before the model runs
    _one_line_exit_2(run_command("evaluate", "--model", model, "--shortcuts",
                                str(tmp_path / "b.safetensors"), "--seed", "4", "--out", str(report)),
                     "fitted on")



def test_a_bfloat16_model_fits_live_with_its_rows_upcast(tiny_models, live_and_store):
    """A bf16 model passes its head check (bf16 tolerance); its rows are upcast to float32
    before the shifted accumulation, and its maps are the float32 model's to bf16 precision."""
    live, path = live_and_store
    model, tokenizer, name = load_model(str(tiny_models["llama"]), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    half = LiveSource(model, tokenizer, live.documents, model_name=name, batch_size=3, **PLAN)
    [from_half] = fit_shortcuts(half, method="jtc", layers=[2], progress=False)
    with ActivationStore(path) as store:
        [exact] = fit_shortcuts(store, method="jtc", layers=[2], progress=False)
    assert from_half.model_sha256 != exact.model_sha256  # another model: its own weights' hash
    assert _relative(from_half.maps[2].weight, exact.maps[2].weight) < 0.1


def test_fits_record_their_head_and_evaluation_refuses_another(live_and_store):
    live, path = live_and_store
    with ActivationStore(path) as store:
        [sc] = fit_shortcuts(store, method="njtc", ranks=[4], layers=[1], progress=False)
        assert sc.head_sha256 == store.head().fingerprint() == live.head().fingerprint()  # store and model agree
        sc.head_sha256 = "0" * 64
        with pytest.raises(NJTCError, match="fitted for another head"):
            evaluate_shortcuts(store, [sc], progress=False)


def test_one_position_per_sequence_live_equals_store(live_and_store, tmp_path):
    """The JTC protocol (one random position per sequence) picks the same rows live."""
    live, _ = live_and_store
    plan = dict(PLAN, positions="one-per-sequence", max_tokens=None)
    path = extract_activations(live.model, live.tokenizer, live.documents, tmp_path / "one.h5", progress=False,
                               **plan)
    one = LiveSource(live.model, live.tokenizer, live.documents, batch_size=7, **plan)
    with ActivationStore(path) as store:
        a = accumulate_statistics(store, [1], float64=True, progress=False)
    b = accumulate_statistics(one, [1], float64=True, progress=False)
    assert a.n_rows == b.n_rows == one.count("train", 1) > 50
    assert _relative(b.layers[1].cxy, a.layers[1].cxy) < 1e-10


def test_evaluating_live_on_another_corpus_than_the_fit_needs_it_named(tiny_models, tmp_path):
    """The plan comes from the shortcut's provenance; its corpus cannot, so the default corpus is
    refused when the fit read another (a silent evaluation on other text is the failure)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i} of a small corpus, about the numbers {i} and {i + 1}." for i in range(300)))
    model = str(tiny_models["llama"])
    fitted = run_command("fit", "--model", model, "--corpus", str(corpus), "--seq-len", "32",
                        "--method", "njtc", "--rank", "2", "--out", str(tmp_path / "c.safetensors"), "--no-progress")
    assert fitted.returncode == 0, fitted.stderr
    _one_line_exit_2(run_command("evaluate", "--model", model, "--shortcuts", str(tmp_path / "c.safetensors"),
                                "--out", str(tmp_path / "report")), "pass --corpus")
    named = run_command("evaluate", "--model", model, "--corpus", str(corpus), "--shortcuts",
                       str(tmp_path / "c.safetensors"), "--out", str(tmp_path / "report"), "--no-progress")
    assert named.returncode == 0, named.stderr


def test_a_store_without_a_source_layer_is_refused(tiny_models, tmp_path):
    done = run_module("njtc_solve.extract", "--model", str(tiny_models["llama"]), "--layers", "3",
                      "--out", str(tmp_path / "a.h5"))
    _one_line_exit_2(done, "no source layer")


def test_live_one_jump_equals_the_stores(live_and_store):
    """One map for every layer from the model's forward pass: the store's, within 1e-8 (float64)."""
    live, path = live_and_store
    with ActivationStore(path) as store:
        [from_store] = fit_shortcuts(store, method="nnjtc", normalize="batch", ranks=[4], one_jump=True, float64=True,
                                     progress=False)
    [from_live] = fit_shortcuts(live, method="nnjtc", normalize="batch", ranks=[4], one_jump=True, float64=True,
                                progress=False)
    assert from_live.one_jump == "pooled" and sorted(from_live.maps) == sorted(from_store.maps)
    mine, theirs = from_live.maps[0], from_store.maps[0]
    assert _relative(mine.U @ mine.V, theirs.U @ theirs.V) < 1e-8 and _relative(mine.bias, theirs.bias) < 1e-8
    for layer, m in from_store.maps.items():
        assert _relative(from_live.maps[layer].norm_scale, m.norm_scale) < 1e-8, layer
