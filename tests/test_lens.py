"""The lens on a live model: same figures as evaluation on a store of the same text, batching,
refusals and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.evaluation.evaluate import evaluate_shortcuts
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.evaluation.lens import ShortcutLens
from njtc_solve.core.metrics import Reference, entropy, kl_divergence
from njtc_solve.core.models import load_model
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts
from njtc_solve.data.store import ActivationStore

from conftest import run_command, run_module


@pytest.fixture(scope="module")
def fitted(tiny_store, tmp_path_factory):
    """A full and a narrow map fitted on the tiny Llama's store, and the narrow one read through a layer norm."""
    [jtc] = fit_shortcuts(tiny_store, method="jtc", ranks=None, progress=False)
    [njtc] = fit_shortcuts(tiny_store, method="njtc", ranks=[4], progress=False)
    # the narrow maps read through a per-token layer norm (the lens need not know how they were fitted)
    layer_normed = {l: ShortcutMap(U=m.U, V=m.V, bias=m.bias, normalize="layer") for l, m in njtc.maps.items()}
    nnjtc = Shortcuts("nnjtc", layer_normed, njtc.target_layer, model_sha256=njtc.model_sha256, rank=4, normalize="layer",
                      provenance=njtc.provenance)
    folder = tmp_path_factory.mktemp("shortcuts")
    for sc in (jtc, njtc, nnjtc):
        sc.save(folder / f"{sc.name}.safetensors")
    return {sc.name: sc for sc in (jtc, njtc, nnjtc)}, folder


def _validation_sequences(store: ActivationStore):
    """Token ids of the store's validation sequences, with their rows (all positions stored)."""
    rows = np.flatnonzero(store.selection("validation"))
    sequence = store.read("sequence")[rows]
    tokens = store.read("tokens")[rows]
    position = store.read("position")[rows]
    out = []
    for s in np.unique(sequence):
        mine = rows[sequence == s]
        assert (position[sequence == s] == np.arange(len(mine))).all()
        out.append((tokens[sequence == s].tolist(), mine))
    return out


@pytest.mark.parametrize("name", ["jtc", "njtc-r4", "nnjtc-layer-r4"])
def test_trajectory_equals_evaluation_on_a_store_of_the_same_text(llama, fitted, tiny_store, name):
    model, tokenizer = llama
    sc = fitted[0][name]
    lens = ShortcutLens.from_model(model, sc, tokenizer)
    with ActivationStore(tiny_store) as store:
        sequences = _validation_sequences(store)
        traj = lens.trajectory([ids for ids, _ in sequences], k=3, batch_size=5)
        head = store.head()
        target = store.n_layers
        m = traj.methods.index(name)
        for p, (_, rows) in enumerate(sequences):  # per position: top-1 and KL from the stored rows
            final = Reference.from_logits(head.logits(torch.from_numpy(store.file[f"hidden/{target}"][rows])))
            for layer in range(target):
                x = torch.from_numpy(store.file[f"hidden/{layer}"][rows])
                _, logits = sc.maps[layer].predict_with_logits(x, head)
                np.testing.assert_array_equal(traj.topk_ids[m, p, layer, :, 0], logits.argmax(-1).numpy())
                np.testing.assert_allclose(traj.kl[m, p, layer], kl_divergence(final, logits).numpy(), atol=1e-5)
                np.testing.assert_allclose(traj.entropy[m, p, layer], entropy(logits).numpy(), atol=1e-5)
                np.testing.assert_allclose(traj.topk_probs[m, p, layer, :, 0],
                                           torch.softmax(logits, -1).max(-1).values.numpy(), atol=1e-6)
        # per layer: the evaluation loop's figures over the same rows (positions >= 1)
        result = evaluate_shortcuts(store, [sc], skip_positions=1, progress=False)
    for method in ("identity", name):
        i = traj.methods.index(method)
        for layer in range(target):
            assert traj.agrees[i, :, layer, 1:].mean() == pytest.approx(
                result.value(method, layer, "precision@1"), abs=1e-12)
            assert traj.kl[i, :, layer, 1:].mean() == pytest.approx(result.value(method, layer, "kl"), abs=1e-5)


def test_the_last_layer_reads_the_models_own_output(llama, fitted):
    model, tokenizer = llama
    traj = ShortcutLens.from_model(model, fitted[0]["jtc"], tokenizer).trajectory("def main(argv):", k=2)
    out = traj.n_layers
    assert traj.valid[:, 0, out].all() and traj.agrees[:, 0, out].all()
    np.testing.assert_allclose(traj.kl[:, 0, out], 0, atol=1e-5)
    with torch.no_grad():
        own = model(input_ids=torch.tensor([traj.token_ids[0]])).logits[0]
    np.testing.assert_array_equal(traj.final_top1[0], own.argmax(-1).numpy())


def test_prompts_of_different_lengths_batched_equal_one_at_a_time(llama, fitted):
    model, tokenizer = llama
    lens = ShortcutLens.from_model(model, fitted[0]["njtc-r4"], tokenizer)
    prompts = ["import os", "The quick brown fox jumps over the lazy dog.", "x = 1"]
    batched = lens.trajectory(prompts, k=4, batch_size=2)  # two batches, the first padded
    for p, prompt in enumerate(prompts):
        alone = lens.trajectory(prompt, k=4)
        n = len(alone.token_ids[0])
        assert batched.token_ids[p] == alone.token_ids[0]
        assert batched.valid[:, p, :, :n].all() and not batched.valid[:, p, :, n:].any()
        np.testing.assert_array_equal(batched.topk_ids[:, p, :, :n], alone.topk_ids[:, 0])
        np.testing.assert_allclose(batched.kl[:, p, :, :n], alone.kl[:, 0], atol=1e-5)
        np.testing.assert_allclose(batched.topk_probs[:, p, :, :n], alone.topk_probs[:, 0], atol=1e-5)
    df = batched.to_pandas()
    assert len(df) == 2 * (lens.n_layers + 1) * sum(map(len, batched.token_ids))
    assert set(df.columns) >= {"method", "prompt", "layer", "position", "input_token", "top1_token", "top1_prob",
                               "entropy", "kl", "agrees", "final_token", "topk_tokens", "topk_probs"}


def test_forward_follows_tuned_lens_conventions(llama, fitted):
    """``forward(h, idx)`` on any leading shape equals the head applied to ``transform_hidden``."""
    model, tokenizer = llama
    lens = ShortcutLens.from_model(model, fitted[0]["jtc"], tokenizer)
    h = torch.randn(2, 7, 32)
    y = lens.transform_hidden(h, 1)
    assert y.shape == h.shape
    torch.testing.assert_close(lens(h, 1), lens.head().logits(y.reshape(-1, 32)).reshape(2, 7, -1))
    torch.testing.assert_close(lens.transform_hidden(h, lens.n_layers), h)  # the last layer needs no map
    # the state is the Shortcuts module's maps (the head is the model's, identified by its fingerprint)
    assert {k.rsplit(".", 1)[0] for k in lens.state_dict()} == {"shortcuts.maps.0", "shortcuts.maps.1", "shortcuts.maps.2"}


def test_a_bfloat16_model_is_read_in_its_dtype(llama, fitted):
    model, tokenizer = llama
    from njtc_solve.core.models import model_sha256

    sha = model_sha256(model)
    half = type(model)(model.config).to(torch.bfloat16)
    half.load_state_dict(model.state_dict())
    lens = ShortcutLens.from_model(half, fitted[0]["jtc"], tokenizer, model_sha256=sha)
    traj = lens.trajectory("for i in range(3):", k=2)
    full = ShortcutLens.from_model(model, fitted[0]["jtc"], tokenizer).trajectory("for i in range(3):", k=2)
    assert np.isfinite(traj.kl[traj.valid]).all()
    assert (traj.topk_ids[..., 0] == full.topk_ids[..., 0]).mean() > 0.8  # bf16 rounding flips a few near ties
    with pytest.raises(NJTCError, match="fitted on another model"):  # its own hash is another model's
        ShortcutLens.from_model(half, fitted[0]["jtc"], tokenizer)


def test_moving_or_casting_the_lens_leaves_the_callers_maps_alone(llama, fitted):
    """The lens holds its own map modules over the caller's tensors: `.double()` on the lens casts
    its maps, not the caller's (which would then no longer match the caller's attached head)."""
    model, tokenizer = llama
    sc = fitted[0]["njtc-r4"]
    before = {l: (m.U.dtype, m.U.data_ptr()) for l, m in sc.maps.items()}
    lens = ShortcutLens.from_model(model, sc, tokenizer)
    assert lens.shortcuts.maps[1].U.data_ptr() == sc.maps[1].U.data_ptr()  # shared tensors, no copy
    lens.double()
    assert lens.shortcuts.maps[1].U.dtype == torch.float64
    assert {l: (m.U.dtype, m.U.data_ptr()) for l, m in sc.maps.items()} == before
    assert lens.shortcuts.maps[1] is not sc.maps[1]


def test_refuses_maps_of_another_model_or_layer(tiny_models, fitted, llama):
    gpt2, tok, _ = load_model(str(tiny_models["gpt2"]), progress=False)
    with pytest.raises(NJTCError, match=r"shortcuts jtc were fitted on another model \(model_sha256"):
        ShortcutLens.from_model(gpt2, fitted[0]["jtc"], tok)
    model, tokenizer = llama
    sc = fitted[0]["jtc"]
    shifted = Shortcuts(sc.method, {0: sc.maps[0]}, sc.target_layer - 1, model_sha256=sc.model_sha256)
    with pytest.raises(NJTCError, match=r"target layer 2, not the last layer of this model \(3\)"):
        ShortcutLens.from_model(model, shifted, tokenizer)
    other_head = sc.replace(head_sha256="0" * 64)
    with pytest.raises(NJTCError, match="shortcuts jtc were fitted for another head"):
        ShortcutLens.from_model(model, other_head, tokenizer)
    lens = ShortcutLens.from_model(model, sc, tokenizer)
    with pytest.raises(NJTCError, match=r"token ids must be in \[0, "):
        lens.trajectory([[1, 10_000]])
    with pytest.raises(NJTCError, match="reads at most 64"):
        lens.trajectory([[1] * 65])


def test_cli_writes_figure_json_and_csv(tiny_models, fitted, tmp_path):
    out = tmp_path / "lens"
    path = fitted[1] / "jtc.safetensors"
    prompt = "The lens reads every layer of the model, token by token."
    done = run_module("njtc_solve.lens", "--model", str(tiny_models["llama"]), "--shortcuts", str(path),
                      "--prompt", prompt, "--out", str(out), "--max-positions", "6", "--top-k", "3")
    assert done.returncode == 0, done.stderr
    assert "the figure shows the last 6 of" in done.stdout
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.strip()}
    assert len(rows["0"]) == len(rows["out"]) == 6  # KL, agreement and top-1 of the logit lens and of jtc
    assert float(rows["out"][0]) < 1e-3 and float(rows["out"][1]) == 1.0
    assert (out / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "trajectory.json").read_text())
    import pandas as pd

    csv = pd.read_csv(out / "trajectory.csv")
    assert len(saved["records"]) == len(csv) == 2 * 4 * saved["records"][-1]["position"] + 2 * 4
    assert set(csv.method) == {"identity", "jtc"}
    assert not list(out.glob("*.partial"))


@pytest.mark.parametrize("args, message", [
    (["--prompt", " "], "--prompt is empty"),
    (["--prompt", "x", "--shortcuts", "missing.safetensors"], "shortcut file missing.safetensors not found"),
    (["--prompt", "x", "--top-k", "0"], "--top-k must be at least 1"),
])
def test_cli_refuses_bad_input_on_one_line(tiny_models, args, message):
    done = run_command("lens", "--model", str(tiny_models["llama"]), *args)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {message}"


def test_cli_refuses_a_foreign_shortcut_file(tiny_models, fitted):
    done = run_command("lens", "--model", str(tiny_models["gpt2"]), "--shortcuts",
                       str(fitted[1] / "jtc.safetensors"), "--prompt", "x", "--no-progress")
    assert done.returncode == 2
    assert done.stderr.startswith("error: shortcuts jtc were fitted on another model") and done.stderr.count("\n") == 1


def test_cli_reads_a_tuned_lens_folder(tiny_models, fitted, tmp_path):
    from njtc_solve.maps.tuned_lens import export_tuned_lens

    folder = export_tuned_lens(fitted[0]["njtc-r4"], tmp_path / "lens")
    done = run_module("njtc_solve.lens", "--model", str(tiny_models["llama"]), "--tuned-lens", str(folder),
                      "--prompt", "import os", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    import pandas as pd

    csv = pd.read_csv(tmp_path / "out" / "trajectory.csv")
    assert set(csv.method) == {"identity", "tuned-lens"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_bfloat16_model_on_the_gpu(llama, fitted):
    model, tokenizer = llama
    from njtc_solve.core.models import model_sha256

    sha = model_sha256(model)
    gpu = type(model)(model.config)
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.to("cuda", torch.bfloat16)
    lens = ShortcutLens.from_model(gpu, fitted[0]["njtc-r4"], tokenizer, model_sha256=sha)
    assert lens.head().unembed.device.type == "cuda" and lens.shortcuts.maps[1].U.device.type == "cuda"
    prompts = ["for i in range(3):", "import os"]
    traj = lens.trajectory(prompts, k=2)
    cpu = ShortcutLens.from_model(model, fitted[0]["njtc-r4"], tokenizer).trajectory(prompts, k=2)
    assert np.isfinite(traj.kl[traj.valid]).all()
    assert (traj.topk_ids[..., 0] == cpu.topk_ids[..., 0])[traj.valid].mean() > 0.8
