"""The Jacobian-lens format of TransformerLens (``JacobianLens``): export, read back, refusals.

Checked twice: against the format as TransformerLens's source
(``transformer_lens/tools/analysis/jacobian_lens.py``) defines it, without the package, and,
where ``transformer-lens`` is importable, against its own loader and readout on a
TransformerBridge of the tiny model. TransformerLens 4.x breaks tuned-lens 0.2.0 in the same
environment (tuned-lens reads ``transformer_lens.HookedTransformer``, which 4.0 removed), so
it is installed beside the environment, not into it::

    pip install --no-deps --target /tmp/tl-site transformer-lens
    pip install einops jaxtyping beartype fancy-einsum 'typeguard>=4.2,<5'   # what its import needs
    PYTHONPATH=/tmp/tl-site pytest tests/test_jacobian_lens.py
"""

from __future__ import annotations

import subprocess

import importlib.util
import json

import pytest
import torch

from conftest import run_module
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head
from njtc_solve.core.models import load_model, model_sha256
from njtc_solve.data.capture import capture_residual_stream
from njtc_solve.evaluation.lens import ShortcutLens
from njtc_solve.maps.jacobian_lens import export_jacobian_lens, read_jacobian_lens
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts
from njtc_solve.solve.fit import fit_shortcuts


D, L = 32, 3  # the tiny models' width and layers
PROMPT = "The lens reads every layer, token by token."


def in_process(capsys, module: str, *argv: str) -> subprocess.CompletedProcess:
    """``python -m module argv`` run in this process (``run_cli``, as the process would: exit code,
    one error line), its output captured: a subprocess would spend seconds importing torch."""
    from importlib import import_module

    from njtc_solve.cli import run_cli

    code = run_cli(import_module(module.replace("njtc_solve.", "njtc_solve.cli.")).main, list(argv))
    out = capsys.readouterr()
    return subprocess.CompletedProcess([module, *argv], code, out.out, out.err)


def _maps(sha: str = "x", seed: int = 0) -> dict[str, Shortcuts]:
    """What the format holds: full, narrow and residual maps without a bias, from layers 0..2 to 3."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: s * torch.randn(*shape, generator=g)
    full = {l: ShortcutMap(weight=torch.eye(D) + r(D, D, s=0.3)) for l in range(L)}
    narrow = {l: ShortcutMap(U=r(D, 4, s=0.5), V=r(4, D, s=0.5)) for l in range(L)}
    residual = {l: ShortcutMap(weight=r(D, D, s=0.1), bias=torch.zeros(D), residual=True) for l in (1, 2)}
    return {"jtc": Shortcuts("jtc", full, L, model_sha256=sha, fit_intercept=False),
            "njtc": Shortcuts("njtc", narrow, L, model_sha256=sha, rank=4, fit_intercept=False),
            "residual": Shortcuts("jtc", residual, L, model_sha256=sha, residual=True, fit_intercept=False)}


def _hidden(model, tokenizer) -> list[torch.Tensor]:
    with capture_residual_stream(model) as hidden, torch.no_grad():
        model(input_ids=torch.tensor([tokenizer(PROMPT)["input_ids"]]))
    return [h[0] for h in hidden]


def test_round_trip_is_bit_exact_and_layer_0_is_left_out(tmp_path):
    jtc = _maps()["jtc"]
    folder = export_jacobian_lens(jtc, tmp_path / "jlens")
    assert sorted(p.name for p in folder.iterdir()) == ["lens.pt", "njtc.json"]
    back = read_jacobian_lens(folder, n_layers=L, model_sha256="x")
    assert back.name == "jacobian-lens" and back.target_layer == L and sorted(back.maps) == [1, 2]
    for layer in (1, 2):
        assert back.maps[layer].weight.dtype == torch.float32
        assert torch.equal(back.maps[layer].weight, jtc.maps[layer].weight)
        assert back.maps[layer].bias is None
        h = torch.randn(5, D)
        assert torch.equal(back.transform_hidden(h, layer), jtc.transform_hidden(h, layer))
    assert back.model_sha256 == "x"
    # the path alone (the file) reads the same
    assert torch.equal(read_jacobian_lens(folder / "lens.pt").maps[2].weight, jtc.maps[2].weight)


def test_narrow_and_residual_maps_are_exported_as_their_full_map(tmp_path):
    for name, sc in _maps().items():
        back = read_jacobian_lens(export_jacobian_lens(sc, tmp_path / name), n_layers=L)
        h = torch.randn(7, D)
        for layer in (1, 2):
            torch.testing.assert_close(back.transform_hidden(h, layer), sc.transform_hidden(h, layer),
                                       atol=1e-5, rtol=1e-5)


def test_the_file_is_the_format_as_transformer_lens_source_defines_it(tmp_path):
    """``torch.save({"J": {l: [d, d]}, "n_prompts", "source_layers", "d_model", "metadata"})``, read
    ``weights_only``; ``J[l]`` for block output ``l`` (our layer ``l + 1``), applied as ``h @ J.T``."""
    jtc = _maps()["jtc"]
    export_jacobian_lens(jtc, tmp_path / "jlens", dtype=torch.float16)
    payload = torch.load(tmp_path / "jlens" / "lens.pt", map_location="cpu", weights_only=True)
    assert set(payload) == {"J", "n_prompts", "source_layers", "d_model", "metadata"}
    assert payload["d_model"] == D and payload["source_layers"] == [0, 1] and type(payload["n_prompts"]) is int
    assert sorted(payload["J"]) == [0, 1] and all(type(k) is int for k in payload["J"])
    metadata = payload["metadata"]
    assert metadata["target_layer"] == L - 1  # the last block
    assert "model_name" not in metadata  # TransformerLens would compare it with its own name for the model
    h = torch.randn(4, D)
    for j, matrix in payload["J"].items():
        assert matrix.dtype == torch.float16 and matrix.shape == (D, D)
        torch.testing.assert_close(h.float() @ matrix.float().T, jtc.transform_hidden(h, j + 1), atol=2e-2, rtol=1e-2)
    json.dumps(metadata)  # plain values only: what JacobianLens.save's _validate_metadata accepts


def test_a_published_style_lens_is_read(tmp_path):
    """The reference package's file: the four keys, float16, no metadata, a full fit (blocks 0..L-2)."""
    g = torch.Generator().manual_seed(1)
    J = {j: torch.randn(D, D, generator=g).to(torch.float16) for j in range(L - 1)}
    (tmp_path / "pub").mkdir()
    torch.save({"J": J, "n_prompts": 1000, "source_layers": [0, 1], "d_model": D},
               tmp_path / "pub" / "tiny_jacobian_lens.pt")
    sc = read_jacobian_lens(tmp_path / "pub", n_layers=L)
    assert sc.target_layer == L and sorted(sc.maps) == [1, 2]
    assert torch.equal(sc.maps[1].weight, J[0].float().T)
    assert read_jacobian_lens(tmp_path / "pub").target_layer == L  # inferred: one past the last block


def test_what_the_format_cannot_hold_is_refused_with_nothing_written(tmp_path):
    full = lambda **kw: ShortcutMap(weight=torch.eye(8), **kw)
    cases = {
        "has a bias": Shortcuts("jtc", {1: full(bias=torch.ones(8))}, 2),
        "layer norm": Shortcuts("nnjtc", {1: ShortcutMap(U=torch.ones(8, 2), V=torch.ones(2, 8), normalize="layer")},
                                2, rank=2, normalize="layer"),
        "batch norm": Shortcuts("jtc", {1: full(norm_mean=torch.zeros(8), norm_scale=torch.ones(8),
                                                normalize="batch")}, 2, normalize="batch"),
        "layer 0 only": Shortcuts("jtc", {0: full()}, 2),
        "logit lens": Shortcuts.identity([0, 1], 2),
        "not the last layer": Shortcuts("jtc", {1: full()}, 2, stats={"n_layers": 3}),
    }
    for i, (why, sc) in enumerate(cases.items()):
        with pytest.raises(NJTCError) as err:
            export_jacobian_lens(sc, tmp_path / f"out{i}")
        assert "\n" not in str(err.value), why
        assert not (tmp_path / f"out{i}").exists(), why
    with pytest.raises(NJTCError, match="fit without an intercept"):
        export_jacobian_lens(cases["has a bias"], tmp_path / "x")


def test_an_export_refuses_a_folder_it_did_not_write_and_its_own_without_overwrite(tmp_path):
    jtc = _maps()["jtc"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "lens.pt").write_bytes(b"someone else's")
    with pytest.raises(NJTCError, match="which this project did not write"):
        export_jacobian_lens(jtc, tmp_path / "foreign")
    assert (tmp_path / "foreign" / "lens.pt").read_bytes() == b"someone else's"
    export_jacobian_lens(jtc, tmp_path / "ours")
    with pytest.raises(NJTCError, match="already holds a lens"):
        export_jacobian_lens(jtc, tmp_path / "ours")
    export_jacobian_lens(jtc, tmp_path / "ours", overwrite=True)


def _bad_lenses(tmp_path) -> dict[str, tuple]:
    """Folders no reader should accept, and what their one-line error says."""
    good = export_jacobian_lens(_maps()["jtc"], tmp_path / "good") / "lens.pt"
    out = {}

    def lens(name, payload=None, raw=None):
        folder = tmp_path / name
        folder.mkdir()
        if raw is not None:
            (folder / "lens.pt").write_bytes(raw)
        elif payload is not None:
            torch.save(payload, folder / "lens.pt")
        return folder

    J = {0: torch.eye(D), 1: torch.eye(D)}
    out["empty"] = (lens("empty"), "is not a Jacobian-lens folder")
    out["tuned"] = (lens("tuned", {"0.weight": torch.eye(D)}), "no 'J' dict")
    out["truncated"] = (lens("truncated", raw=good.read_bytes()[:300]), "cannot be read")
    out["text"] = (lens("text", raw=b"not a lens"), "cannot be read")
    out["nan"] = (lens("nan", {"J": {0: torch.full((D, D), float("nan"))}, "d_model": D}), "not finite")
    out["inf"] = (lens("inf", {"J": {0: torch.eye(D) / 0}, "d_model": D}), "not finite")
    out["shape"] = (lens("shape", {"J": {0: torch.ones(D, D + 1)}, "d_model": D}), "has shape")
    out["layers"] = (lens("layers", {"J": J, "d_model": D, "source_layers": [0, 5]}), "disagree")
    out["key"] = (lens("key", {"J": {"a": torch.eye(D)}, "d_model": D}), "not a layer number")
    out["width"] = (lens("width", {"J": {0: torch.eye(16)}, "d_model": 16}), "width 16")
    out["deep"] = (lens("deep", {"J": {0: torch.eye(D), 5: torch.eye(D)}, "d_model": D}), "outside the model")
    return out


def test_bad_lenses_are_refused_in_one_line(tmp_path):
    head = Head(norm="rmsnorm", eps=1e-6, norm_weight=torch.ones(D), unembed=torch.zeros(300, D))
    for name, (folder, message) in _bad_lenses(tmp_path).items():
        with pytest.raises(NJTCError) as err:
            read_jacobian_lens(folder, head=head, n_layers=L)
        assert message in str(err.value) and "\n" not in str(err.value), (name, str(err.value))


def test_evaluate_and_lens_refuse_bad_lenses_with_one_line_and_write_nothing(tiny_store, tiny_models, tmp_path, capsys):
    bad = _bad_lenses(tmp_path)
    for name in ("empty", "truncated", "nan", "shape", "tuned"):  # read before anything loads
        folder, message = bad[name]
        done = in_process(capsys, "njtc_solve.evaluate", "--store", str(tiny_store), "--shortcuts", "--jacobian-lens",
                          str(folder), "--out", str(tmp_path / f"report-{name}"), "--no-progress")
        assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert message in done.stderr and not (tmp_path / f"report-{name}").exists()
    for name in ("width", "deep"):  # against the rows' model
        folder, message = bad[name]
        done = in_process(capsys, "njtc_solve.evaluate", "--store", str(tiny_store), "--shortcuts", "--jacobian-lens",
                          str(folder), "--out", str(tmp_path / f"report-{name}"), "--no-progress")
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
        assert not (tmp_path / f"report-{name}").exists()
    folder, message = bad["nan"]
    done = in_process(capsys, "njtc_solve.lens", "--model", str(tiny_models["llama"]), "--jacobian-lens", str(folder),
                      "--prompt", PROMPT, "--out", str(tmp_path / "traj"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr
    assert not (tmp_path / "traj").exists()


def test_export_cli_then_evaluate_and_lens_read_the_folder_as_the_maps(tiny_store, tiny_models, tmp_path, capsys):
    [jtc] = fit_shortcuts(tiny_store, method="jtc", ranks=None, fit_intercept=False, progress=False)
    jtc.save(tmp_path / "jtc.safetensors")
    done = run_module("njtc_solve.export", "--format", "jacobian-lens", "--shortcuts", str(tmp_path / "jtc.safetensors"),
                      "--out", str(tmp_path / "jlens"), "--model", str(tiny_models["llama"]))  # a process of its own
    assert done.returncode == 0, done.stderr
    assert "layer 0, the embeddings, has no place" in done.stdout
    done = in_process(capsys, "njtc_solve.evaluate", "--store", str(tiny_store), "--shortcuts", str(tmp_path / "jtc.safetensors"),
                      "--jacobian-lens", str(tmp_path / "jlens"), "--out", str(tmp_path / "report"), "--no-progress")
    assert done.returncode == 0, done.stderr
    import pandas as pd

    table = pd.read_csv(tmp_path / "report" / "results.csv")
    assert set(table.method) == {"identity", "jtc", "jacobian-lens"}
    for layer in (1, 2):  # the same maps, read back from the folder: the same figures
        row = {m: table[(table.method == m) & (table.layer == layer)].iloc[0] for m in ("jtc", "jacobian-lens")}
        assert row["jacobian-lens"]["precision@1"] == row["jtc"]["precision@1"]
        assert row["jacobian-lens"]["kl"] == pytest.approx(row["jtc"]["kl"], abs=1e-6)
    done = in_process(capsys, "njtc_solve.lens", "--model", str(tiny_models["llama"]), "--jacobian-lens", str(tmp_path / "jlens"),
                      "--prompt", PROMPT)
    assert done.returncode == 0, done.stderr
    assert "jacobian-lens" in done.stdout
    # a bias cannot go: refused before the model loads (the model path would fail to load)
    [biased] = fit_shortcuts(tiny_store, method="jtc", ranks=None, progress=False)
    biased.save(tmp_path / "biased.safetensors")
    done = in_process(capsys, "njtc_solve.export", "--format", "jacobian-lens", "--shortcuts", str(tmp_path / "biased.safetensors"),
                      "--out", str(tmp_path / "no"), "--model", str(tmp_path / "missing-model"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--no-intercept" in done.stderr, done.stderr
    assert not (tmp_path / "no").exists()


def test_a_lens_of_another_model_is_refused(tiny_models, tmp_path):
    llama, _, _ = load_model(str(tiny_models["llama"]), progress=False)
    gpt2, _, _ = load_model(str(tiny_models["gpt2"]), progress=False)
    folder = export_jacobian_lens(_maps(model_sha256(llama))["jtc"], tmp_path / "jlens", model=llama)
    with pytest.raises(NJTCError, match="fitted on another model"):
        read_jacobian_lens(folder, head=Head.from_model(gpt2), n_layers=L, model_sha256=model_sha256(gpt2))
    with pytest.raises(NJTCError, match="fitted on another model"):
        export_jacobian_lens(_maps(model_sha256(llama))["jtc"], tmp_path / "other", model=gpt2)


HAS_TRANSFORMER_LENS = importlib.util.find_spec("transformer_lens") is not None


@pytest.mark.skipif(not HAS_TRANSFORMER_LENS, reason="transformer-lens not installed (test-only extra, --no-deps)")
def test_transformer_lens_loads_our_export_and_reads_our_logits(tiny_models, tmp_path):
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.tools.analysis.jacobian_lens import JacobianLens
    except ImportError as err:  # installed without the dependencies its import needs
        pytest.skip(f"transformer-lens does not import here: {err}")
    model, tokenizer, _ = load_model(str(tiny_models["llama"]), progress=False)
    sha = model_sha256(model)
    hidden = _hidden(model, tokenizer)
    bridge = TransformerBridge.boot_transformers(str(tiny_models["llama"]), device="cpu", dtype=torch.float32)
    tokens = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    for name, sc in _maps(sha).items():
        folder = export_jacobian_lens(sc, tmp_path / name, model=model)
        lens = JacobianLens.from_pretrained(str(folder), model=bridge)  # TransformerLens's loader and checks
        assert lens.source_layers == [0, 1] and lens.d_model == D
        readout = lens.readout(bridge, tokens, return_full_logits=True)  # its own forward, final norm, unembedding
        ours = ShortcutLens.from_model(model, sc)
        for j in (0, 1):
            with torch.no_grad():
                expected = ours(hidden[j + 1], j + 1)
            assert (expected - ours.head().logits(hidden[j + 1])).abs().max() > 1e-2  # the map moves the logits
            torch.testing.assert_close(readout.lens_logits[j], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(readout.model_logits, ours.head().logits(hidden[L]), atol=1e-4, rtol=1e-4)
    # a lens TransformerLens fits and saves reads back as the same readout, through our head
    from njtc_solve.data.corpus import load_corpus

    fitted = JacobianLens.fit(bridge, load_corpus()[1][:3], corpus="pydoc_data.topics", max_seq_len=24,
                              skip_first_positions=2, show_progress=False)
    fitted.save(str(tmp_path / "fitted.pt"))  # float16
    sc = read_jacobian_lens(tmp_path / "fitted.pt", head=Head.from_model(model), n_layers=L, model_sha256=sha)
    readout = JacobianLens.load(str(tmp_path / "fitted.pt")).readout(bridge, tokens, return_full_logits=True)
    ours = ShortcutLens.from_model(model, sc)
    for j in (0, 1):
        with torch.no_grad():
            torch.testing.assert_close(ours(hidden[j + 1], j + 1), readout.lens_logits[j], atol=1e-4, rtol=1e-4)
    # and a lens TransformerLens saves (float16, its default) reads back as its matrices
    g = torch.Generator().manual_seed(2)
    theirs = JacobianLens({0: torch.randn(D, D, generator=g), 1: torch.randn(D, D, generator=g)}, n_prompts=10,
                          d_model=D, metadata={"target_layer": L - 1})
    theirs.save(str(tmp_path / "theirs.pt"))
    sc = read_jacobian_lens(tmp_path / "theirs.pt", head=Head.from_model(model), n_layers=L, model_sha256=sha)
    reloaded = JacobianLens.load(str(tmp_path / "theirs.pt"))
    h = torch.randn(6, D)
    for j in (0, 1):
        assert torch.equal(sc.maps[j + 1].weight, reloaded.jacobians[j].T)
        torch.testing.assert_close(sc.transform_hidden(h, j + 1), reloaded.transport(h, j), atol=1e-6, rtol=1e-6)
