"""Fits under a memory budget (several passes over the rows, the maps of one) and the plan before the fit."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from test_distributed import torchrun
from test_extract import _one_line_exit_2
from test_jacobian_lens import in_process

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.models import load_model
from njtc_solve.data.corpus import load_corpus
from njtc_solve.data.live import LiveSource
from njtc_solve.data.store import ActivationStore
from njtc_solve.maps.shortcuts import Shortcuts
from njtc_solve.solve.budget import (FREE_FRACTION, accumulator_bytes, chunk_bytes, layer_groups, pair_pass_bytes,
                                     parse_size, pass_bytes, target_groups)
from njtc_solve.solve.fit import FitSpec, fit_all_targets, fit_shortcuts
from njtc_solve.solve.stats import MomentAccumulator

D = 32  # the tiny models' width
SIZES = {"chunk_rows": FitSpec().chunk_rows}  # what a pass holds beside its statistics: one chunk of the fit's rows
THREE_PASSES = pass_bytes(1, D, **SIZES)  # one source layer per pass: the tiny models' 3 layers in 3 passes


def _relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _same_maps(a: Shortcuts, b: Shortcuts, tol: float = 1e-6) -> None:
    """Every tensor of every map of ``a`` within ``tol`` (relative) of ``b``'s, the layers in the same order."""
    assert list(a.maps) == list(b.maps)
    for layer in a.maps:
        for name, t in vars(a.maps[layer]).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                assert _relative(t, getattr(b.maps[layer], name)) <= tol, (layer, name)
    assert [r["train_mse"] for r in a.stats["layers"].values()] == pytest.approx(
        [r["train_mse"] for r in b.stats["layers"].values()], rel=1e-9)


def _counting(source):
    """``source`` with its ``iter_chunks`` counted: one call per pass over the rows."""
    calls = []
    original = source.iter_chunks

    def iter_chunks(layers, *args, **kwargs):  # every argument passed on (a store's prefetch too)
        calls.append(list(layers))
        return original(layers, *args, **kwargs)

    source.iter_chunks = iter_chunks
    return calls


@pytest.mark.parametrize(("text", "expected"), [("40GB", 40 * 10 ** 9), ("512MiB", 512 * 2 ** 20), ("1.5kB", 1500),
                                                (" 2 gib ", 2 * 2 ** 30), (4096, 4096), ("100", 100)])
def test_sizes_are_read_in_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected
    assert FitSpec(max_memory=text).max_memory == expected


@pytest.mark.parametrize("bad", ["40XB", "GB", "-1GB", "0", "", "1e400GB", "4 0GB", True, 0, -5, 0.5, [1]])
def test_a_bad_size_is_refused_in_one_line(bad):
    with pytest.raises(NJTCError, match="`max_memory` must be a"):
        FitSpec(max_memory=bad)


@pytest.mark.parametrize(("bad", "message"), [("1e400", "is not finite"), (float("inf"), "is not finite"),
                                              ("1e30TB", "larger than 2**63 bytes"), (2 ** 64, "larger than 2**63")])
def test_an_infinite_or_absurd_size_is_refused_as_such(bad, message):
    with pytest.raises(NJTCError, match=re.escape(message)) as err:
        parse_size(bad)
    assert "\n" not in str(err.value)


def test_the_budget_counts_what_the_accumulator_allocates():
    acc = MomentAccumulator([0, 4, 7])
    acc.allocate({0: D, 4: D, 7: D}, D)
    assert acc.buffer.numel() * acc.buffer.element_size() == accumulator_bytes(3, D)
    # the centred statistics finalize returns come on top, while the accumulator still lives
    acc.update({k: torch.randn(50, D) for k in (0, 4, 7)}, torch.randn(50, D))
    stats = acc.finalize()
    held = sum(t.numel() * 8 for m in stats.layers.values() for t in vars(m).values()) + 8 * (D * D + D)
    assert pass_bytes(3, D) == accumulator_bytes(3, D) + held


def test_layers_split_evenly_into_the_fewest_passes():
    groups = layer_groups(list(range(80)), 8192, parse_size("80GB"))  # Llama-2-70B's shape
    assert [len(g) for g in groups] == [27, 27, 26] and sum(groups, []) == list(range(80))
    assert pass_bytes(36, 8192) <= 80e9 < pass_bytes(37, 8192)  # 36 per pass at most: 3 passes are the fewest
    assert layer_groups([3, 1, 2], D, THREE_PASSES, **SIZES) == [[3], [1], [2]]  # their order kept
    assert layer_groups([0, 1, 2], D, 10 ** 9) == [[0, 1, 2]]
    with pytest.raises(NJTCError, match="cannot hold the statistics of one layer"):
        layer_groups([0], D, THREE_PASSES - 1, **SIZES)


def test_the_budget_counts_the_chunk_of_every_layer_and_a_one_jumps_moments(tiny_store):
    """A budget that holds three layers' statistics but not a chunk of their rows splits the fit."""
    statistics_only = pass_bytes(3, D)
    assert pass_bytes(3, D, **SIZES) - statistics_only == chunk_bytes(4, D, SIZES["chunk_rows"])
    assert chunk_bytes(4, D, 100) - chunk_bytes(3, D, 100) >= 100 * D * (4 + 4)  # a layer's rows and their copy
    assert chunk_bytes(4, D, 100, float64=True) > chunk_bytes(4, D, 100)
    fit = {"method": "njtc", "ranks": [4], "progress": False, "chunk_rows": 64}  # a chunk smaller than 3 layers' stats
    with ActivationStore(tiny_store) as store:
        calls = _counting(store)
        [sc] = fit_shortcuts(store, max_memory=statistics_only, **fit)
        assert len(calls) > 1 and sc.stats["accumulation"]["passes"] == len(calls)
        # the ordinary fit of the three layers fits in one pass; a one jump's moments do not
        enough = pass_bytes(3, D, chunk_rows=64)
        [sc] = fit_shortcuts(store, max_memory=enough, **fit)
        assert "passes" not in sc.stats["accumulation"]
        with pytest.raises(NJTCError, match="`one_jump` solves from every layer"):
            fit_shortcuts(store, max_memory=enough, one_jump=True, **fit)


def test_the_default_budget_is_a_stated_fraction_of_free_memory(monkeypatch):
    from njtc_solve.solve import budget

    monkeypatch.setattr(budget, "free_memory", lambda device: 10 ** 10)
    assert 0 < FREE_FRACTION < 1 and FitSpec().memory_budget() == int(FREE_FRACTION * 10 ** 10)


def test_store_fit_in_three_passes_equals_one_pass(tiny_store):
    with ActivationStore(tiny_store) as store:
        for settings in ({"method": "nnjtc", "ranks": [4, 8]}, {"method": "jtc", "alpha": "auto"}):
            calls = _counting(store)
            one = fit_shortcuts(store, progress=False, **settings)
            assert len(calls) == 1
            three = fit_shortcuts(store, progress=False, max_memory=THREE_PASSES, **settings)
            assert [sorted(c) for c in calls[1:]] == [[0, 3], [1, 3], [2, 3]]  # one read per source layer
            for a, b in zip(three, one):
                _same_maps(a, b)
                assert a.stats["accumulation"]["passes"] == 3 and "passes" not in b.stats["accumulation"]


def test_live_fit_in_three_passes_equals_one_pass(tiny_models):
    model, tokenizer, name = load_model(str(tiny_models["llama"]))
    live = LiveSource(model, tokenizer, load_corpus()[1], model_name=name, seq_len=32, max_tokens=1536, batch_size=4)
    calls = _counting(live)
    [one] = fit_shortcuts(live, method="njtc", ranks=[4], progress=False)
    [three] = fit_shortcuts(live, method="njtc", ranks=[4], progress=False, max_memory=THREE_PASSES)
    assert len(calls) == 1 + 3  # one forward pass over the corpus per group
    _same_maps(three, one)


def test_every_target_in_passes_equals_one_pass(tiny_store):
    sources, targets = [0, 1, 2], [1, 2, 3]
    budget = pair_pass_bytes(sources, [3], D, **SIZES)  # the highest target alone (its chunk holds 1 and 2 with it)
    assert target_groups(sources, targets, D, budget, **SIZES) == [[1, 2], [3]]
    one = dict(fit_all_targets(str(tiny_store), method="njtc", ranks=[4], progress=False))
    with ActivationStore(tiny_store) as store:
        calls = _counting(store)
        three = dict(fit_all_targets(store, method="njtc", ranks=[4], progress=False, max_memory=budget))
    assert [sorted(c) for c in calls] == [[0, 1, 2], [0, 1, 2, 3]]
    assert list(three) == list(one) == targets
    for t in targets:
        _same_maps(three[t][0], one[t][0])
    with pytest.raises(NJTCError, match="cannot hold the statistics of target layer 3"):
        fit_all_targets(str(tiny_store), method="njtc", ranks=[4], progress=False, max_memory=budget - 1)


def test_every_target_in_passes_frees_each_pass_before_the_next(tiny_store, monkeypatch):
    """While a pass accumulates, no earlier pass's statistics are alive (the budget holds one pass)."""
    import gc
    import weakref

    from njtc_solve.solve import fit

    earlier, alive_at_start = [], []
    accumulate = fit.accumulate_pairs

    def watched(*args, **kwargs):
        gc.collect()
        alive_at_start.append([ref() is not None for ref in earlier])
        pairs = accumulate(*args, **kwargs)
        earlier.append(weakref.ref(pairs))
        return pairs

    monkeypatch.setattr(fit, "accumulate_pairs", watched)
    budget = pair_pass_bytes([0, 1, 2], [3], D, **SIZES)  # two passes: targets 1, 2, then 3
    fits = fit_all_targets(str(tiny_store), method="njtc", ranks=[4], progress=False, max_memory=budget)
    assert [t for t, _ in fits] == [1, 2, 3]
    assert alive_at_start == [[], [False]]


def test_save_stats_in_several_passes_is_refused(tiny_store, tmp_path):
    with pytest.raises(NJTCError, match="`save_stats` keeps every layer's statistics at once"):
        fit_shortcuts(str(tiny_store), progress=False, max_memory=THREE_PASSES, save_stats=tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()


def test_one_jump_in_several_passes_is_refused_before_the_pass(tiny_store):
    calls = []
    with ActivationStore(tiny_store) as store, pytest.raises(NJTCError, match="`one_jump` solves from every layer"):
        calls = _counting(store)
        fit_shortcuts(store, method="njtc", ranks=[4], progress=False, one_jump=True,
                      max_memory=pass_bytes(1, D, one_jump=True, **SIZES))
    assert calls == []


def test_torchrun_in_passes_equals_one_process_in_one_pass(tiny_store, tmp_path):
    result = torchrun("njtc_solve.fit", "--store", str(tiny_store), "--method", "njtc", "--rank", "4",
                      "--chunk-rows", "300", "--max-memory", str(pass_bytes(1, D, chunk_rows=300)), "--out", str(tmp_path / "d.safetensors"),
                      "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    [one] = fit_shortcuts(str(tiny_store), method="njtc", ranks=[4], chunk_rows=300, progress=False)
    dist = Shortcuts.load(tmp_path / "d.safetensors")
    assert dist.stats["accumulation"]["passes"] == 3
    _same_maps(dist, one)


def test_a_budget_below_one_layer_is_refused_before_any_work(tiny_store, tiny_models, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the budget was checked")

    monkeypatch.setattr(ActivationStore, "iter_chunks", no_work)
    out = tmp_path / "maps.safetensors"
    _one_line_exit_2(in_process(capsys, "njtc_solve.fit", "--store", str(tiny_store), "--max-memory", "10kB",
                                "--out", str(out)), "--max-memory 10.0 kB cannot hold the statistics of one layer")
    _one_line_exit_2(in_process(capsys, "njtc_solve.fit", "--store", str(tiny_store), "--target-layer", "all",
                                "--max-memory", "10kB", "--out", str(out)), "--max-memory 10.0 kB cannot hold")
    monkeypatch.setattr("njtc_solve.core.models.load_model", no_work)  # a live fit: before the model loads
    _one_line_exit_2(in_process(capsys, "njtc_solve.fit", "--model", str(tiny_models["llama"]), "--max-memory",
                                "10kB", "--out", str(out)), "cannot hold the statistics of one layer")
    _one_line_exit_2(in_process(capsys, "njtc_solve.fit", "--store", str(tiny_store), "--max-memory", "12 parsecs",
                                "--out", str(out)), "--max-memory must be a size such as 40GB")
    assert not out.exists()


def _config_only(folder, tokenizer_from, **shape):
    """A Hugging Face folder holding a Llama config.json of ``shape`` and a tokenizer: no weights."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32000, **shape).save_pretrained(folder)
    for path in tokenizer_from.iterdir():
        if "token" in path.name:
            shutil.copy(path, folder / path.name)
    assert not [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    return folder


def _passes(output: str) -> int:
    return int(re.search(r"^  passes: (\d+) ", output, re.MULTILINE).group(1))


def test_dry_run_plans_70b_in_passes_and_7b_in_one(tiny_models, tmp_path, capsys):
    big = _config_only(tmp_path / "llama-2-70b", tiny_models["llama"], hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8)
    small = _config_only(tmp_path / "llama-2-7b", tiny_models["llama"], hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    result = in_process(capsys, "njtc_solve.fit", "--model", str(big), "--dry-run", "--max-memory", "80GB",
                        "--model-dtype", "bfloat16", "--max-tokens", "1000000")
    assert result.returncode == 0, result.stderr
    assert _passes(result.stdout) >= 2, result.stdout
    assert "69.0 B parameters, 138.0 GB in bfloat16" in result.stdout.replace("68.98", "69.0")
    assert "750,000 training tokens" in result.stdout and "estimated time" in result.stdout
    result = in_process(capsys, "njtc_solve.fit", "--model", str(small), "--dry-run", "--max-memory", "80GB")
    assert result.returncode == 0, result.stderr
    assert _passes(result.stdout) == 1 and "32 source layers: 0-31" in result.stdout, result.stdout
    plan = FitSpec(max_memory="80GB").plan(model=str(big))  # the same from Python
    assert len(plan.passes) == _passes(str(plan)) >= 2 and sum(plan.passes, ()) == tuple(range(80))


def test_dry_run_of_a_store_reads_no_row(tiny_store, capsys, monkeypatch):
    monkeypatch.setattr(ActivationStore, "iter_chunks", lambda *a, **k: pytest.fail("a row was read"))
    result = in_process(capsys, "njtc_solve.fit", "--store", str(tiny_store), "--dry-run", "--max-memory",
                        str(THREE_PASSES))
    assert result.returncode == 0, result.stderr
    assert _passes(result.stdout) == 3 and "one read of the store each" in result.stdout
    with ActivationStore(tiny_store) as store:
        assert f"{store.count('train', 1):,} training tokens" in result.stdout


@pytest.mark.parametrize(("flags", "message"), [
    (["--one-jump", "--max-memory", str(pass_bytes(1, D, one_jump=True, **SIZES))],
     "--one-jump solves from every layer's statistics at once"),
    (["--save-stats", "s.safetensors", "--max-memory", str(THREE_PASSES)], "--save-stats keeps every layer's"),
    (["--target-layer", "all", "--save-stats", "s.safetensors", "--max-memory",
      str(pair_pass_bytes([0, 1, 2], [3], D, **SIZES))], "--save-stats keeps every pair's"),
    (["--rank", "999"], "rank 999 is out of range (1..32)"),
])
def test_dry_run_refuses_what_the_fit_refuses(tiny_store, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    args = ["--store", str(tiny_store), "--method", "njtc", "--out", "never.safetensors", *flags]
    for how in (["--dry-run"], []):  # the plan and the fit, in the same words
        _one_line_exit_2(in_process(capsys, "njtc_solve.fit", *args, *how), message)


def test_dry_run_plans_float64_accumulation(tiny_store):
    plain, wide = (FitSpec(method="njtc", ranks=[4], float64=f).plan(store=str(tiny_store)) for f in (False, True))
    assert wide.pass_bytes > plain.pass_bytes and "float64 GEMMs" in str(wide) and "float32 GEMMs" in str(plain)


def test_the_plan_of_every_target_splits_the_targets_as_the_fit_does(tiny_store):
    budget = pair_pass_bytes([0, 1, 2], [3], D, **SIZES)
    plan = FitSpec(method="njtc", ranks=[4], target_layer="all", max_memory=budget).plan(store=str(tiny_store))
    assert plan.passes == ((1, 2), (3,)) and plan.target == "all" and plan.pass_bytes <= budget
    assert "2 (2 + 1 target layers: 1,2 | 3)" in str(plan)
