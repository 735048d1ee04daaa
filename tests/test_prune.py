"""Block replacement (``python -m njtc_solve.prune``): the fold, the statistics, the choice, bad input.

The saved checkpoints are loaded by plain transformers in a subprocess that never imports
njtc_solve, and compared with the original model run with blocks S..S+K-1 turned into the
identity and block S-1's MLP output mapped by ``m ↦ m·T + c`` (forward hooks, no folding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from njtc_solve.core.architectures import resolve_parts
from njtc_solve.data.corpus import load_corpus
from njtc_solve.cli import run_cli
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.models import load_model
from njtc_solve.data.plan import plan_extraction
from njtc_solve.prune.checkpoint import PRUNE_RECORD, save_pruned
from njtc_solve.prune.replacement import Replacement, apply_replacement, check_removal, solve_replacement

_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              max_position_embeddings=64, vocab_size=96)


def _family_model(family: str):
    """A tiny random model of a foldable family, with random biases where the MLP has them."""
    import transformers as T

    torch.manual_seed(3)
    configs = {
        "llama": lambda: T.LlamaConfig(**_SIZES, num_key_value_heads=2, tie_word_embeddings=False),
        "llama-mlp_bias": lambda: T.LlamaConfig(**_SIZES, num_key_value_heads=2, mlp_bias=True),
        "mistral": lambda: T.MistralConfig(**_SIZES, num_key_value_heads=2),
        "qwen2": lambda: T.Qwen2Config(**_SIZES, num_key_value_heads=2),
        "gpt2": lambda: T.GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=4, n_head=4, bos_token_id=0,
                                      eos_token_id=0),
        "gpt_neox": lambda: T.GPTNeoXConfig(**_SIZES),
        "gpt_neox-sequential": lambda: T.GPTNeoXConfig(**_SIZES, use_parallel_residual=False),
    }
    model = T.AutoModelForCausalLM.from_config(configs[family]()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _random_map(d: int, seed: int, intercept: bool):
    g = torch.Generator().manual_seed(seed)
    T = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    return T, (0.5 * torch.randn(d, generator=g, dtype=torch.float64) if intercept else None)


def _reference_logits(model, ids, start: int, remove: int, T, c):
    """The original model with blocks start..start+remove-1 as the identity and m ↦ m·T + c on block start-1."""
    _, blocks, _, _ = resolve_parts(model)
    mlp_out = {}
    hooks = [blocks[start - 1].mlp.register_forward_hook(lambda mod, a, out: mlp_out.__setitem__("m", out))]

    def mapped(mod, args, kwargs, out):
        h = out[0] if isinstance(out, tuple) else out
        m = mlp_out["m"].double()
        h = (h.double() + m @ (T - torch.eye(len(T), dtype=torch.float64)) + (0 if c is None else c)).to(h.dtype)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def identity(mod, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    hooks.append(blocks[start - 1].register_forward_hook(mapped, with_kwargs=True))
    hooks += [blocks[i].register_forward_hook(identity, with_kwargs=True) for i in range(start, start + remove)]
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()


_LOADER = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    for name, folder in json.load(open("jobs.json")).items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = torch.load(folder + "/ids.pt")
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        torch.save({"logits": logits, "layers": model.config.num_hidden_layers}, folder + "/loaded.pt")
    assert not any(m.startswith("njtc_solve") for m in sys.modules)
    print("ok")
""")

_CASES = [("llama", 1, 2, False), ("llama", 2, 2, "mlp_bias"), ("llama-mlp_bias", 1, 1, True),
          ("mistral", 2, 1, False), ("qwen2", 1, 3, False), ("gpt2", 1, 2, True), ("gpt_neox", 2, 2, True),
          ("gpt_neox-sequential", 3, 1, True)]


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """Each case pruned, saved and loaded back by plain transformers in one subprocess."""
    root = tmp_path_factory.mktemp("pruned")
    jobs, expected = {}, {}
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    for n, (family, start, remove, intercept) in enumerate(_CASES):
        model = _family_model(family)
        T, c = _random_map(32, n, bool(intercept))
        expected[n] = _reference_logits(model, ids, start, remove, T, c)
        where = "mlp_bias" if intercept == "mlp_bias" else ("bias" if intercept else "none")
        apply_replacement(model, Replacement(start, remove, T, c, "lsq", "plain", 0.0, where))
        with torch.no_grad():  # in-process, the KV cache must still work after renumbering the layers
            gen = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
            gen_nocache = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False, use_cache=False,
                                         pad_token_id=0)
        assert torch.equal(gen, gen_nocache), family
        layer_idx = [m.layer_idx for b in resolve_parts(model)[1] for m in b.modules() if hasattr(m, "layer_idx")]
        assert layer_idx and sorted(set(layer_idx)) == list(range(4 - remove)), (family, layer_idx)
        folder = save_pruned(model, None, root / f"case{n}", record={"case": family})
        torch.save(ids, folder / "ids.pt")
        jobs[f"case{n}"] = str(folder)
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _LOADER], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {n: (torch.load(root / f"case{n}" / "loaded.pt"), expected[n]) for n in range(len(_CASES))}


@pytest.mark.parametrize("case", range(len(_CASES)), ids=[f"{c[0]}-S{c[1]}-K{c[2]}-{c[3]}" for c in _CASES])
def test_saved_checkpoint_equals_kept_blocks_plus_map(folded, case):
    loaded, expected = folded[case]
    family, start, remove, _ = _CASES[case]
    assert loaded["layers"] == 4 - remove
    scale = expected.abs().max()
    assert (loaded["logits"] - expected).abs().max() <= 1e-5 * scale, family


def test_drop_differs():
    """Dropping and a random map give visibly different logits, so the equality above is a real check."""
    model = _family_model("llama")
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    T, c = _random_map(32, 0, True)
    mapped = _reference_logits(model, ids, 1, 2, T, c)
    dropped = _reference_logits(model, ids, 1, 2, torch.eye(32, dtype=torch.float64), None)
    assert (mapped - dropped).abs().max() > 1e-2 * mapped.abs().max()


def _states(model, ids, batch_size: int = 8):
    """Residual streams 0..L and MLP outputs, float64, read by hooks on whole blocks and whole MLPs.

    The same batches as the statistics' pass, so both see the same float32 activations.
    """
    _, blocks, _, _ = resolve_parts(model)
    got = {}

    def keep(name):
        return lambda mod, args, kwargs, out: got.setdefault(name, []).append(
            (out[0] if isinstance(out, tuple) else out).double())

    hooks = [blocks[0].register_forward_pre_hook(
        lambda mod, args, kwargs: got.setdefault("h0", []).append((args[0] if args else kwargs["hidden_states"]).double()),
        with_kwargs=True)]
    hooks += [b.register_forward_hook(keep(f"h{i + 1}"), with_kwargs=True) for i, b in enumerate(blocks)]
    hooks += [b.mlp.register_forward_hook(keep(f"m{i}"), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for b0 in range(0, len(ids), batch_size):
                model(input_ids=ids[b0:b0 + batch_size])
    finally:
        for h in hooks:
            h.remove()
    def flat(name):
        return torch.cat(got[name]).reshape(-1, got[name][0].shape[-1]).numpy()

    return [flat(f"h{l}") for l in range(len(blocks) + 1)], [flat(f"m{i}") for i in range(len(blocks))]


def _lstsq(x, y, w, intercept: bool):
    """Weighted least squares of y on x (with an intercept column), float64 numpy."""
    a = np.hstack([x, np.ones((len(x), 1))]) if intercept else x
    r = np.sqrt(w)[:, None]
    coef = np.linalg.lstsq(a * r, y * r, rcond=None)[0]
    return (coef[:-1], coef[-1]) if intercept else (coef, None)


@pytest.fixture(scope="module")
def llama_stats(tiny_models):
    """Statistics of the tiny Llama (3 blocks) over a plan, and the same rows read independently."""
    from njtc_solve.prune.replacement_statistics import replacement_statistics

    model, tok, _ = load_model(str(tiny_models["llama"]))
    _, docs = load_corpus()
    plan = plan_extraction(tok, docs, seq_len=32, max_tokens=1600, val_fraction=0.25)
    train = plan.sequences(slice(0, int((plan.split == 0).sum())))
    stats = replacement_statistics(model, train, {1: [1, 2], 2: [1]}, batch_size=8)
    hidden, mlp = _states(model, torch.as_tensor(train.token_ids))
    return stats, hidden, mlp, train, model


@pytest.mark.parametrize("weighting", ["plain", "rms"])
@pytest.mark.parametrize("intercept", [True, False])
@pytest.mark.parametrize("start,remove", [(1, 1), (1, 2), (2, 1)])
def test_map_equals_float64_least_squares(llama_stats, weighting, intercept, start, remove):
    """T and c from the streamed statistics equal an independent float64 lstsq on every row, position 0 included."""
    stats, hidden, mlp, train, _ = llama_stats
    assert stats.n_rows == train.token_ids.size  # every position
    x, h_s, h_e = mlp[start - 1], hidden[start], hidden[start + remove]
    w = np.ones(len(x)) if weighting == "plain" else 1.0 / (h_s ** 2).mean(1)
    T_ref, c_ref = _lstsq(x, h_e - h_s + x, w, intercept)
    rep = solve_replacement(stats, start=start, remove=remove, weighting=weighting, intercept=intercept)
    tol = 1e-5  # observed 5e-7..1.5e-6: float32 GEMMs (with float64 GEMMs the same code gives 1e-13)
    err = np.abs(rep.T.numpy() - T_ref).max() / np.abs(T_ref).max()
    assert err < tol, err
    if intercept:
        assert np.abs(rep.c.numpy() - c_ref).max() < tol * np.abs(c_ref).max()
    # the check can fail: without position 0 the map is measurably different
    keep = np.tile(np.arange(train.seq_len) > 0, len(train.token_ids))
    T_skip, _ = _lstsq(x[keep], (h_e - h_s + x)[keep], w[keep], intercept)
    assert np.abs(T_skip - T_ref).max() / np.abs(T_ref).max() > 10 * tol


@pytest.mark.parametrize("start,remove", [(1, 2), (2, 1)])
def test_scoring_path_equals_the_folded_model(llama_stats, start, remove):
    """Candidates are scored by running only the tail on the cached stream: that must be the folded model."""
    import copy

    from njtc_solve.prune.scoring import collect_reference, replaced_stream, tail_logits

    stats, _, _, train, model = llama_stats
    held = collect_reference(model, train.sequences(slice(0, 2)))
    rep = solve_replacement(stats, start=start, remove=remove, weighting="rms", intercept=True,
                            intercept_name="mlp_bias")
    tail = tail_logits(model, held.token_ids, replaced_stream(held, rep, slice(0, 2)), first_block=start + remove)
    pruned = copy.deepcopy(model)
    apply_replacement(pruned, rep)
    with torch.no_grad():
        folded = pruned(input_ids=held.token_ids).logits
    assert (tail - folded).abs().max() <= 1e-5 * folded.abs().max()
    with torch.no_grad():  # and it is not the full model
        assert (model(input_ids=held.token_ids).logits - folded).abs().max() > 1e-3 * folded.abs().max()


def test_weighting_differs_from_plain(llama_stats):
    stats = llama_stats[0]
    plain = solve_replacement(stats, start=1, remove=1, weighting="plain")
    rms = solve_replacement(stats, start=1, remove=1, weighting="rms")
    assert (plain.T - rms.T).abs().max() > 1e-4
    ridge = solve_replacement(stats, start=1, remove=1, weighting="plain", alpha=1e6)
    assert (ridge.T - torch.eye(32, dtype=torch.float64)).abs().max() < 1e-3  # shrinks towards dropping


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()[1]


def test_never_worse_than_dropping(tiny_models, corpus, monkeypatch):
    """Per start the lowest held-out KL wins, dropping included; if dropping scores best, it is what is chosen."""
    from njtc_solve.prune import selection as pruning

    model, tok, _ = load_model(str(tiny_models["llama"]))
    kwargs = dict(remove=1, seq_len=32, max_tokens=1600, score_tokens=128, progress=False)
    real = pruning.score_replacement

    def worse(model, held, rep, **kw):
        score = real(model, held, rep, **kw)
        return score if rep.name == "drop" else {**score, "kl": score["kl"] + 1.0}

    monkeypatch.setattr(pruning, "score_replacement", worse)
    result = pruning.prune_model(model, tok, corpus, start=2, **kwargs)
    assert result.chosen.name == "drop" and result.chosen.start == 2 and result.chosen.c is None
    assert len(result.candidates) == 5 and result.best(2)["name"] == "drop"


def test_prune_command_writes_a_loadable_model(tiny_models, tmp_path, capsys):
    from njtc_solve.cli.prune import main

    out = tmp_path / "pruned"
    argv = ["--model", str(tiny_models["llama"]), "--remove", "1", "--auto", "--out", str(out), "--seq-len", "32",
            "--max-tokens", "1600", "--score-tokens", "128", "--no-progress"]
    assert run_cli(main, argv) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "cosine distance would choose" in printed
    record = json.loads((out / PRUNE_RECORD).read_text())
    assert record["n_blocks_after"] == 2 and len(record["candidates"]) == 2 * 5
    chosen = [c for c in record["candidates"] if c["start"] == record["start"] and c["name"] == record["method"]][0]
    assert chosen["kl"] == min(c["kl"] for c in record["candidates"])
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).num_hidden_layers == 2
    assert len(AutoTokenizer.from_pretrained(out)("def f")["input_ids"]) > 0
    # a second run to the same folder: refused without --overwrite, replaced with it
    assert run_cli(main, argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    # never worse than dropping: at every start the best candidate is at or below dropping's KL
    for s in (1, 2):
        at = [c for c in record["candidates"] if c["start"] == s]
        assert min(c["kl"] for c in at) <= [c["kl"] for c in at if c["name"] == "drop"][0]
    assert record["method"] != "drop"  # on this model a fitted map beats dropping


def test_save_pruned_replaces_only_its_own_output(tmp_path):
    model = _family_model("gpt2")
    out = save_pruned(model, None, tmp_path / "m", record={"run": 1})
    with pytest.raises(NJTCError, match="exists; pass `overwrite=True`"):
        save_pruned(model, None, out, record={"run": 2})
    save_pruned(model, None, out, record={"run": 2}, overwrite=True)
    record = json.loads((out / PRUNE_RECORD).read_text())  # the record, its format and the files written
    assert record["run"] == 2 and record["format"] == "njtc-prune" and PRUNE_RECORD in record["written_files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left


def _bad(argv, capsys):
    from njtc_solve.cli.prune import main

    code = run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("extra,message", [
    (["--remove", "0", "--auto"], "--remove must be at least 1, not 0"),
    (["--remove", "3", "--auto"], "--remove 3 leaves no block before the removed ones"),
    (["--remove", "2", "--start", "2"], "--start 2 with --remove 2 runs past the last block"),
    (["--remove", "1", "--start", "0"], "--start 0: the map folds into the block before"),
    (["--remove", "1", "--auto", "--positions", "one-per-sequence"], "a replacement is fitted on every position"),
    (["--remove", "1", "--auto", "--ridge", "0,x"], "cannot parse --ridge"),
    (["--remove", "1", "--auto", "--weighting", "cosine"], "--weighting must be among plain, rms"),
    (["--remove", "1", "--auto", "--val-fraction", "0"], "--val-fraction must be above 0"),
])
def test_bad_input_before_the_model_loads(tiny_models, tmp_path, capsys, monkeypatch, extra, message):
    import njtc_solve.core.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    code, err = _bad(["--model", str(tiny_models["llama"]), "--out", str(out), *extra], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_output_folders(tiny_models, tmp_path, capsys):
    model = str(tiny_models["llama"])
    base = ["--model", model, "--remove", "1", "--start", "1", "--no-progress"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    cases = [(["--out", model], "is an input"),
             (["--out", str(tiny_models["llama"].parent)], "is an input"),
             (["--out", str(foreign)], "exists; pass --overwrite"),
             (["--out", str(foreign), "--overwrite"], "is not a pruned model written by njtc_solve"),
             (["--out", str(tmp_path / "no" / "such")], "does not exist")]
    for extra, message in cases:
        code, err = _bad(base + extra, capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert (foreign / "keep.txt").read_text() == "x"


def test_unfoldable_family_refused(tmp_path, capsys):
    from transformers import Gemma2Config

    folder = tmp_path / "gemma2"
    Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8).save_pretrained(folder)
    code, err = _bad(["--model", str(folder), "--remove", "1", "--auto", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "gemma2 cannot be pruned by folding" in err
    with pytest.raises(NJTCError, match="scale_attn_by_inverse_layer_idx"):
        from transformers import GPT2Config

        from njtc_solve.core.architectures import check_foldable

        check_foldable(GPT2Config(scale_attn_by_inverse_layer_idx=True))


def test_intercept_bias_without_a_bias_refused_before_loading(tmp_path, capsys):
    """Mistral's down_proj has no bias and its config no option for one: refused from the config alone
    (the folder holds no weights, so a load would fail differently)."""
    from transformers import MistralConfig

    folder = tmp_path / "mistral"
    MistralConfig(**_SIZES, num_key_value_heads=2).save_pretrained(folder)
    argv = ["--model", str(folder), "--remove", "1", "--start", "1", "--out", str(tmp_path / "o")]
    code, err = _bad([*argv, "--intercept", "bias"], capsys)
    assert code == 2 and err.startswith("error: --intercept bias: mistral's MLP output projection has no bias"), err
    assert not (tmp_path / "o").exists()


def test_check_removal_library_messages():
    with pytest.raises(NJTCError, match="`remove` must be at least 1"):
        check_removal(4, 0)
    with pytest.raises(NJTCError, match="last start is 2"):
        check_removal(4, 2, 3)


def test_missing_model_refused_before_loading(tmp_path, capsys):
    code, err = _bad(["--model", str(tmp_path / "missing.gguf"), "--remove", "1", "--start", "1", "--out",
                      str(tmp_path / "o")], capsys)
    assert code == 2 and err == f"error: model file {tmp_path / 'missing.gguf'} not found"
    assert not (tmp_path / "o").exists()


def test_gguf_loaded_model_is_saved_as_the_plain_model(tmp_path):
    """A model read from a GGUF file (dequantized weights, GGUF still named as its quantizer) is saved."""
    from types import SimpleNamespace

    model = _family_model("gpt2")
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    save_pruned(model, None, tmp_path / "m", record={})
    assert model.hf_quantizer is None and (tmp_path / "m" / "model.safetensors").is_file()
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="bitsandbytes"))
    with pytest.raises(NJTCError, match="quantized with bitsandbytes cannot be saved"):
        save_pruned(model, None, tmp_path / "n", record={})
    assert not (tmp_path / "n").exists()


def test_refused_output_folder_leaves_the_model_unchanged(tiny_models, corpus, tmp_path):
    """PruneResult.save checks the folder before it folds and removes blocks: a refusal changes nothing."""
    from njtc_solve.prune.selection import prune_model

    model, tok, _ = load_model(str(tiny_models["llama"]))
    result = prune_model(model, tok, corpus, remove=1, start=1, seq_len=32, max_tokens=1600, score_tokens=64,
                         progress=False)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NJTCError, match="exists"):
        result.save(model, tok, taken)
    assert model.config.num_hidden_layers == 3 and len(resolve_parts(model)[1]) == 3
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_refused_fold_leaves_the_model_as_it_was(tiny_models):
    """The intercept a projection cannot hold is refused before any weight is written."""
    from njtc_solve.prune.replacement import Replacement, fold_replacement

    model, _, _ = load_model(str(tiny_models["llama"]), progress=False)
    d = model.config.hidden_size
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = Replacement(1, 1, torch.eye(d, dtype=torch.float64) * 2, torch.ones(d, dtype=torch.float64), "lsq+x",
                        "none", 0.0, "none", 0.0, 0.0)  # an intercept the family's bias option does not serve
    with pytest.raises(NJTCError, match="has no bias for the intercept"):
        fold_replacement(model, wrong)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
