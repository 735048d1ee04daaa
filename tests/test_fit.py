"""The fit stage on a real (tiny-model) store: CLI, shortcut files, saved statistics, bad input."""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import FrozenInstanceError

import h5py
import numpy as np
import pytest
import torch
from conftest import run_command, run_module
from safetensors import safe_open
from sklearn.linear_model import LinearRegression
from sklearn.utils.estimator_checks import check_estimator
from test_extract import _one_line_exit_2

from njtc_solve.solve.estimator import ReducedRankRegressor
from njtc_solve.core.errors import NJTCError
from njtc_solve.solve.fit import FitSpec, fit_shortcuts
from njtc_solve.solve.statistics_pass import accumulate_statistics
from njtc_solve.maps.shortcuts import Shortcuts
from njtc_solve.data.store import ActivationStore


def _train_rows(store_path, layer):
    """The rows a fit uses, read independently of the fit: training split, position >= 1."""
    with ActivationStore(store_path) as store:
        rows = np.flatnonzero((store.split == 0) & (store.read("position") >= 1))
        return store.file[f"hidden/{layer}"][...][rows], store.file[f"hidden/{store.n_layers}"][...][rows]


def brute_force_rrr(x, y, rank, row_weight=None, g=None):
    """Reduced-rank regression with intercept by SVD of the fitted values (numpy, float64).

    Rows weighted by ``row_weight``; errors measured as ``‖e g‖²`` when ``g`` is given (the
    target is mapped by ``f = sqrt(g gᵀ)`` and back; ``g gᵀ`` must be invertible here).
    Returns ``(coef, bias)`` of ``y ≈ x coef + bias``.
    """
    x, y = x.astype(np.float64), y.astype(np.float64)
    w = np.ones(len(x)) if row_weight is None else row_weight
    mx, my = w @ x / w.sum(), w @ y / w.sum()
    xc, yc = (x - mx) * np.sqrt(w)[:, None], (y - my) * np.sqrt(w)[:, None]
    f = np.eye(y.shape[1])
    if g is not None:
        lam, q = np.linalg.eigh(g @ g.T)
        f = (q * np.sqrt(lam)) @ q.T
    b = np.linalg.lstsq(xc, yc @ f, rcond=None)[0]
    _, _, vt = np.linalg.svd(xc @ b, full_matrices=False)
    coef = b @ vt[:rank].T @ vt[:rank] @ np.linalg.inv(f)
    return coef, my - mx @ coef


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_cli_writes_one_file_per_rank_with_the_contract_metadata(tiny_store, tmp_path):
    out = tmp_path / "n.safetensors"
    result = run_module("njtc_solve.fit", "--store", str(tiny_store), "--method", "njtc", "--rank", "4,8",
                        "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "train MSE" in result.stdout and "GFLOP/s" in result.stdout
    for rank in (4, 8):
        path = tmp_path / f"n-r{rank}.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            assert f.get_tensor("layers.1.U").shape == (32, rank)
            assert f.get_tensor("layers.1.V").shape == (rank, 32)
            assert f.get_tensor("layers.1.bias").shape == (32,)
        assert meta["format"] == "njtc-shortcuts" and meta["format_version"] == "1"
        assert meta["method"] == "njtc" and meta["rank"] == str(rank) and meta["normalize"] == "none"
        assert meta["residual"] == "false" and meta["fit_intercept"] == "true" and meta["target_layer"] == "3"
        with ActivationStore(tiny_store) as store:
            assert meta["model_sha256"] == store.model_sha256
    assert not list(tmp_path.glob("*.partial"))


def test_jtc_from_store_equals_sklearn_on_the_same_rows(tiny_store):
    [jtc] = fit_shortcuts(tiny_store, method="jtc", ranks=None, layers=[1], progress=False)
    x, y = _train_rows(tiny_store, 1)
    ref = LinearRegression().fit(x.astype(np.float64), y.astype(np.float64))
    pred = jtc.transform_hidden(x, 1).double().numpy()
    assert np.linalg.norm(pred - ref.predict(x)) / np.linalg.norm(ref.predict(x)) <= 1e-5


def test_store_streaming_with_small_chunks_equals_one_chunk(tiny_store):
    with ActivationStore(tiny_store) as store:
        a = accumulate_statistics(store, [0, 2], chunk_rows=97, progress=False, float64=True)
        b = accumulate_statistics(store, [0, 2], chunk_rows=100_000, progress=False, float64=True)
    for layer in (0, 2):
        diff = (a.layers[layer].cxy - b.layers[layer].cxy).norm() / b.layers[layer].cxy.norm()
        assert diff <= 1e-10


def test_saved_statistics_resolve_without_reading_activations(tiny_store, tmp_path):
    stats_path = tmp_path / "stats.safetensors"
    [first] = fit_shortcuts(tiny_store, method="njtc", ranks=[4], save_stats=stats_path, progress=False)
    [again] = fit_shortcuts(tiny_store, method="njtc", ranks=[4], statistics=stats_path, progress=False)
    assert torch.equal(first.maps[2].U, again.maps[2].U)
    [jtc] = fit_shortcuts(tiny_store, method="jtc", ranks=None, statistics=stats_path, progress=False)
    assert jtc.maps[2].weight.shape == (32, 32)
    with pytest.raises(Exception, match="layer-normalised"):
        fit_shortcuts(tiny_store, method="nnjtc", ranks=[4], statistics=stats_path, progress=False)


def test_every_variant_fits_and_roundtrips(tiny_store, tmp_path):
    variants = [dict(method="nnjtc", ranks=[4]), dict(method="nnjtc", ranks=[4], normalize="rms"),
                dict(method="nnjtc", ranks=[4], normalize="batch"), dict(method="njtc", ranks=[4], residual=True),
                dict(method="njtc", ranks=[4], weight="logits"), dict(method="jtc", ranks=None, alpha="auto"),
                dict(method="njtc", ranks=[4], fit_intercept=False)]
    x, _ = _train_rows(tiny_store, 2)
    for kw in variants:
        [sc] = fit_shortcuts(tiny_store, layers=[2], progress=False, **kw)
        path = tmp_path / f"{sc.name}.safetensors"
        sc.save(path)
        back = Shortcuts.load(path)
        assert back.name == sc.name and back.residual == sc.residual and back.normalize == sc.normalize
        assert torch.allclose(back.transform_hidden(x[:50], 2), sc.transform_hidden(x[:50], 2))
        r2 = sc.stats["layers"][2]["r2"]
        assert 0 < r2 <= 1, (kw, r2)


def test_rms_nnjtc_equals_brute_force_on_normalised_rows(tiny_store):
    [sc] = fit_shortcuts(tiny_store, method="nnjtc", ranks=[4], layers=[2], normalize="rms", progress=False)
    x, y = _train_rows(tiny_store, 2)
    x64 = x.astype(np.float64)
    z = x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-5)
    coef, bias = brute_force_rrr(z, y, 4)
    pred = sc.transform_hidden(x, 2).double().numpy()
    assert _rel(pred, z @ coef + bias) <= 1e-5
    assert _rel((sc.maps[2].U @ sc.maps[2].V).double().numpy(), coef) <= 1e-5


def test_residual_map_equals_brute_force_on_the_difference(tiny_store):
    [sc] = fit_shortcuts(tiny_store, method="njtc", ranks=[4], layers=[1], residual=True, progress=False)
    x, y = _train_rows(tiny_store, 1)
    coef, bias = brute_force_rrr(x, y - x, 4)
    assert _rel((sc.maps[1].U @ sc.maps[1].V).double().numpy(), coef) <= 1e-5
    assert _rel(sc.transform_hidden(x, 1).double().numpy(), x + x @ coef + bias) <= 1e-5


def test_logit_weighted_map_equals_brute_force_with_row_and_error_weights(tiny_store):
    """--weight logits on an RMS-norm head: rows weighted by 1/σ², errors by diag(g)·W_Uᵀ."""
    [sc] = fit_shortcuts(tiny_store, method="njtc", ranks=[3], layers=[1], weight="logits", progress=False)
    x, y = _train_rows(tiny_store, 1)
    y64 = y.astype(np.float64)
    w = 1.0 / ((y64 ** 2).mean(1) + 1e-6)
    with ActivationStore(tiny_store) as store:
        head = store.head()
    w_u = head.unembed.double().numpy()
    g = head.norm_weight.double().numpy()[:, None] * (w_u - w_u.mean(0)).T
    coef, bias = brute_force_rrr(x, y, 3, row_weight=w, g=g)
    assert _rel((sc.maps[1].U @ sc.maps[1].V).double().numpy(), coef) <= 1e-5
    assert _rel(sc.maps[1].bias.double().numpy(), bias) <= 1e-5


def test_logit_weighting_lowers_the_logit_space_error(tiny_store):
    [plain] = fit_shortcuts(tiny_store, method="njtc", ranks=[2], layers=[1], progress=False)
    [weighted] = fit_shortcuts(tiny_store, method="njtc", ranks=[2], layers=[1], weight="logits", progress=False)
    x, y = _train_rows(tiny_store, 1)
    with ActivationStore(tiny_store) as store:
        g = store.head().logit_weight_factor().float()
    err = lambda sc: float((((sc.transform_hidden(x, 1) - torch.from_numpy(y)) @ g) ** 2).sum())
    assert err(weighted) < err(plain)


def test_estimator_passes_check_estimator():
    for est in (ReducedRankRegressor(), ReducedRankRegressor(rank=1), ReducedRankRegressor(alpha=0.5,
                                                                                          fit_intercept=False)):
        check_estimator(est)


def test_estimator_partial_fit_equals_fit():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8)) + 100
    Y = X @ rng.normal(size=(8, 6)) + rng.normal(size=(300, 6))
    whole = ReducedRankRegressor(rank=2).fit(X, Y)
    parts = ReducedRankRegressor(rank=2)
    for i in range(0, 300, 64):
        parts.partial_fit(X[i:i + 64], Y[i:i + 64])
    assert np.allclose(parts.coef_, whole.coef_, rtol=1e-10, atol=1e-12)
    assert np.allclose(parts.left_factor_ @ parts.right_factor_, parts.coef_.T)
    assert np.linalg.matrix_rank(whole.coef_) == 2


def test_a_refused_partial_fit_leaves_the_estimator_as_it_was():
    """A bad ``rank`` or ``alpha`` is refused before the batch is added: the statistics keep
    only the rows of the accepted batches, and a fresh estimator gains no fitted attribute."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 6))
    Y = X @ rng.normal(size=(6, 4)) + rng.normal(size=(200, 4))
    fresh = ReducedRankRegressor(rank=0)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        fresh.partial_fit(X, Y)
    assert vars(fresh) == {"rank": 0, "alpha": 0.0, "fit_intercept": True}
    est = ReducedRankRegressor(rank=2).partial_fit(X[:100], Y[:100])
    for bad, message in (({"rank": 0}, "rank must be"), ({"rank": 2.5}, "rank must be"),
                         ({"alpha": -1.0}, "alpha must be"), ({"alpha": float("nan")}, "alpha must be")):
        est.set_params(**bad)
        with pytest.raises(ValueError, match=message):
            est.partial_fit(X[100:], Y[100:])
        est.set_params(rank=2, alpha=0.0)
    est.partial_fit(X[100:], Y[100:])  # the refused batches left no trace in the statistics
    assert np.allclose(est.coef_, ReducedRankRegressor(rank=2).fit(X, Y).coef_, rtol=1e-10, atol=1e-12)


def test_one_fit_command_checks_each_setting_once(tiny_store, tmp_path, monkeypatch):
    """One run of the fit command parses ``--rank`` once and checks the method, the device and
    each target's statistics once: one validated settings object travels down unchanged."""
    import njtc_solve.cli.fit as command
    import njtc_solve.core.models as models
    import njtc_solve.solve.fit as library
    from njtc_solve.solve.stats import Statistics

    calls = Counter()

    def counted(name, fn, key=None):
        def wrapper(*args, **kwargs):
            calls[name if key is None else key(*args)] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(library.FitSpec, "__post_init__", counted("FitSpec", library.FitSpec.__post_init__))
    monkeypatch.setattr(library, "check_method", counted("check_method", library.check_method))
    device = counted("check_device", models.check_device)
    monkeypatch.setattr(models, "check_device", device)  # FitSpec's declared `device` calls it
    monkeypatch.setattr(command, "parse_ranks", counted("parse_ranks", command.parse_ranks))
    monkeypatch.setattr(Statistics, "check_finite", counted(
        "check_finite", Statistics.check_finite, lambda stats: ("check_finite", stats.meta.get("target_layer"))))
    stats = tmp_path / "s.safetensors"
    runs = {"store": ["--store", str(tiny_store), "--save-stats", str(stats)],
            "stats": ["--stats", str(stats)],
            "all targets": ["--store", str(tiny_store), "--target-layer", "all"]}
    for run, source in runs.items():
        calls.clear()
        out = tmp_path / f"{run.replace(' ', '-')}.safetensors"
        assert command.main([*source, "--method", "njtc", "--rank", "2,4", "--out", str(out), "--no-progress"]) == 0
        finite = {key: n for key, n in calls.items() if key[0] == "check_finite"}
        assert len(finite) == (3 if run == "all targets" else 1) and set(finite.values()) == {1}, (run, calls)
        assert {k: calls[k] for k in ("FitSpec", "check_method", "check_device", "parse_ranks")} == \
            {"FitSpec": 1, "check_method": 1, "check_device": 1, "parse_ranks": 1}, (run, calls)


@pytest.mark.parametrize("settings, message", [
    ({"method": "bogus"}, "unknown method 'bogus'"),
    ({"method": "jtc", "ranks": [4]}, "jtc fits full-rank maps; drop `ranks`"),
    ({"method": "njtc", "ranks": [2.5]}, "`ranks`: rank 2.5 is not a whole number"),
    ({"method": "njtc", "ranks": [0]}, r"`ranks`: rank 0 is out of range"),
    ({"alpha": -1.0}, "^`alpha` must be a non-negative number$"),
    ({"alpha": float("inf")}, "^`alpha` must be a non-negative number$"),
    ({"alpha": "often"}, "`alpha` must be a number or auto"),
    ({"weight": "tokens"}, "`weight` must be none or logits"),
    ({"residual": True}, "`residual=True` works with `normalize` none or batch"),
    ({"skip_positions": -1}, "`skip_positions` must be 0 or more"),
    ({"chunk_rows": 0}, "`chunk_rows` must be positive"),
    ({"device": "gpu"}, "`device` 'gpu' is not a device"),
    ({"target_layer": "last"}, "`target_layer` must be a layer number or all"),
    ({"layers": "12"}, "`layers` must be a list of layer indices"),
    ({"layers": [1.7]}, "`layers` must be a list of layer indices"),
    ({"layers": ["a"]}, "`layers` must be a list of layer indices"),
    ({"layers": 5}, "`layers` must be a list of layer indices"),
    ({"layers": [-1]}, "`layers` must be a list of layer indices"),
])
def test_a_bad_setting_is_refused_before_the_store_is_opened(settings, message):
    """``fit_shortcuts`` checks its settings (one :class:`FitSpec`) before it opens the store: the
    store here does not exist, and the error is about the setting."""
    with pytest.raises(NJTCError, match=message):
        fit_shortcuts("nowhere.h5", progress=False, **settings)


def test_a_fit_spec_is_frozen_completed_and_knows_its_fit():
    spec = FitSpec(method="njtc", ranks=[8, 16], layers=[1, 2], alpha=1)
    assert (spec.ranks, spec.normalize, spec.layers, spec.alpha) == ((8, 16), "none", (1, 2), 1.0)
    with pytest.raises(FrozenInstanceError):
        spec.ranks = (4,)
    with pytest.raises(NJTCError, match="`weight` logits needs the last layer as the target"):
        FitSpec(weight="logits", target_layer="all")
    with pytest.raises(NJTCError, match="use fit_all_targets"):
        fit_shortcuts("nowhere.h5", target_layer="all")
    with pytest.raises(NJTCError, match="`ranks`: rank 64 is out of range \\(1..32\\)"):
        FitSpec(method="njtc", ranks=[64]).check_width(32)


def test_cli_bad_inputs(tiny_store, tmp_path):
    """In this process (conftest.run_command), but for the missing store: a process of its own."""
    fit = lambda *a: run_command("fit", "--store", str(tiny_store), "--no-progress", *a)
    out = ["--out", str(tmp_path / "o.safetensors")]
    _one_line_exit_2(fit("--method", "njtc", "--rank", "0", *out), "rank 0")
    _one_line_exit_2(fit("--method", "njtc", "--rank", "33", *out), "rank 33")
    _one_line_exit_2(fit("--layers", "7", *out), "layer 7")
    _one_line_exit_2(fit("--method", "svd", *out), "unknown method")
    _one_line_exit_2(fit("--alpha", "-1", *out), "--alpha")
    _one_line_exit_2(fit("--residual", *out), "--residual")
    blocker = tmp_path / "file"
    blocker.write_text("")
    _one_line_exit_2(fit("--out", str(blocker / "o.safetensors")), "does not exist")
    _one_line_exit_2(run_module("njtc_solve.fit", "--store", str(tmp_path / "none.h5"), *out), "not found")

    incomplete = tmp_path / "incomplete.h5"
    shutil.copy(tiny_store, incomplete)
    with h5py.File(incomplete, "r+") as f:
        f.attrs["complete"] = False
    _one_line_exit_2(run_command("fit", "--store", str(incomplete), *out), "incomplete")

    no_train = tmp_path / "no_train.h5"
    shutil.copy(tiny_store, no_train)
    with h5py.File(no_train, "r+") as f:
        f["split"][...] = 1
    _one_line_exit_2(run_command("fit", "--store", str(no_train), *out), "no training rows")

    nan = tmp_path / "nan.h5"
    shutil.copy(tiny_store, nan)
    with h5py.File(nan, "r+") as f:
        f["hidden/1"][5, 3] = np.nan
    _one_line_exit_2(run_command("fit", "--store", str(nan), *out), "NaN")
    assert not list(tmp_path.glob("*.safetensors*"))


def test_logit_weighting_uses_inverse_norm_scale_row_weights(tiny_store, tmp_path):
    """--weight logits: rows weighted by 1/σ² of their target, errors weighted by the head."""
    [weighted] = fit_shortcuts(tiny_store, method="jtc", ranks=None, layers=[1], weight="logits",
                               save_stats=tmp_path / "w.safetensors", progress=False)
    x, y = _train_rows(tiny_store, 1)
    w = 1.0 / ((y.astype(np.float64) ** 2).mean(1) + 1e-6)  # the tiny Llama's RMS norm (eps 1e-6)
    ref = LinearRegression().fit(x.astype(np.float64), y.astype(np.float64), sample_weight=w)
    pred = weighted.transform_hidden(x, 1).double().numpy()  # a full-rank map: the weighting by G drops out
    assert np.linalg.norm(pred - ref.predict(x)) / np.linalg.norm(ref.predict(x)) <= 1e-5
    with pytest.raises(Exception, match="row weights"):
        fit_shortcuts(tiny_store, method="njtc", ranks=[2], statistics=tmp_path / "w.safetensors", progress=False)
