"""Shortcut maps as torch modules: tuned-lens's conventions, the attached head, state_dict, dtype,
and autograd."""

from __future__ import annotations

import io

import pytest
import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.core.models import load_model
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts
from njtc_solve.data.store import ActivationStore
from njtc_solve.solve.training import StoreRows, train_maps


@pytest.fixture(scope="module")
def files(tiny_store, tmp_path_factory):
    """A narrow (NJTC r4, the low-rank route to the logits) and a full residual map file, and some rows."""
    folder = tmp_path_factory.mktemp("module")
    with ActivationStore(tiny_store) as store:
        [njtc] = fit_shortcuts(store, method="njtc", ranks=[4], layers=[0, 1], progress=False)
        [jtc] = fit_shortcuts(store, method="jtc", ranks=None, layers=[1], residual=True, progress=False)
        rows = {l: torch.as_tensor(store.file[f"hidden/{l}"][:14]).float() for l in (0, 1, store.n_layers)}
    paths = {"njtc": folder / "njtc.safetensors", "jtc": folder / "jtc.safetensors"}
    njtc.save(paths["njtc"])
    jtc.save(paths["jtc"])
    return paths, rows


@pytest.mark.parametrize("kind", ["njtc", "jtc"])
def test_forward_is_the_head_applied_to_transform_hidden(tiny_store, files, kind):
    paths, rows = files
    with ActivationStore(tiny_store) as store:
        sc = Shortcuts.load(paths[kind], head=store)
        head = store.head()
    assert sc.head.fingerprint() == head.fingerprint()
    h = rows[1].reshape(2, 7, -1)  # any leading shape, as tuned-lens's lenses take
    y = sc.transform_hidden(h, 1)
    assert y.shape == h.shape and not torch.allclose(y, h, atol=1e-2)
    logits = sc(h, 1)
    assert logits.shape == (2, 7, head.vocab_size)
    torch.testing.assert_close(logits, head.logits(y.reshape(14, -1)).reshape(2, 7, -1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sc.transform_hidden(h, sc.target_layer), h)  # the target layer needs no map
    with pytest.raises(NJTCError, match=r"no map for layer idx=2"):
        sc.transform_hidden(h, 2)  # the target is layer 3


def test_load_takes_a_head_a_store_or_a_model_and_refuses_another_models(tiny_store, tiny_models, files):
    paths, rows = files
    llama, _, _ = load_model(str(tiny_models["llama"]), progress=False)
    gpt2, _, _ = load_model(str(tiny_models["gpt2"]), progress=False)
    with ActivationStore(tiny_store) as store:
        by_store = Shortcuts.load(paths["njtc"], head=store)
        by_head = Shortcuts.load(paths["njtc"], head=store.head())
    by_model = Shortcuts.load(paths["njtc"], head=llama)
    assert by_store.head.fingerprint() == by_head.head.fingerprint() == by_model.head.fingerprint()
    torch.testing.assert_close(by_model(rows[0], 0), by_store(rows[0], 0))
    for other in (gpt2, "a string"):
        with pytest.raises(NJTCError) as err:
            Shortcuts.load(paths["njtc"], head=other)
        assert "\n" not in str(err.value)
    with pytest.raises(NJTCError, match="fitted for another head"):
        Shortcuts.load(paths["njtc"], head=gpt2)
    with pytest.raises(NJTCError, match="head must be a Head"):
        Shortcuts.load(paths["njtc"], head="a string")
    bare = Shortcuts.load(paths["njtc"])
    assert bare.head is None and bare.head_description == by_store.head_description != {}
    with pytest.raises(NJTCError, match="no head to make logits"):
        bare(rows[0], 0)


def test_state_dict_round_trip(files):
    paths, rows = files
    sc = Shortcuts.load(paths["njtc"])
    assert set(sc.state_dict()) == {f"maps.{l}.{p}" for l in (0, 1) for p in ("U", "V", "bias")}
    buffer = io.BytesIO()
    torch.save(sc.state_dict(), buffer)
    other = Shortcuts.load(paths["njtc"])
    for m in other.maps.values():
        for t in m.buffers():
            t.zero_()
    assert not torch.allclose(other.transform_hidden(rows[1], 1), sc.transform_hidden(rows[1], 1))
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    assert torch.equal(other.transform_hidden(rows[1], 1), sc.transform_hidden(rows[1], 1))


def test_to_keeps_the_callers_dtype_and_moves_the_head(tiny_store, files):
    paths, rows = files
    with ActivationStore(tiny_store) as store:
        sc = Shortcuts.load(paths["njtc"], head=store)
    f32 = sc(rows[1], 1)
    assert sc.double() is sc and sc.maps[1].U.dtype == torch.float64
    assert sc.head.unembed.dtype == torch.float32  # the head computes in float32, as the model's is read
    y = sc.transform_hidden(rows[1], 1)
    assert y.dtype == torch.float64 and sc(rows[1], 1).dtype == torch.float32
    torch.testing.assert_close(sc(rows[1], 1), f32, rtol=1e-4, atol=1e-4)
    if torch.cuda.is_available():  # the head follows the maps to the device
        assert sc.to("cuda").head.unembed.device.type == "cuda"


def test_replace_moves_the_attached_head_to_the_new_maps(tiny_store, files):
    """``replace(maps=...)`` with maps elsewhere (here the meta device, which needs no GPU) takes the head along."""
    paths, _ = files
    with ActivationStore(tiny_store) as store:
        sc = Shortcuts.load(paths["njtc"], head=store)
    import copy

    moved = sc.replace(maps={l: copy.deepcopy(m).to("meta") for l, m in sc.maps.items()}, label="moved")
    assert moved.name == "moved" and moved.head.unembed.device.type == "meta"
    assert sc.head.unembed.device.type == "cpu"  # the original keeps its own
    assert sc.replace(label="same").head.unembed.device.type == "cpu"
    assert Shortcuts.load(paths["njtc"]).replace(label="x").head is None


def test_autograd_reaches_a_trainable_copy_and_leaves_the_map_alone(files):
    paths, rows = files
    sc = Shortcuts.load(paths["njtc"])
    assert list(sc.parameters()) == []  # a loaded map is buffers
    m = sc.maps[1].trainable()
    assert sorted(n for n, _ in m.named_parameters()) == ["U", "V", "bias"]
    ((m(rows[1]) - rows[sc.target_layer]) ** 2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert sc.maps[1].U.grad is None and not sc.maps[1].U.requires_grad
    assert set(m.state_dict()) == set(sc.maps[1].state_dict())
    with pytest.raises(NJTCError, match="identity map has no parameters"):
        ShortcutMap().trainable()


def test_the_trainer_trains_the_map_module_itself(tiny_store):
    with ActivationStore(tiny_store) as store:
        [njtc] = fit_shortcuts(store, method="njtc", ranks=[4], layers=[1], progress=False)
        rows = StoreRows(store, [1], "train", in_memory=True, max_rows=512)
        result = train_maps(njtc.maps, store.head(), rows, check=rows, objective="mse", steps=3, lr=1e-3, check_every=3,
                            progress=False)
        own = njtc.maps[1].trainable()  # a map with parameters is trained in place
        again = train_maps({1: own}, store.head(), rows, check=rows, objective="mse", steps=3, lr=1e-3, check_every=3,
                           progress=False)
    assert type(result.modules[1]) is ShortcutMap and result.modules[1].U.requires_grad
    assert result.modules[1] is not njtc.maps[1] and again.modules[1] is own
    assert own.U.grad is not None and not njtc.maps[1].U.requires_grad  # the gradients reached `own`
    saved = result.maps()[1]
    assert type(saved) is ShortcutMap and list(saved.parameters()) == [] and saved.rank == 4

