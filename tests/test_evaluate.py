"""Evaluation: hand-computed metrics on a tiny vocabulary, early exit, the report, bad input."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import run_command, run_module
from njtc_solve.core.errors import NJTCError
from njtc_solve.evaluation.evaluate import early_exit_curve, evaluate_shortcuts
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts
from njtc_solve.data.store import ActivationStore
from test_extract import _one_line_exit_2

V = D = 12


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def write_store(path, hidden, split, sha="abc"):
    """An activation store written by hand from design.md §3 (not by our extractor).

    Head: RMS norm with a random gain ``g`` and a negligible epsilon, unembedding
    ``diag(1/g)``, so the logits are ``h / rms(h)`` while a norm applied twice (or a gain
    dropped) changes them. Every row is at position 1, past the skipped first position.
    """
    n = len(split)
    with h5py.File(path, "w") as f:
        attrs = {"format": "njtc-activations", "format_version": 1, "model": "hand", "architecture": "llama",
                 "n_layers": len(hidden) - 1, "d_model": D, "vocab_size": V, "dtype": "float32", "seq_len": 1,
                 "positions": "all", "corpus": "hand", "corpus_sha256": "", "model_sha256": sha,
                 "rows_written": n, "complete": True}
        f.attrs.update(attrs)
        for layer, rows in hidden.items():
            f[f"hidden/{layer}"] = np.asarray(rows, np.float32)
        f["tokens"] = np.zeros(n, np.int32)
        f["sequence"] = np.arange(n, dtype=np.int32)
        f["position"] = np.ones(n, np.int32)
        f["split"] = np.asarray(split, np.uint8)
        f["final_top1"] = np.asarray(hidden[len(hidden) - 1], np.float32).argmax(1).astype(np.int32)
        gain = np.random.default_rng(0).uniform(0.5, 1.5, D).astype(np.float32)
        f["head/norm_weight"] = gain
        f["head/unembed"] = np.diag(1 / gain).astype(np.float32)
        f["head"].attrs.update({"norm": "rmsnorm", "eps": 1e-12})
    return path


@pytest.fixture
def hand_store(tmp_path):
    ranking = np.arange(D, dtype=np.float32)[::-1].copy()  # token j is the model's (j+1)-th choice
    final = np.stack([ranking * (1 + 0.1 * i) for i in range(4)])
    early = np.zeros((4, D), np.float32)
    early[:, 0] = 1.0  # training rows: anything
    early[2] = 5.0 * np.eye(D)[2]  # validation row: top-1 is the model's 3rd choice
    early[3] = 5.0 * np.eye(D)[6]  # validation row: top-1 is the model's 7th choice
    return write_store(tmp_path / "hand.h5", {0: early, 1: final.copy(), 2: final}, [0, 0, 1, 1])


def _exact(layers=(0, 1)):
    return Shortcuts("jtc", {l: ShortcutMap(weight=torch.eye(D)) for l in layers}, 2, model_sha256="abc")


def test_the_hand_store_head_exposes_a_double_norm(hand_store):
    with ActivationStore(hand_store) as store:
        head, h = store.head(), torch.from_numpy(store.file["hidden/2"][...])
    once = head.logits(h)
    assert torch.allclose(once, h / h.pow(2).mean(1, keepdim=True).sqrt(), atol=1e-5)
    assert (head.logits(head.normalize(h)) - once).abs().max() > 1e-2


def test_a_perfect_shortcut_scores_one_and_zero_kl(hand_store):
    result = evaluate_shortcuts(hand_store, [_exact()], progress=False, allow_overlap=True)
    p1 = {(r["method"], r["layer"]): r for r in result.records}
    rec = p1["jtc", 1]
    with h5py.File(hand_store) as f:
        h = f["hidden/2"][2:]
    own = np.mean([-np.log(_softmax(row / np.sqrt((row**2).mean()))[0]) for row in h])
    assert rec["precision@1"] == rec["precision@5"] == rec["precision@10"] == 1.0
    assert rec["surprisal"] == pytest.approx(own, rel=1e-5)
    assert result.meta["model_surprisal"] == pytest.approx(own, rel=1e-5)
    assert rec["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rec["mse"] == pytest.approx(0.0, abs=1e-10) and rec["r2"] == pytest.approx(1.0)


def test_precision_at_k_counts_the_kth_choice(hand_store):
    result = evaluate_shortcuts(hand_store, [], progress=False)
    rec = result.value  # identity at layer 0: top-1s are the model's 3rd and 7th choices
    assert rec("identity", 0, "precision@1") == 0.0
    assert rec("identity", 0, "precision@5") == 0.5
    assert rec("identity", 0, "precision@10") == 1.0
    with h5py.File(hand_store) as f:
        final, early = f["hidden/2"][2:], f["hidden/0"][2:]
    p_f = [_softmax(r / np.sqrt((r**2).mean())) for r in final]
    p_s = [_softmax(r / np.sqrt((r**2).mean())) for r in early]
    surprisal = np.mean([-np.log(p_f[0][2]), -np.log(p_f[1][6])])
    kl = np.mean([(pf * np.log(pf / ps)).sum() for pf, ps in zip(p_f, p_s)])
    assert rec("identity", 0, "surprisal") == pytest.approx(surprisal, rel=1e-5)
    assert rec("identity", 0, "kl") == pytest.approx(kl, rel=1e-4)
    assert rec("identity", 1, "precision@1") == 1.0


def test_early_exit_by_hand():
    margins = np.array([[0.9, 0.1], [0.95, 0.99]])
    correct = np.array([[True, False], [True, True]])
    curve = early_exit_curve(margins, correct, layers=[5, 10], n_layers=20, thresholds=[0.05, 0.5, 1.0])
    assert curve["agreement"] == [0.5, 1.0, 1.0]
    assert curve["mean_exit_layer"] == [5.0, 7.5, 20.0]
    assert curve["saved"] == pytest.approx([0.75, 0.625, 0.0])
    assert curve["saved_at_95"] == curve["saved_at_99"] == pytest.approx(0.625)


def test_cli_report_on_a_tiny_model(tiny_store, tmp_path):
    [jtc] = fit_shortcuts(tiny_store, method="jtc", ranks=None, progress=False)
    fits = fit_shortcuts(tiny_store, method="njtc", ranks=[2, 8], progress=False)
    files = []
    for sc in [jtc, *fits]:
        files.append(str(tmp_path / f"{sc.name}.safetensors"))
        sc.save(files[-1])
    out = tmp_path / "report"
    result = run_module("njtc_solve.evaluate", "--store", str(tiny_store), "--shortcuts", *files, "--out", str(out),
                        "--max-rows", "300", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "| layer | identity | jtc | njtc-r2 | njtc-r8 |" in result.stdout
    for name in ("results.json", "results.csv", "report.md", "precision_at_1.png", "surprisal.png",
                 "early_exit.png", "rank_sweep.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert len(data["records"]) == 4 * 3 and data["meta"]["validation_rows"] == 300
    assert {r["method"] for r in data["records"]} == {"identity", "jtc", "njtc-r2", "njtc-r8"}
    jtc_rec = [r for r in data["records"] if r["method"] == "jtc"]
    assert all(r["params"] == 32 * 32 and r["reduction"] == 0.0 for r in jtc_rec)
    assert set(data["early_exit"]) == {"identity", "jtc", "njtc-r2", "njtc-r8"}
    import pandas as pd

    df = pd.read_csv(out / "results.csv")
    assert len(df) == 12 and "precision@1" in df.columns


def test_jtc_beats_low_rank_on_its_training_distribution(tiny_store):
    [jtc] = fit_shortcuts(tiny_store, method="jtc", ranks=None, layers=[2], progress=False)
    [r1] = fit_shortcuts(tiny_store, method="njtc", ranks=[1], layers=[2], progress=False)
    result = evaluate_shortcuts(tiny_store, [jtc, r1], progress=False)
    assert result.value("jtc", 2, "r2") > result.value("njtc-r1", 2, "r2")


def test_cli_bad_inputs(tiny_store, hand_store, tmp_path):
    other = Shortcuts("jtc", {0: ShortcutMap(weight=torch.eye(32))}, 3, model_sha256="another-model")
    other.save(tmp_path / "other.safetensors")
    _one_line_exit_2(run_module("njtc_solve.evaluate", "--store", str(tiny_store), "--shortcuts",
                                str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "r")), "another model")
    _one_line_exit_2(run_command("evaluate", "--store", str(tiny_store), "--shortcuts",
                                str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "r")), "not found")
    no_val = tmp_path / "no_val.h5"
    shutil.copy(tiny_store, no_val)
    with h5py.File(no_val, "r+") as f:
        f["split"][...] = 0
    _one_line_exit_2(run_command("evaluate", "--store", str(no_val), "--shortcuts",
                                "--out", str(tmp_path / "r")), "no validation rows")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_low_rank_logits_equal_the_direct_path(tiny_models, tmp_path, kind):
    """Narrow maps go through the head in rank-r form; it must equal head.logits(ŷ)."""
    from test_extract import _extract

    store = _extract(tiny_models[kind], tmp_path / "s.h5")
    with ActivationStore(store) as s:
        head = s.head()
        x = torch.from_numpy(s.file["hidden/1"][:200])
    for kw in (dict(method="njtc"), dict(method="nnjtc", normalize="batch"), dict(method="nnjtc"),
               dict(method="njtc", fit_intercept=False)):
        [sc] = fit_shortcuts(store, ranks=[4], layers=[1], progress=False, **kw)
        y_hat, logits = sc.maps[1].predict_with_logits(x, head)
        direct = head.logits(sc.transform_hidden(x, 1))
        assert torch.allclose(y_hat, sc.transform_hidden(x, 1))
        assert (logits - direct).abs().max() <= 1e-4 * direct.abs().max(), kw


def test_precision_is_against_the_models_own_prediction(tiny_store, tmp_path):
    """P@k follows the stored final_top1/final_topk (the model's forward pass), KL the head of h_L."""
    [jtc] = fit_shortcuts(tiny_store, method="jtc", ranks=None, layers=[2], progress=False)
    changed = tmp_path / "changed.h5"
    shutil.copy(tiny_store, changed)
    with h5py.File(changed, "r+") as f:
        vocab = int(f.attrs["vocab_size"])
        f["final_topk"][...] = (f["final_topk"][...] + 1) % vocab  # every choice of the model moved
        f["final_top1"][...] = f["final_topk"][:, 0]
    base = evaluate_shortcuts(tiny_store, [jtc], progress=False)
    moved = evaluate_shortcuts(changed, [jtc], progress=False)
    with ActivationStore(changed) as store:  # P@1 recomputed independently from the stored rows
        rows = np.flatnonzero(store.selection("validation", 1))
        x = torch.from_numpy(store.file["hidden/2"][...][rows])
        pred = store.head().logits(jtc.transform_hidden(x, 2)).argmax(-1).numpy()
        expected = float((pred == store.read("final_top1")[rows]).mean())
        expected5 = float((store.file["final_topk"][...][rows][:, :5] == pred[:, None]).any(1).mean())
    assert moved.value("jtc", 2, "precision@1") == pytest.approx(expected)
    assert moved.value("jtc", 2, "precision@5") == pytest.approx(expected5)
    assert moved.value("jtc", 2, "precision@1") < base.value("jtc", 2, "precision@1")
    assert moved.value("jtc", 2, "kl") == pytest.approx(base.value("jtc", 2, "kl"), rel=1e-6)


def test_evaluating_on_rows_a_shortcut_was_fitted_on_is_refused(tiny_models, tmp_path):
    from test_extract import _extract

    a = _extract(tiny_models["llama"], tmp_path / "a.h5", seed=0)
    other_split = _extract(tiny_models["llama"], tmp_path / "b.h5", seed=1)
    same_split = _extract(tiny_models["llama"], tmp_path / "c.h5", seed=0, max_tokens=1024)
    [sc] = fit_shortcuts(a, method="njtc", ranks=[2], layers=[1], progress=False)
    with ActivationStore(a) as fitted, ActivationStore(other_split) as evaluated:
        docs = set(evaluated.read("document")[evaluated.selection("validation", 1)].tolist())
        seen = docs - set(fitted.file["validation_documents"][...].tolist())
    assert seen, "seed 1 should move some documents across the split"
    with pytest.raises(NJTCError, match=f"was fitted on {len(seen)} of the {len(docs)} documents"):
        evaluate_shortcuts(other_split, [sc], progress=False)
    assert evaluate_shortcuts(same_split, [sc], progress=False).meta["validation_rows"] > 0
    assert evaluate_shortcuts(other_split, [sc], progress=False, allow_overlap=True).records
    path = tmp_path / "sc.safetensors"
    sc.save(path)
    result = run_module("njtc_solve.evaluate", "--store", str(other_split), "--shortcuts", str(path),
                        "--out", str(tmp_path / "r"), "--no-progress")
    _one_line_exit_2(result, "was fitted on")


def test_a_shortcut_without_provenance_or_from_a_sequence_split_store_is_refused(tiny_store, tmp_path):
    [sc] = fit_shortcuts(tiny_store, method="njtc", ranks=[2], layers=[1], progress=False)
    bare = Shortcuts(sc.method, sc.maps, sc.target_layer, model_sha256=sc.model_sha256, rank=sc.rank)
    with pytest.raises(NJTCError, match="records no provenance"):
        evaluate_shortcuts(tiny_store, [bare], progress=False)
    old = tmp_path / "old.h5"  # a store split by sequence, as the first release wrote them
    shutil.copy(tiny_store, old)
    with h5py.File(old, "r+") as f:
        del f["validation_documents"], f["document"]
        f.attrs["seed"] = 7
    with pytest.raises(NJTCError, match="split by sequence"):
        evaluate_shortcuts(old, [sc], progress=False)
    assert evaluate_shortcuts(old, [sc], progress=False, allow_overlap=True).records


def test_kl_is_accurate_in_float32_at_a_large_vocabulary():
    """Over 49k logits of size ~30 the float32 KL stays within 1e-5 of float64's, and KL(p‖p) is 0
    (the shorter Σp·log p − Σp·z + logsumexp(z) form was 2.5e-3 off)."""
    from njtc_solve.core.metrics import kl_divergence

    gen = torch.Generator().manual_seed(0)
    final = 30 * torch.randn(16, 49152, generator=gen).tanh() + 5 * torch.randn(16, 49152, generator=gen)
    other = final + 0.3 * torch.randn(16, 49152, generator=gen)
    exact = kl_divergence(final.double(), other.double())
    assert (kl_divergence(final, other).double() - exact).abs().max() < 1e-5
    assert kl_divergence(final, final).abs().max() < 1e-6


def test_maps_to_an_intermediate_layer_checked_before_the_model_loads(tiny_store, tmp_path, capsys):
    """`--layers` with maps to an intermediate layer is refused from the files alone (the model path
    does not exist, so a later check would name it instead), and a foreign pairwise.json in --out is
    never replaced."""
    from njtc_solve.cli import run_cli
    from njtc_solve.cli.evaluate import main

    [jtc] = fit_shortcuts(tiny_store, method="jtc", progress=False, target_layer=2)
    maps = tmp_path / "t2.safetensors"
    jtc.save(maps)
    capsys.readouterr()
    argv = ["--model", str(tmp_path / "no-model"), "--shortcuts", str(maps), "--layers", "1", "--no-progress",
            "--out", str(tmp_path / "report")]
    assert run_cli(main, argv) == 2
    assert capsys.readouterr().err.strip() == ("error: --layers applies to maps to the last layer; maps to other "
                                               "layers are evaluated whole")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pairwise.json").write_text('{"mine": 1}')
    assert run_cli(main, ["--store", str(tiny_store), "--shortcuts", str(maps), "--out", str(mine),
                          "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds pairwise.json, which this project did not write" in err and "\n" not in err
    assert (mine / "pairwise.json").read_text() == '{"mine": 1}'
    # its own pairwise report is replaced by a rerun
    own = tmp_path / "own"
    assert run_cli(main, ["--store", str(tiny_store), "--shortcuts", str(maps), "--out", str(own), "--no-progress"]) == 0
    assert run_cli(main, ["--store", str(tiny_store), "--shortcuts", str(maps), "--out", str(own), "--no-progress"]) == 0


def test_an_undefined_figure_reads_as_a_dash_not_nan():
    """R² of rows that do not vary is undefined (NaN in the records); the report's tables say ``—``."""
    from njtc_solve.evaluation.report import markdown_table

    table = markdown_table([{"method": "jtc", "layer": 1, "r2": float("nan"), "kl": 0.5}])
    assert "nan" not in table.lower() and "| — |" in table and "0.500" in table
