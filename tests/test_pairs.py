"""Maps between any two layers (issue 22): intermediate targets, every pair from one pass, skip surgery."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_module
from test_extract import _one_line_exit_2
from test_fit import brute_force_rrr

from njtc_solve.data.corpus import load_corpus
from njtc_solve.core.errors import NJTCError
from njtc_solve.solve.fit import fit_all_targets, fit_shortcuts
from njtc_solve.core.models import load_model
from njtc_solve.evaluation.layer_pairs import evaluate_pairs
from njtc_solve.maps.shortcuts import Shortcuts
from njtc_solve.evaluation.block_skip import SkipRunner, skip_scores
from njtc_solve.data.live import LiveSource
from njtc_solve.data.store import ActivationStore


def _pair_rows(store_path, source, target, split=0):
    """Rows of a pair, read independently of the fit: ``split``, positions >= 1."""
    with ActivationStore(store_path) as store:
        rows = np.flatnonzero((store.split == split) & (store.read("position") >= 1))
        return (store.file[f"hidden/{source}"][...][rows].astype(np.float64),
                store.file[f"hidden/{target}"][...][rows].astype(np.float64))


def _lstsq(x, y):
    """Least squares with an intercept, float64 (numpy): ``(coef, bias)``."""
    a = np.hstack([x, np.ones((len(x), 1))])
    sol = np.linalg.lstsq(a, y, rcond=None)[0]
    return sol[:-1], sol[-1]


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def tiny_live(tiny_models):
    """The tiny Llama as a live source over the plan of ``tiny_store`` (same rows)."""
    model, tokenizer, name = load_model(str(tiny_models["llama"]))
    return LiveSource(model, tokenizer, load_corpus()[1], model_name=name, seq_len=32, max_tokens=6000,
                      batch_size=8)


@pytest.mark.parametrize("where", ["store", "live"])
def test_intermediate_target_equals_float64_least_squares(tiny_store, tiny_live, where, tmp_path):
    """JTC factors (the map and bias) and NJTC factors (U·V and the row space Vᵀ V) of a pair
    l -> 2, against numpy float64 least squares / reduced-rank regression of the pair's rows."""
    source = str(tiny_store) if where == "store" else tiny_live
    stats = tmp_path / "stats.safetensors"  # one pass (a live one runs the model) serves both methods
    [jtc] = fit_shortcuts(source, method="jtc", ranks=None, progress=False, target_layer=2, save_stats=stats)
    [njtc] = fit_shortcuts(None, method="njtc", ranks=[4], statistics=stats, target_layer=2)
    assert jtc.target_layer == njtc.target_layer == 2 and sorted(jtc.maps) == [0, 1]
    for layer in (0, 1):
        x, y = _pair_rows(tiny_store, layer, 2)
        coef, bias = _lstsq(x, y)
        assert _rel(jtc.maps[layer].weight, coef) < 1e-4, layer  # float32 statistics: observed ~1e-6
        assert _rel(jtc.maps[layer].bias, bias) < 1e-4, layer
        coef_r, bias_r = brute_force_rrr(x, y, 4)
        m = njtc.maps[layer]
        assert _rel(m.U @ m.V, coef_r) < 1e-4, layer
        _, _, vt = np.linalg.svd((x - x.mean(0)) @ _lstsq(x, y)[0], full_matrices=False)
        v = m.V.double().numpy()
        assert _rel(v.T @ v, vt[:4].T @ vt[:4]) < 1e-4, layer  # the same rank-4 row space
        assert _rel(m.bias, bias_r) < 1e-4, layer


@pytest.mark.parametrize(("method", "ranks", "normalize", "residual"),
                         [("jtc", None, None, False), ("njtc", [2, 4], None, True), ("nnjtc", [4], "layer", False)])
def test_all_targets_equal_each_target_fitted_alone(tiny_store, method, ranks, normalize, residual):
    """One pass for every pair gives each target's single-target fit (float64 GEMMs: to rounding)."""
    both = dict(method=method, ranks=ranks, normalize=normalize, residual=residual, progress=False, float64=True)
    every = dict(fit_all_targets(str(tiny_store), **both))
    assert sorted(every) == [1, 2, 3]
    for target, fits in every.items():
        alone = fit_shortcuts(str(tiny_store), **both, target_layer=target)
        assert [sc.name for sc in fits] == [sc.name for sc in alone]
        for sc, ref in zip(fits, alone):
            assert sc.target_layer == target and sorted(sc.maps) == sorted(ref.maps) == list(range(target))
            for layer, m in ref.maps.items():
                mine = sc.maps[layer]
                full = (lambda s: s.weight) if method == "jtc" else (lambda s: s.U @ s.V)
                assert _rel(full(mine), full(m)) < 1e-9, (target, layer)
                assert _rel(mine.bias, m.bias) < 1e-9, (target, layer)


@pytest.mark.parametrize("alpha", [0.0, "auto"])
def test_all_targets_decompose_each_source_once(tiny_store, monkeypatch, alpha):
    """Each source layer's input Gram matrix is decomposed once for every target above it, not
    once per target, and the maps are the same to the bit as each target solved on its own."""
    from njtc_solve.solve.fit import fit_from_statistics
    from njtc_solve.solve.pair_statistics import accumulate_pairs

    with ActivationStore(tiny_store) as store:
        pairs = accumulate_pairs(store, sources=[0, 1, 2], targets=[1, 2, 3], progress=False)
    alone = {t: fit_from_statistics(pairs.for_target(t), method="jtc", ranks=None, alpha=alpha)[0] for t in (1, 2, 3)}
    calls, eigh = [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(a.shape) or eigh(a))
    every = dict(fit_all_targets(str(tiny_store), method="jtc", alpha=alpha, progress=False))
    # one eigh of C_xx per source (3), one of KᵀK per pair (6); alpha="auto" reuses C_xx's too
    assert len(calls) == 3 + 6
    for target in (1, 2, 3):
        for layer in range(target):
            mine, ref = every[target][0].maps[layer], alone[target].maps[layer]
            assert torch.equal(mine.weight, ref.weight) and torch.equal(mine.bias, ref.bias), (target, layer)


def test_all_targets_float32_and_saved_pair_statistics(tiny_store, tmp_path):
    """Default float32 pass: within float32 rounding of the single-target fit; its saved statistics
    give any target's fit with no rows read, and say which targets they hold."""
    stats = tmp_path / "pairs.safetensors"
    every = dict(fit_all_targets(str(tiny_store), method="jtc", progress=False, save_stats=stats))
    for target in (1, 2, 3):
        [alone] = fit_shortcuts(str(tiny_store), method="jtc", progress=False, target_layer=target)
        [saved] = fit_shortcuts(None, method="jtc", statistics=stats, target_layer=target)
        for layer in range(target):
            assert _rel(every[target][0].maps[layer].weight, alone.maps[layer].weight) < 1e-4
            assert _rel(saved.maps[layer].weight, every[target][0].maps[layer].weight) < 1e-12
    [default] = fit_shortcuts(None, method="jtc", statistics=stats)  # default: the last layer, as without pairs
    assert default.target_layer == 3
    assert sorted(dict(fit_all_targets(None, method="jtc", statistics=stats, progress=False))) == [1, 2, 3]
    with pytest.raises(NJTCError, match="holds statistics for target layers 1,2,3, not 5"):
        fit_shortcuts(None, method="jtc", statistics=stats, target_layer=5)


def _in_process(capsys, main, *args):
    """A command run in this process (no interpreter start-up): exit status and stderr."""
    from types import SimpleNamespace

    from njtc_solve.cli import run_cli

    capsys.readouterr()
    code = run_cli(main, [*args, "--no-progress"])
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def test_bad_targets_one_line_before_the_pass(tiny_store, tmp_path, capsys):
    from njtc_solve.cli.fit import main

    _fit = lambda *args: _in_process(capsys, main, *args)
    store, out = str(tiny_store), str(tmp_path / "x.safetensors")
    _one_line_exit_2(_fit("--store", store, "--method", "jtc", "--layers", "1,2", "--target-layer", "2", "--out", out),
                     "source layer 2 is not below the target layer 2")
    _one_line_exit_2(_fit("--store", store, "--method", "jtc", "--target-layer", "4", "--out", out),
                     "target layer 4 is beyond the last layer 3")
    _one_line_exit_2(_fit("--store", store, "--method", "jtc", "--target-layer", "x", "--out", out),
                     "cannot parse --target-layer 'x'")
    _one_line_exit_2(_fit("--store", store, "--method", "njtc", "--target-layer", "2", "--weight", "logits",
                          "--out", out), "weight logits needs the last layer (3) as the target")
    # refused before the model would load: the model path does not exist (one real command line)
    _one_line_exit_2(run_module("njtc_solve.fit", "--no-progress", "--model", str(tmp_path / "no-model"), "--target-layer", "all", "--weight", "logits",
                          "--method", "njtc", "--out", out), "--weight logits needs the last layer as the target")
    _one_line_exit_2(_fit("--model", str(tmp_path / "no-model"), "--target-layer", "all", "--method", "jtc",
                          "--rank", "4", "--out", out), "jtc fits full-rank maps")
    single = tmp_path / "single.safetensors"
    fit_shortcuts(store, method="jtc", progress=False, save_stats=single)
    _one_line_exit_2(_fit("--stats", str(single), "--target-layer", "all", "--method", "jtc", "--out", out),
                     "holds target layer 3 only; target layer all needs statistics saved by a fit of every target")
    _one_line_exit_2(_fit("--stats", str(single), "--target-layer", "2", "--method", "jtc", "--out", out),
                     "holds statistics for target layer 3, not 2")
    assert not list(tmp_path.glob("x*"))


def test_cli_all_writes_one_file_per_target(tiny_store, tmp_path, capsys):
    from njtc_solve.cli.fit import main

    out = tmp_path / "n.safetensors"
    result = _in_process(capsys, main, "--store", str(tiny_store), "--method", "njtc", "--rank", "2,4",
                         "--target-layer", "all", "--out", str(out))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.glob("n-t*.safetensors"))
    assert names == [f"n-t{t}-r{r}.safetensors" for t in (1, 2, 3) for r in (2, 4)]
    sc = Shortcuts.load(tmp_path / "n-t2-r4.safetensors")
    assert sc.target_layer == 2 and sorted(sc.maps) == [0, 1] and sc.stats["n_layers"] == 3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_skip_with_the_true_blocks_reproduces_the_model(tiny_models, kind):
    model, _, _ = load_model(str(tiny_models[kind]))
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    runner = SkipRunner(model)
    runner.record(ids)
    with torch.no_grad():
        reference = model(input_ids=ids).logits  # a plain forward pass, no hooks
    for start, end in [(0, 1), (1, 3)]:
        exact = runner.logits(start, end, lambda h, s=start, e=end: runner.run_blocks(h, s, e))
        assert (exact - reference).abs().max() < 1e-5 * reference.abs().max(), (start, end)  # observed: 0
        dropped = runner.logits(start, end, lambda h: h)  # a wrong replacement: the blocks removed
        assert (dropped - reference).abs().max() > 1e-2, (start, end)
    assert skip_scores(runner, 1, 3, lambda h: runner.run_blocks(h, 1, 3))["kl"] < 1e-6
    assert skip_scores(runner, 1, 3, lambda h: h)["kl"] > 1e-4
    kept = runner.last_layer(1, 3, lambda h: torch.zeros_like(h), keep_positions=1)
    assert torch.equal(kept[:, 0], runner.hidden[-1][:, 0])  # position 0 keeps the model's own state
    with pytest.raises(NJTCError, match="cannot replace blocks"):
        runner.logits(2, 2, lambda h: h)


def test_pairwise_evaluation_store_and_live(tiny_store, tiny_live, tmp_path):
    """R² and relative error against an independent numpy computation; live adds skip scores and
    gives the same errors on the same rows."""
    [jtc] = fit_shortcuts(str(tiny_store), method="jtc", progress=False, target_layer=2)
    result = evaluate_pairs(str(tiny_store), [jtc], max_rows=600, progress=False)
    x, y = _pair_rows(tiny_store, 1, 2, split=1)
    x, y = x[:600], y[:600]
    y_hat = jtc.maps[1].predict(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    r = result.record("jtc", 1, 2)
    assert r["r2"] == pytest.approx(1 - ((y_hat - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), rel=1e-6)
    assert r["rel_err"] == pytest.approx(np.sqrt(((y_hat - y) ** 2).sum() / (y ** 2).sum()), rel=1e-6)
    assert r["identity_r2"] == pytest.approx(1 - ((x - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), rel=1e-6)
    assert "skip_kl" not in r
    live = evaluate_pairs(tiny_live, [jtc], max_rows=600, skip_rows=64, progress=False)
    lr = live.record("jtc", 1, 2)
    assert lr["r2"] == pytest.approx(r["r2"], rel=1e-5)
    assert lr["skip_rows"] >= 64 and 0 <= lr["skip_top1"] <= 1
    # the skip KL recomputed independently: the model's own forward pass (model(...).logits) with
    # block 2's input replaced by the map of block 1's input, against the plain forward pass
    keep = int(jtc.provenance.get("skip_positions", 0) or 0)
    kl, agree, n = _independent_skip(tiny_live, jtc.maps[1].predict, 1, 2, 64, keep)
    assert n == lr["skip_rows"]
    assert lr["skip_kl"] == pytest.approx(kl, rel=1e-4)  # observed: 1.1e-5 relative (3.7e-4 nats)
    assert lr["skip_top1"] == pytest.approx(agree, abs=0.5 / n)  # the same argmax on every row


def test_skip_scores_are_bounded_by_default(tiny_store, tiny_live, monkeypatch):
    """Without ``max_rows`` or ``skip_rows`` the skip scores run over at most SKIP_ROWS held-out
    tokens (whole sequences), not the whole validation split."""
    from njtc_solve.evaluation import layer_pairs as pairwise

    monkeypatch.setattr(pairwise, "SKIP_ROWS", 40)
    [jtc] = fit_shortcuts(str(tiny_store), method="jtc", layers=[1], progress=False, target_layer=2)
    r = evaluate_pairs(tiny_live, [jtc], progress=False).record("jtc", 1, 2)
    per_sequence = tiny_live.plan.seq_len - 1  # positions >= 1 of each sequence
    assert r["skip_rows"] == 2 * per_sequence < r["n_rows"]  # 40 tokens: two sequences of 31


def _independent_skip(live, predict, source, target, max_tokens, keep):
    """Mean KL(full ‖ skipped) and top-1 agreement of replacing blocks ``[source, target)`` by
    ``predict``, from ``model(...).logits`` with two hooks (not :mod:`njtc_solve.evaluation.block_skip`): float64
    softmax, the validation sequences and positions that :func:`evaluate_pairs` scores; positions
    below ``keep`` keep the model's own state, as in the skip surgery."""
    from njtc_solve.data.rows import VALIDATION

    model, plan, skip = live.model, live.plan, live.default_skip_positions
    sequences = np.flatnonzero(plan.split == VALIDATION)
    sequences = sequences[:-(-max_tokens // max(plan.seq_len - skip, 1))]
    ids = torch.as_tensor(plan.token_ids[sequences])
    blocks = model.model.layers
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    def swap(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        new = predict(seen["h"].reshape(-1, h.shape[-1]).float()).reshape(h.shape).to(h.dtype)
        new[:, :keep] = h[:, :keep]  # the positions the map was not fitted on keep the model's state
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    with torch.no_grad():
        full = model(input_ids=ids).logits[:, skip:].double()
        handles = [blocks[source].register_forward_pre_hook(grab, with_kwargs=True),
                   blocks[target].register_forward_pre_hook(swap, with_kwargs=True)]
        try:
            skipped = model(input_ids=ids).logits[:, skip:].double()
        finally:
            for handle in handles:
                handle.remove()
    logp, logq = torch.log_softmax(full, -1), torch.log_softmax(skipped, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    agree = (full.argmax(-1) == skipped.argmax(-1)).double()
    return float(kl.mean()), float(agree.mean()), kl.numel()


def test_consumers_refuse_an_intermediate_target(tiny_store, tmp_path, capsys):
    from njtc_solve.maps.tuned_lens import export_tuned_lens
    from njtc_solve.evaluation.lens import ShortcutLens

    [jtc] = fit_shortcuts(str(tiny_store), method="jtc", progress=False, target_layer=2)
    path = tmp_path / "t2.safetensors"
    jtc.save(path)
    with pytest.raises(NJTCError, match=r"target layer 2, not the last layer of their model \(3\)"):
        export_tuned_lens(path, tmp_path / "lens")
    with ActivationStore(tiny_store) as store:
        with pytest.raises(NJTCError, match=r"target layer 2, not the last layer of their model \(3\)"):
            ShortcutLens(store.head(), Shortcuts.load(path))
    from njtc_solve.cli.refine import main

    _one_line_exit_2(_in_process(capsys, main, "--shortcuts", str(path), "--store", str(tiny_store),
                                 "--out", str(tmp_path / "r.safetensors")),
                     "target layer 2, not the last layer of")


def test_fit_warns_of_attention_sink_like_training_rows(tiny_store, tmp_path, capsys):
    """Two training rows whose target state is ~1000x the rest: the fit records the row norms and
    warns in one line, with one target and with all; the unmodified store gives no warning."""
    import shutil

    import h5py

    from njtc_solve.cli.fit import main

    spiked = tmp_path / "spiked.h5"
    shutil.copy(tiny_store, spiked)
    with h5py.File(spiked, "r+") as f:
        rows = np.flatnonzero((f["split"][...] == 0) & (f["position"][...] >= 1))[[3, 40]]
        for layer in ("2", "3"):
            h = f[f"hidden/{layer}"]
            for r in rows:
                h[r] = h[r] * 1000
    for store, warned in ((tiny_store, False), (spiked, True)):
        for target, out in (("3", "one.safetensors"), ("all", "all.safetensors")):
            result = _in_process(capsys, main, "--store", str(store), "--method", "jtc", "--target-layer", target,
                                 "--out", str(tmp_path / out))
            assert result.returncode == 0, result.stderr
            lines = [l for l in result.stderr.splitlines() if l.startswith("warning:")]
            if warned:  # targets 2 and 3 carry the spike (target 1 does not)
                assert len(lines) == (1 if target == "3" else 2), result.stderr
                assert all(l.startswith("warning: 2 training rows have a hidden state at target layer") for l in lines)
                assert "attention-sink-like" in lines[0] and "consider --skip-positions" in lines[0]  # a flag here
            else:
                assert not lines, result.stderr
        sc = Shortcuts.load(tmp_path / "one.safetensors")
        norms = sc.stats["target_row_norms"]
        with h5py.File(store) as f:
            train = (f["split"][...] == 0) & (f["position"][...] >= 1)
            true = np.linalg.norm(f["hidden/3"][...][train].astype(np.float64), axis=1)
        # 1% bins: within 2% of the exact figures
        assert norms["median"] == pytest.approx(np.median(true), rel=0.02)
        assert norms["max"] == pytest.approx(true.max(), rel=0.02)
        assert norms["rows_above"] == (2 if warned else 0)
