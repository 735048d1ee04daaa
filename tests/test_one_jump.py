"""One jump for every exit (njtc_solve.solve.one_jump): the shared map against independent references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_distributed import torchrun

from njtc_solve.cli import fit as fit_command
from njtc_solve.core.errors import NJTCError
from njtc_solve.data.store import ActivationStore
from njtc_solve.maps.shortcuts import Shortcuts
from njtc_solve.solve.fit import FitSpec, fit_shortcuts

LAYERS = (0, 1, 2)


def _rows(store_path, split):
    """Every layer's rows of ``split`` at positions >= 1, and the target's, read with h5py alone."""
    with ActivationStore(store_path) as store:
        keep = np.flatnonzero((store.split == split) & (store.read("position") >= 1))
        xs = {l: store.file[f"hidden/{l}"][...][keep].astype(np.float64) for l in LAYERS}
        return xs, store.file[f"hidden/{store.n_layers}"][...][keep].astype(np.float64)


def _reference(xs, y, rank, *, batch, intercept, residual=False):
    """The pooled reduced-rank regression over the stacked rows of every layer (numpy float64).

    Returns ``(standardise, coef, bias)``: ``standardise(x, l)`` is layer l's input (its own
    training mean and population standard deviation with ``batch``), and the prediction is
    ``standardise(x, l) @ coef + bias`` (plus ``x`` when ``residual``).
    """
    mean = {l: x.mean(0) for l, x in xs.items()}
    std = {l: x.std(0) for l, x in xs.items()}

    def standardise(x, l):
        return (x - mean[l]) / std[l] if batch else x

    x = np.concatenate([standardise(xs[l], l) for l in LAYERS])
    t = np.concatenate([y - xs[l] if residual else y for l in LAYERS])
    mx, mt = (x.mean(0), t.mean(0)) if intercept else (0.0, 0.0)
    b = np.linalg.lstsq(x - mx, t - mt, rcond=None)[0]
    _, _, vt = np.linalg.svd((x - mx) @ b, full_matrices=False)
    coef = b @ vt[:rank].T @ vt[:rank]
    return standardise, coef, (mt - mx @ coef) if intercept else 0.0


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("intercept", [True, False])
def test_pooled_map_equals_stacked_rows_reference_on_held_out_rows(tiny_store, batch, intercept):
    method = {"method": "nnjtc", "normalize": "batch"} if batch else {"method": "njtc"}
    [one] = fit_shortcuts(tiny_store, ranks=[4], one_jump=True, fit_intercept=intercept, progress=False, **method)
    train_x, train_y = _rows(tiny_store, 0)
    standardise, coef, bias = _reference(train_x, train_y, 4, batch=batch, intercept=intercept)
    test_x, _ = _rows(tiny_store, 1)
    for l in LAYERS:
        expected = standardise(test_x[l], l) @ coef + bias
        got = one.transform_hidden(torch.as_tensor(test_x[l], dtype=torch.float32), l).double().numpy()
        assert _rel(got, expected) < 1e-5, (l, _rel(got, expected))
    # one map, held once: the layers share its tensors, the file holds it once
    assert one.maps[0].U is one.maps[2].U and (one.maps[0].bias is one.maps[2].bias)
    assert one.total_params == 2 * 32 * 4 + (32 if intercept else 0) + (3 * 2 * 32 if batch else 0)


def test_residual_pooled_map_equals_reference(tiny_store):
    [one] = fit_shortcuts(tiny_store, method="nnjtc", normalize="batch", residual=True, ranks=[4], one_jump=True,
                          progress=False)
    train_x, train_y = _rows(tiny_store, 0)
    standardise, coef, bias = _reference(train_x, train_y, 4, batch=True, intercept=True, residual=True)
    test_x, _ = _rows(tiny_store, 1)
    for l in LAYERS:
        expected = test_x[l] + standardise(test_x[l], l) @ coef + bias
        got = one.transform_hidden(torch.as_tensor(test_x[l], dtype=torch.float32), l).double().numpy()
        assert _rel(got, expected) < 1e-5


@pytest.mark.parametrize("settings", [{"method": "nnjtc", "normalize": "batch"}, {"method": "njtc"},
                                      {"method": "njtc", "residual": True}, {"method": "njtc", "layers": [1, 2]}])
def test_select_table_equals_each_maps_loss_on_the_rows(tiny_store, settings):
    [chosen] = fit_shortcuts(tiny_store, ranks=[4], one_jump="select", float64=True, progress=False, **settings)
    [per_layer] = fit_shortcuts(tiny_store, ranks=[4], float64=True, progress=False, **settings)
    train_x, train_y = _rows(tiny_store, 0)
    info = chosen.stats["one_jump"]
    layers = settings.get("layers", list(LAYERS))  # with layers 1, 2 a row's index is not its layer
    assert info["layers"] == layers
    table = np.array(info["table_mse"])
    n, d = train_y.shape
    for i, k in enumerate(layers):  # map k through layer l's own standardisation, on layer l's rows
        m = per_layer.maps[k]
        coef = (m.U @ m.V).double().numpy()
        for j, l in enumerate(layers):
            own = chosen.maps[l]
            x = train_x[l] if own.norm_mean is None else \
                (train_x[l] - own.norm_mean.double().numpy()) * own.norm_scale.double().numpy()
            pred = x @ coef + m.bias.double().numpy() + (train_x[l] if m.residual else 0)
            direct = ((train_y - pred) ** 2).sum() / (n * d)
            assert abs(table[i, j] - direct) / direct < 1e-6, (k, l, table[i, j], direct)
    best = layers[int(np.argmin(table.sum(1)))]
    assert info["from_layer"] == best and torch.equal(chosen.maps[layers[0]].U, per_layer.maps[best].U)
    assert info["pooled_sse"] >= info["pooled_fit_sse"]  # the pooled solve is the optimum of the class


def test_gradient_descent_on_the_pooled_loss_never_beats_the_closed_form(tiny_store):
    [one] = fit_shortcuts(tiny_store, method="nnjtc", normalize="batch", ranks=[4], one_jump=True, float64=True,
                          progress=False)
    train_x, train_y = _rows(tiny_store, 0)
    x = torch.cat([((torch.as_tensor(train_x[l]) - one.maps[l].norm_mean.double()) * one.maps[l].norm_scale.double())
                   for l in LAYERS])
    y = torch.as_tensor(train_y).repeat(len(LAYERS), 1)
    # ‖Y - XW - 1bᵀ‖² over the stacked rows, expanded into their products (taken here, in float64)
    xx, xy, yy, sx, sy, n = x.T @ x, x.T @ y, (y * y).sum(), x.sum(0), y.sum(0), len(x)

    def loss(u, v, b):
        w = u @ v
        return yy - 2 * (w * xy).sum() + (w * (xx @ w)).sum() - 2 * b @ (sy - w.T @ sx) + n * b @ b

    u0, v0, b0 = one.maps[0].U.double(), one.maps[0].V.double(), one.maps[0].bias.double()
    assert torch.isclose(loss(u0, v0, b0), ((y - x @ u0 @ v0 - b0) ** 2).sum(), rtol=1e-10)

    closed = float(loss(one.maps[0].U.double(), one.maps[0].V.double(), one.maps[0].bias.double()))
    g = torch.Generator().manual_seed(0)
    for start in ("closed", "random"):
        if start == "closed":
            params = [one.maps[0].U.double() + 0.01 * torch.randn(32, 4, generator=g, dtype=torch.float64),
                      one.maps[0].V.double(), one.maps[0].bias.double()]
        else:
            params = [0.1 * torch.randn(32, 4, generator=g, dtype=torch.float64),
                      0.1 * torch.randn(4, 32, generator=g, dtype=torch.float64), torch.zeros(32, dtype=torch.float64)]
        params = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.LBFGS(params, max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                                tolerance_change=1e-15)

        def step(opt=opt, params=params):
            opt.zero_grad()
            value = loss(*params)
            value.backward()
            return value

        for _ in range(3):
            opt.step(step)
        trained = float(loss(*params).detach())
        assert trained >= closed * (1 - 1e-9), (start, trained, closed)
        if start == "closed":  # it converged: the closed form is the optimum, not merely unbeaten
            assert trained <= closed * (1 + 1e-6)


def test_one_jump_file_round_trips_with_the_shared_map_once(tiny_store, tmp_path):
    from safetensors import safe_open

    [one] = fit_shortcuts(tiny_store, method="nnjtc", normalize="batch", ranks=[4], one_jump=True, progress=False)
    one.save(tmp_path / "one.safetensors")
    with safe_open(str(tmp_path / "one.safetensors"), "pt") as f:
        names, meta = sorted(f.keys()), f.metadata()
    assert meta["format_version"] == "2" and meta["one_jump"] == "pooled"
    assert [n for n in names if n.startswith("shared.")] == ["shared.U", "shared.V", "shared.bias"]
    assert not [n for n in names if n.startswith("layers.") and not n.endswith(("norm_mean", "norm_scale"))]
    with ActivationStore(tiny_store) as store:
        back = Shortcuts.load(tmp_path / "one.safetensors", head=store)
    assert back.name == "nnjtc-batch-r4-onejump" and back.maps[0].U is back.maps[1].U
    assert back.total_params == one.total_params
    x = torch.randn(5, 32)
    for l in LAYERS:
        assert torch.equal(back.transform_hidden(x, l), one.transform_hidden(x, l))
        assert back(x, l).shape == (5, 300)
    moved = back.to(torch.float64)  # a move keeps the layers sharing one map
    assert moved.maps[0].U is moved.maps[2].U and moved.maps[0].U.dtype == torch.float64
    # maps that no longer share a map (trained per layer, say) are not saved as one jump
    back.maps[1].U = back.maps[1].U + 1
    with pytest.raises(NJTCError, match="differs from the others"):
        back.save(tmp_path / "changed.safetensors")
    back.replace(one_jump=None).save(tmp_path / "per-layer.safetensors")
    assert Shortcuts.load(tmp_path / "per-layer.safetensors").one_jump is None


def test_settings_that_cannot_be_one_jump_are_refused_before_the_pass():
    with pytest.raises(NJTCError, match="target_layer` all"):
        FitSpec(method="njtc", one_jump=True, target_layer="all")
    with pytest.raises(NJTCError, match="ordinary fit"):
        FitSpec(method="njtc", one_jump="select", layers=[2])
    with pytest.raises(NJTCError, match="pooled or select"):
        FitSpec(method="njtc", one_jump="best")
    assert FitSpec(one_jump=True).one_jump == "pooled" and FitSpec().one_jump is None


@pytest.mark.parametrize("flags, message", [
    (["--one-jump", "--target-layer", "all"], "--target-layer all"),
    (["--one-jump", "select", "--layers", "1"], "ordinary fit"),
    (["--one-jump-table", "t.json"], "--one-jump select"),
])
def test_cli_refuses_bad_one_jump_flags_in_one_line(tiny_store, tmp_path, capsys, monkeypatch, flags, message):
    import njtc_solve.solve.stats as stats

    def no_pass(*args, **kwargs):  # the signature of MomentAccumulator.update: a pass must not start
        raise AssertionError("the pass started")

    monkeypatch.setattr(stats.MomentAccumulator, "update", no_pass)
    code = fit_command.run(["--store", str(tiny_store), "--method", "njtc", "--rank", "4", "--no-progress",
                            "--out", str(tmp_path / "o.safetensors"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_cli_refuses_a_table_named_as_one_of_the_rank_files(tiny_store, tmp_path, capsys):
    """Two ranks write OUT-r4 and OUT-r8: the table may be neither (nor OUT), refused before the pass."""
    out = tmp_path / "x.safetensors"
    for table in (tmp_path / "x-r4.safetensors", tmp_path / "x-r8.safetensors"):
        code = fit_command.run(["--store", str(tiny_store), "--method", "njtc", "--rank", "4,8", "--one-jump",
                                "select", "--one-jump-table", str(table), "--no-progress", "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "two outputs are one file" in err[0], err
        assert not table.exists()


def test_cli_select_prints_and_saves_the_table(tiny_store, tmp_path, capsys):
    code = fit_command.run(["--store", str(tiny_store), "--method", "nnjtc", "--normalize", "batch", "--rank", "4",
                            "--one-jump", "select", "--one-jump-table", str(tmp_path / "table.json"), "--no-progress",
                            "--out", str(tmp_path / "sel.safetensors")])
    out = capsys.readouterr().out
    assert code == 0 and "chosen" in out and "pooled one jump" in out
    table = json.loads((tmp_path / "table.json").read_text())
    sel = Shortcuts.load(tmp_path / "sel.safetensors")
    assert table["format"] == "njtc-one-jump-table" and table["ranks"]["4"]["chosen"] == \
        sel.stats["one_jump"]["from_layer"]
    assert np.allclose(table["ranks"]["4"]["mse"], sel.stats["one_jump"]["table_mse"])


def test_tools_read_a_one_jump_file(tiny_store, tmp_path):
    from njtc_solve.evaluation.evaluate import evaluate_shortcuts
    from njtc_solve.maps.jacobian_lens import check_exportable

    [batch] = fit_shortcuts(tiny_store, method="nnjtc", normalize="batch", ranks=[4], one_jump=True, progress=False)
    batch.save(tmp_path / "batch.safetensors")
    result = evaluate_shortcuts(tiny_store, [tmp_path / "batch.safetensors"], progress=False)
    rows = [r for r in result.records if r["method"] == batch.name]
    assert {r["layer"] for r in rows} == set(LAYERS) and {r["total_params"] for r in rows} == {batch.total_params}
    folder = batch.save_pretrained(tmp_path / "shared")
    again = Shortcuts.from_pretrained(folder)
    assert again.one_jump == "pooled" and again.maps[0].U is again.maps[1].U
    assert json.loads((tmp_path / "shared" / "config.json").read_text())["total_params"] == batch.total_params
    # the Jacobian-lens format holds one J per layer, no bias and no normalisation
    with pytest.raises(NJTCError, match="batch norm"):
        check_exportable(batch)
    [plain] = fit_shortcuts(tiny_store, method="njtc", ranks=[4], one_jump=True, fit_intercept=False,
                            progress=False)
    js = check_exportable(plain)
    assert all(torch.equal(js[l], js[1]) for l in js)


def test_two_process_one_jump_equals_single_process(tiny_store, tmp_path):
    result = torchrun("njtc_solve.fit", "--store", str(tiny_store), "--method", "nnjtc", "--normalize", "batch",
                      "--rank", "4", "--one-jump", "--chunk-rows", "300", "--out", str(tmp_path / "dist.safetensors"),
                      "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    [single] = fit_shortcuts(tiny_store, method="nnjtc", normalize="batch", ranks=[4], one_jump=True, chunk_rows=300,
                             progress=False)
    dist = Shortcuts.load(tmp_path / "dist.safetensors")
    assert dist.one_jump == "pooled" and sorted(dist.maps) == list(LAYERS)
    for l in LAYERS:
        a, b = dist.maps[l], single.maps[l]
        assert torch.allclose(a.U @ a.V, b.U @ b.V, rtol=1e-5, atol=1e-6)
        assert torch.allclose(a.norm_scale, b.norm_scale, rtol=1e-6)


def test_refine_from_a_one_jump_start_writes_per_layer_maps(tiny_store, tmp_path):
    from njtc_solve.solve.refine_shortcuts import refine_shortcuts

    [one] = fit_shortcuts(tiny_store, method="njtc", ranks=[4], one_jump=True, progress=False)
    with ActivationStore(tiny_store) as store:
        refined, _ = refine_shortcuts(store, one, steps=4, lr=1e-3, check_every=2, progress=False)
    assert refined.one_jump is None and refined.maps[0].U is not refined.maps[1].U
    refined.save(tmp_path / "refined.safetensors")
    assert Shortcuts.load(tmp_path / "refined.safetensors").one_jump is None


def test_one_jump_from_saved_statistics_equals_one_from_the_store(tiny_store, tmp_path):
    stats = tmp_path / "stats.safetensors"
    [from_store] = fit_shortcuts(tiny_store, method="njtc", ranks=[4], one_jump=True, save_stats=stats,
                                 progress=False)
    code = fit_command.run(["--stats", str(stats), "--method", "njtc", "--rank", "4", "--one-jump", "--no-progress",
                            "--out", str(tmp_path / "from-stats.safetensors")])
    again = Shortcuts.load(tmp_path / "from-stats.safetensors")
    assert code == 0 and again.one_jump == "pooled"
    assert torch.equal(again.maps[0].U, from_store.maps[0].U) and torch.equal(again.maps[2].bias, from_store.maps[2].bias)


def test_logit_weighted_one_jump_equals_brute_force_on_the_stacked_rows(tiny_store):
    """--weight logits: the stacked rows weighted by 1/σ² of their target, errors by diag(g)·W_Uᵀ."""
    from test_fit import brute_force_rrr

    [one] = fit_shortcuts(tiny_store, method="njtc", ranks=[3], weight="logits", one_jump=True, progress=False)
    train_x, train_y = _rows(tiny_store, 0)
    w = 1.0 / ((train_y ** 2).mean(1) + 1e-6)
    with ActivationStore(tiny_store) as store:
        head = store.head()
    w_u = head.unembed.double().numpy()
    g = head.norm_weight.double().numpy()[:, None] * (w_u - w_u.mean(0)).T
    coef, bias = brute_force_rrr(np.concatenate([train_x[l] for l in LAYERS]), np.tile(train_y, (3, 1)), 3,
                                 row_weight=np.tile(w, 3), g=g)
    assert _rel((one.maps[0].U @ one.maps[0].V).double().numpy(), coef) <= 1e-5
    assert _rel(one.maps[2].bias.double().numpy(), bias) <= 1e-5


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("shared.U"), "need U, V"),
    (lambda t: t.update({"layers.0.U": t["shared.U"].clone()}), "holds U once, as shared.U"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith("shared.")], "without a shared map"),
])
def test_a_damaged_one_jump_file_is_refused_on_one_line(tiny_store, tmp_path, change, message):
    from safetensors import safe_open
    from safetensors.torch import save_file

    [one] = fit_shortcuts(tiny_store, method="njtc", ranks=[4], one_jump=True, progress=False)
    one.save(tmp_path / "one.safetensors")
    with safe_open(str(tmp_path / "one.safetensors"), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(NJTCError, match="is not a valid shortcut file") as err:
        Shortcuts.load(tmp_path / "bad.safetensors")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_lens_reads_a_one_jump_file(tiny_models, tiny_store):
    from njtc_solve.core.models import load_model
    from njtc_solve.evaluation.lens import ShortcutLens

    [one] = fit_shortcuts(tiny_store, method="nnjtc", normalize="batch", ranks=[4], one_jump=True, progress=False)
    model, tokenizer, _ = load_model(str(tiny_models["llama"]))
    lens = ShortcutLens.from_model(model, one, tokenizer)
    df = lens.trajectory("The lens reads every layer.", k=3).to_pandas()
    assert set(df[df.method == one.name].layer) >= set(LAYERS)
    h = torch.randn(2, 5, 32)
    with ActivationStore(tiny_store) as store:
        one.attach_head(store)
    for l in LAYERS:
        torch.testing.assert_close(lens(h, l), one(h, l), rtol=1e-5, atol=1e-5)
    assert lens.shortcuts.total_params == one.total_params  # the lens's views of the shared map count once


def test_logit_weighted_one_jump_records_the_hidden_space_loss_like_per_layer_fits(tiny_store):
    """A one jump's train_sse and R² are the per-layer fits' measure: ‖y - ŷ‖² over the (1/σ²-weighted) rows,
    not the logit-weighted loss it is solved in."""
    [one] = fit_shortcuts(tiny_store, method="njtc", ranks=[3], weight="logits", one_jump=True, float64=True,
                          progress=False)
    [own] = fit_shortcuts(tiny_store, method="njtc", ranks=[3], weight="logits", float64=True, progress=False)
    train_x, train_y = _rows(tiny_store, 0)
    w = 1.0 / ((train_y ** 2).mean(1) + 1e-6)
    total_var = (w[:, None] * (train_y - (w[:, None] * train_y).sum(0) / w.sum()) ** 2).sum()

    def direct(sc, l):  # the weights' scale (the fit divides by their mean on a chunk) cancels in both
        pred = sc.transform_hidden(torch.as_tensor(train_x[l]), l).double().numpy()
        return float((w[:, None] * (train_y - pred) ** 2).sum())

    for l in LAYERS:
        for sc in (own, one):  # the per-layer records already measure this; the one jump's must too
            record, sse = sc.stats["layers"][l], direct(sc, l)
            mse = sse / (w.sum() * train_y.shape[1])
            assert abs(record["train_mse"] - mse) / mse < 1e-6, (sc.name, l, record["train_mse"], mse)
            assert abs(record["r2"] - (1 - sse / total_var)) < 1e-6, (sc.name, l, record["r2"], 1 - sse / total_var)
