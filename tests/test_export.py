"""tuned-lens interoperability, checked against the real package (tuned-lens 0.2.0, --no-deps)."""

from __future__ import annotations

import json

import pytest
import torch

from njtc_solve.data.capture import capture_residual_stream
from njtc_solve.core.errors import NJTCError
from njtc_solve.maps.tuned_lens import export_tuned_lens, read_tuned_lens
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.core.head import Head
from njtc_solve.evaluation.lens import ShortcutLens
from njtc_solve.core.models import load_model, model_sha256
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts

from conftest import run_module

TunedLens = pytest.importorskip("tuned_lens.nn.lenses").TunedLens


def _random_maps(sha: str, d: int = 32, seed: int = 0) -> list[Shortcuts]:
    """Every affine kind of map: full, narrow behind a batch norm, residual narrow; layer 2 has none."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: s * torch.randn(*shape, generator=g)
    full = {l: ShortcutMap(weight=torch.eye(d) + r(d, d, s=0.3), bias=r(d, s=0.1)) for l in (0, 1)}
    batch = {l: ShortcutMap(U=r(d, 4, s=0.5), V=r(4, d, s=0.5), bias=r(d), norm_mean=r(d),
                            norm_scale=0.5 + torch.rand(d, generator=g), normalize="batch") for l in (0, 1)}
    batch[2] = ShortcutMap(norm_mean=r(d), norm_scale=0.5 + torch.rand(d, generator=g), normalize="batch")
    residual = {l: ShortcutMap(U=r(d, 4, s=0.2), V=r(4, d, s=0.2), bias=r(d, s=0.1), residual=True) for l in (0, 1, 2)}
    return [Shortcuts("jtc", full, 3, model_sha256=sha), Shortcuts("nnjtc", batch, 3, model_sha256=sha, rank=4, normalize="batch"),
            Shortcuts("njtc", residual, 3, model_sha256=sha, rank=4, residual=True)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_exported_folder_loaded_by_tuned_lens_gives_our_logits(tiny_models, tmp_path, kind):
    model, tokenizer, _ = load_model(str(tiny_models[kind]), progress=False)
    with capture_residual_stream(model) as hidden, torch.no_grad():
        model(input_ids=torch.tensor([tokenizer("The lens reads every layer, token by token.")["input_ids"]]))
    for i, sc in enumerate(_random_maps(model_sha256(model))):
        folder = export_tuned_lens(sc, tmp_path / f"lens{i}", model=model)
        tuned = TunedLens.from_model_and_pretrained(model, str(folder))
        ours = ShortcutLens.from_model(model, sc)
        assert len(tuned) == 3
        for layer in range(3):
            h = hidden[layer][0]
            with torch.no_grad():
                expected = ours(h, layer) if layer in sc.maps else ours.head().logits(h)  # identity translator
                got = tuned(h, layer)
            if layer in sc.maps:  # the map moves the logits far beyond the tolerance (a zero translator fails)
                assert (expected - ours.head().logits(h)).abs().max() > 1e-2
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        config = json.loads((folder / "config.json").read_text())
        assert config["unembed_hash"] == tuned.unembed.unembedding_hash()  # no warning from tuned-lens


def test_a_lens_saved_by_tuned_lens_is_read_back_exactly(tiny_models, tmp_path):
    model, tokenizer, _ = load_model(str(tiny_models["gpt2"]), progress=False)
    tuned = TunedLens.from_model(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for translator in tuned:
            translator.weight.copy_(0.2 * torch.randn(translator.weight.shape, generator=g))
            translator.bias.copy_(0.1 * torch.randn(translator.bias.shape, generator=g))
    tuned.save(tmp_path / "trained")
    sc = read_tuned_lens(tmp_path / "trained", head=Head.from_model(model), model_sha256=model_sha256(model))
    assert sc.name == "tuned-lens" and sorted(sc.maps) == [0, 1, 2]
    ours = ShortcutLens.from_model(model, sc)
    h = torch.randn(5, 32)
    for layer in range(3):
        with torch.no_grad():
            torch.testing.assert_close(ours(h, layer), tuned(h, layer), atol=1e-5, rtol=0)
    llama, _, _ = load_model(str(tiny_models["llama"]), progress=False)
    with pytest.raises(NJTCError, match="trained with another unembedding"):
        read_tuned_lens(tmp_path / "trained", head=Head.from_model(llama), model_sha256=model_sha256(llama))


def test_maps_behind_a_per_token_norm_are_refused_naming_what_can_be_exported(tmp_path):
    sc = Shortcuts("nnjtc", {0: ShortcutMap(U=torch.ones(8, 2), V=torch.ones(2, 8), normalize="layer")}, 2, model_sha256="x",
                   rank=2, normalize="layer")
    with pytest.raises(NJTCError, match=r"per-token layer norm is not affine.*export full \(jtc\), narrow"):
        export_tuned_lens(sc, tmp_path / "lens")
    assert not (tmp_path / "lens").exists()


def test_export_cli_and_evaluation_of_the_folder_beside_the_maps(tiny_store, tiny_models, tmp_path):
    [jtc] = fit_shortcuts(tiny_store, method="jtc", ranks=None, progress=False)
    jtc.save(tmp_path / "jtc.safetensors")
    done = run_module("njtc_solve.export", "--format", "tuned-lens", "--shortcuts", str(tmp_path / "jtc.safetensors"),
                      "--out", str(tmp_path / "jtc-lens"), "--model", str(tiny_models["llama"]))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "jtc-lens").iterdir()) == ["config.json", "njtc.json", "params.pt"]
    again = run_module("njtc_solve.export", "--format", "tuned-lens", "--shortcuts", str(tmp_path / "jtc.safetensors"),
                       "--out", str(tmp_path / "jtc-lens"))
    assert again.returncode == 2 and again.stderr.strip().endswith("already holds a lens; pass --overwrite to replace it")
    done = run_module("njtc_solve.evaluate", "--store", str(tiny_store), "--shortcuts", str(tmp_path / "jtc.safetensors"),
                      "--tuned-lens", str(tmp_path / "jtc-lens"), "--out", str(tmp_path / "report"), "--no-progress")
    assert done.returncode == 0, done.stderr
    import pandas as pd

    table = pd.read_csv(tmp_path / "report" / "results.csv")
    assert set(table.method) == {"identity", "jtc", "tuned-lens"}
    for layer in range(3):  # the same maps, read back from the folder: the same figures
        row = {m: table[(table.method == m) & (table.layer == layer)].iloc[0] for m in ("jtc", "tuned-lens")}
        assert row["tuned-lens"]["precision@1"] == row["jtc"]["precision@1"]
        assert row["tuned-lens"]["kl"] == pytest.approx(row["jtc"]["kl"], abs=1e-5)


def test_export_cli_refuses_a_model_the_maps_were_not_fitted_on(tiny_models, tmp_path):
    model, _, _ = load_model(str(tiny_models["llama"]), progress=False)
    _random_maps(model_sha256(model))[0].save(tmp_path / "jtc.safetensors")
    done = run_module("njtc_solve.export", "--format", "tuned-lens", "--shortcuts", str(tmp_path / "jtc.safetensors"),
                      "--out", str(tmp_path / "lens"), "--model", str(tiny_models["gpt2"]), "--no-progress")
    assert done.returncode == 2
    assert done.stderr.startswith("error: shortcuts jtc were fitted on another model (model_sha256 ")
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "lens").exists()
