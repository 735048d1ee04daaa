"""KL refinement from the closed form: never worse than its start, one KL, ordinary files."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from njtc_solve.core.errors import NJTCError
from njtc_solve.evaluation.evaluate import evaluate_shortcuts
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.core.metrics import Reference, kl_divergence
from njtc_solve.solve.refine_shortcuts import refine_shortcuts
from njtc_solve.maps.shortcuts import Shortcuts
from njtc_solve.data.store import ActivationStore
from njtc_solve.solve.training import StoreRows, train_maps

from conftest import run_module

STARTS = {  # name: fit_shortcuts arguments
    "jtc": dict(method="jtc", ranks=None),
    "njtc": dict(method="njtc", ranks=[4]),
    "nnjtc": dict(method="nnjtc", ranks=[4], normalize="layer"),
    "nnjtc-batch": dict(method="nnjtc", ranks=[4], normalize="batch"),
    "residual": dict(method="njtc", ranks=[4], residual=True),
}


def _held_out_kl(store, sc, layer, start=0):
    """KL of ``sc``'s map on the validation rows from ``start``, computed apart from the trainer."""
    head, total, n = store.head(), 0.0, 0
    for x, y in StoreRows(store, [layer], "validation", start=start):
        with torch.no_grad():
            total += float(kl_divergence(head.logits(y), head.logits(sc.maps[layer].predict(x[layer]))).sum())
        n += len(y)
    return total / n


def test_kl_is_torch_kl_div_and_the_hand_sum():
    torch.manual_seed(0)
    final, logits = torch.randn(5, 7) * 3, torch.randn(5, 7) * 3
    ours = kl_divergence(final, logits)
    torch_kl = F.kl_div(logits.log_softmax(-1), final.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(ours, torch_kl, atol=1e-5)
    for row in range(5):  # Σ p (log p − log q), from exponentials alone
        zp = sum(math.exp(v) for v in final[row].tolist())
        zq = sum(math.exp(v) for v in logits[row].tolist())
        hand = sum(math.exp(a) / zp * ((a - math.log(zp)) - (b - math.log(zq)))
                   for a, b in zip(final[row].tolist(), logits[row].tolist()))
        assert float(ours[row]) == pytest.approx(hand, rel=1e-5, abs=1e-6)
    assert torch.allclose(kl_divergence(Reference.from_logits(final), logits), ours)
    # differentiable: the gradient in the logits is softmax(logits) − p_final
    logits.requires_grad_(True)
    kl_divergence(final, logits).sum().backward()
    assert torch.allclose(logits.grad, logits.softmax(-1) - final.softmax(-1), atol=1e-5)


@pytest.mark.parametrize("name", list(STARTS))
def test_refinement_never_ends_above_its_start(tiny_store, name):
    with ActivationStore(tiny_store) as store:
        [start] = fit_shortcuts(store, layers=[1], progress=False, **STARTS[name])
        before = _held_out_kl(store, start, 1)
        # a sane step size improves; a reckless one must fall back to the start
        good, good_run = refine_shortcuts(store, start, steps=40, lr=1e-3, check_every=5, check_rows=10**6,
                                          patience=0, progress=False)
        wild, wild_run = refine_shortcuts(store, start, steps=10, lr=10.0, check_every=5, check_rows=10**6,
                                          patience=0, progress=False)
        good_kl, wild_kl = _held_out_kl(store, good, 1), _held_out_kl(store, wild, 1)
    assert good_run.start[1]["loss"] == pytest.approx(before, rel=1e-5)
    assert good_kl == pytest.approx(good_run.best[1]["loss"], rel=1e-5)
    assert good_kl < before * 0.999, "refinement should improve on the least-squares start"
    assert max(rec["layers"][1]["loss"] for rec in wild_run.history) > before, "lr=10 should overshoot"
    assert wild_kl <= before * (1 + 1e-6)
    assert good.maps[1].rank == start.maps[1].rank and good.maps[1].residual == start.maps[1].residual
    assert good.maps[1].normalize == start.maps[1].normalize


def test_a_refined_file_loads_and_evaluates_like_any_other(tiny_store, tmp_path):
    with ActivationStore(tiny_store) as store:
        [njtc] = fit_shortcuts(store, method="njtc", ranks=[4], layers=[1, 2], progress=False)
    njtc.save(tmp_path / "njtc.safetensors")
    out = tmp_path / "njtc-kl.safetensors"
    proc = run_module("njtc_solve.refine", "--shortcuts", str(tmp_path / "njtc.safetensors"), "--store",
                      str(tiny_store), "--steps", "20", "--lr", "3e-3", "--check-every", "5", "--check-rows",
                      "1000000", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    refined = Shortcuts.load(out)
    assert refined.name == "njtc-r4-kl" and refined.rank == 4 and sorted(refined.maps) == [1, 2]
    assert refined.maps[1].U.shape == (32, 4), "a narrow map stays narrow"
    assert refined.head_description == njtc.head_description and njtc.head_description
    assert refined.head_sha256 == njtc.head_sha256 and njtc.head_sha256
    assert refined.provenance == njtc.provenance
    info = refined.stats["refined"]
    assert info["from"] == "njtc-r4" and info["from_file"].endswith("njtc.safetensors")
    assert info["objective"] == "kl" and info["steps"] == 20 and info["check_rows"][0] == 0
    result = evaluate_shortcuts(tiny_store, [tmp_path / "njtc.safetensors", out], progress=False)
    for layer in (1, 2):  # all validation rows were the check rows: evaluation's KL is the trainer's best
        assert result.value("njtc-r4-kl", layer, "kl") == pytest.approx(info["layers"][str(layer)]["best"]["loss"],
                                                                       rel=1e-4)
        assert result.value("njtc-r4-kl", layer, "kl") < result.value("njtc-r4", layer, "kl")


def test_the_trainer_takes_any_iterable_of_row_chunks(tiny_store):
    """A live model will be a row source too: a plain list of ``(x, y)`` chunks trains the same maps."""
    with ActivationStore(tiny_store) as store:
        [njtc] = fit_shortcuts(store, method="njtc", ranks=[4], layers=[1], progress=False)
        train = list(StoreRows(store, [1], "train"))
        check = list(StoreRows(store, [1], "validation"))
        head = store.head()
    U = njtc.maps[1].U.clone()
    result = train_maps(njtc.maps, head, train, check=check, steps=15, lr=1e-3, check_every=5, progress=False)
    assert result.best[1]["loss"] < result.start[1]["loss"]
    assert [r["step"] for r in result.history] == [0, 5, 10, 15]
    assert torch.equal(njtc.maps[1].U, U), "the input maps are left unchanged"
    assert not torch.equal(result.maps()[1].U, U) and result.maps()[1].rank == 4


def test_mse_objective_keeps_the_closed_form_at_its_optimum(tiny_store):
    """From the exact least-squares start, MSE training finds nothing better on its own training rows."""
    with ActivationStore(tiny_store) as store:
        [njtc] = fit_shortcuts(store, method="njtc", ranks=[4], layers=[2], progress=False)
        rows = StoreRows(store, [2], "train", in_memory=True)
        result = train_maps(njtc.maps, store.head(), rows, check=rows, objective="mse", steps=20, lr=1e-3, check_every=5,
                            patience=0, progress=False)
    optimum = njtc.stats["layers"][2]["train_mse"]
    assert result.start[2]["loss"] == pytest.approx(optimum, rel=1e-4)
    assert min(r["layers"][2]["loss"] for r in result.history) >= optimum * (1 - 1e-4)


def test_bad_input_is_one_line(tiny_store, tmp_path):
    with ActivationStore(tiny_store) as store:
        identity = Shortcuts.identity([1], store.n_layers, store.model_sha256)
        identity.provenance = store.provenance
        with pytest.raises(NJTCError, match="identity map has no parameters"):
            refine_shortcuts(store, identity, steps=1, progress=False)
        [jtc] = fit_shortcuts(store, method="jtc", ranks=None, layers=[1], progress=False)
        with pytest.raises(NJTCError, match="no map for layer 2"):
            refine_shortcuts(store, jtc, layers=[2], steps=1, progress=False)
        with pytest.raises(NJTCError, match="`objective` must be one of kl, mse"):
            refine_shortcuts(store, jtc, objective="ce", steps=1, progress=False)
        jtc.model_sha256 = "another"
        with pytest.raises(NJTCError, match="another model"):
            refine_shortcuts(store, jtc, steps=1, progress=False)
    jtc.save(tmp_path / "jtc.safetensors")
    proc = run_module("njtc_solve.refine", "--shortcuts", str(tmp_path / "jtc.safetensors"), "--store",
                      str(tiny_store), "--objective", "ce", "--out", str(tmp_path / "x.safetensors"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "objective" in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_refine_from_a_live_model_reads_the_rows_of_its_store(tiny_store, tiny_models, tmp_path):
    """--model instead of --store: the model's forward pass over the fit's plan gives the store's rows."""
    with ActivationStore(tiny_store) as store:
        [jtc] = fit_shortcuts(store, method="jtc", ranks=None, layers=[1], progress=False)
        _, from_store = refine_shortcuts(store, jtc, steps=1, check_every=1, check_rows=10**6, progress=False)
    jtc.save(tmp_path / "jtc.safetensors")
    out = tmp_path / "jtc-kl.safetensors"
    # enough steps to improve on the start: a run where no layer improves writes nothing (issue 19)
    proc = run_module("njtc_solve.refine", "--shortcuts", str(tmp_path / "jtc.safetensors"), "--model",
                      str(tiny_models["llama"]), "--steps", "40", "--check-every", "20", "--check-rows", "1000000",
                      "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    live = Shortcuts.load(out).stats["refined"]["layers"]["1"]["start"]["loss"]
    assert live == pytest.approx(from_store.start[1]["loss"], rel=1e-4)
    both = run_module("njtc_solve.refine", "--shortcuts", str(tmp_path / "jtc.safetensors"), "--model",
                      str(tiny_models["llama"]), "--store", str(tiny_store), "--out", str(out))
    assert both.returncode == 2 and "exclude each other" in both.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_refinement_on_the_gpu_follows_the_cpu(tiny_store):
    with ActivationStore(tiny_store) as store:
        [njtc] = fit_shortcuts(store, method="njtc", ranks=[4], layers=[1], progress=False)
        runs = {device: refine_shortcuts(store, njtc, steps=10, check_every=5, check_rows=10**6, patience=0,
                                         device=device, progress=False)[1] for device in ("cpu", "cuda")}
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert gpu.modules[1].U.device.type == "cuda"
    for a, b in zip(cpu.history, gpu.history):
        assert b["layers"][1]["loss"] == pytest.approx(a["layers"][1]["loss"], rel=1e-3)
