"""Shortcuts.save_pretrained / from_pretrained / push_to_hub: the folder, its model card, the hub
paths (huggingface_hub stood in for by fakes that check the real signatures; no network)."""

from __future__ import annotations

import inspect
import json

import huggingface_hub
import pytest
import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.evaluation.evaluate import evaluate_shortcuts
from njtc_solve.maps import hub
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts
from njtc_solve.solve.fit import fit_shortcuts


@pytest.fixture(scope="module")
def fitted(tiny_store):
    [njtc] = fit_shortcuts(tiny_store, method="njtc", ranks=[4], progress=False)
    result = evaluate_shortcuts(tiny_store, [njtc], progress=False)
    return njtc, result


def _same(a: Shortcuts, b: Shortcuts) -> None:
    assert (a.method, a.name, a.rank, a.target_layer, a.model_sha256, a.provenance, a.head_sha256) == \
           (b.method, b.name, b.rank, b.target_layer, b.model_sha256, b.provenance, b.head_sha256)
    assert sorted(a.maps) == sorted(b.maps)
    for layer in a.maps:
        for name, t in a.maps[layer].tensors().items():
            u = b.maps[layer].tensors()[name]
            assert (t is None) == (u is None) and (t is None or torch.equal(t, u)), (layer, name)


def test_save_and_load_a_folder_with_its_card(fitted, tmp_path):
    njtc, result = fitted
    folder = njtc.save_pretrained(tmp_path / "maps", model="HuggingFaceTB/SmolLM2-135M", corpus="pydoc_data.topics",
                                  metrics=result)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "shortcuts.safetensors"]
    _same(Shortcuts.from_pretrained(folder), njtc)
    _same(Shortcuts.from_pretrained(str(folder)), njtc)
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "njtc-shortcuts-pretrained" and config["method"] == "njtc" and config["rank"] == 4
    assert config["model_sha256"] == njtc.model_sha256 and config["corpus_sha256"] == njtc.provenance["corpus_sha256"]
    assert config["split"]["split_id"] == njtc.provenance["split_id"]
    assert [r["layer"] for r in config["held_out"]] == sorted(njtc.maps)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: njtc_solve\n") and "base_model: HuggingFaceTB/SmolLM2-135M" in card
    for text in ("| corpus | pydoc_data.topics |", "| rank | 4 |", "njtc", "## Held-out metrics", "precision@1"):
        assert text in card, text
    p1 = result.value(njtc.name, 1, "precision@1")
    assert f"| 1 | {p1:.4g} |" in card  # layer 1's held-out precision@1 from the evaluation


def test_the_card_without_metrics_says_so_and_a_dict_of_metrics_is_shown(tmp_path):
    sc = Shortcuts("jtc", {0: ShortcutMap(weight=torch.eye(4)), 1: ShortcutMap(weight=torch.eye(4))}, 2)
    card = (sc.save_pretrained(tmp_path / "a") / "README.md").read_text()
    assert "None recorded" in card and "| model | not recorded |" in card
    card = (sc.save_pretrained(tmp_path / "b", metrics={0: {"kl": 0.5}, 1: {"kl": 0.25}}) / "README.md").read_text()
    assert "| 0 | 0.5 |" in card and "| 1 | 0.25 |" in card
    with pytest.raises(NJTCError, match="hold no figures of jtc"):
        sc.save_pretrained(tmp_path / "c", metrics=[{"method": "other", "layer": 0, "kl": 1.0}])
    assert not (tmp_path / "c").exists()


def test_a_folder_is_replaced_only_when_ours_and_asked(tmp_path):
    sc = Shortcuts("jtc", {0: ShortcutMap(weight=torch.eye(4))}, 1)
    other = Shortcuts("jtc", {0: ShortcutMap(weight=2 * torch.eye(4))}, 1)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    for overwrite in (False, True):
        with pytest.raises(NJTCError, match="holds files this project did not write"):
            sc.save_pretrained(model, overwrite=overwrite)
    assert (model / "config.json").read_text() == '{"model_type": "llama"}' and len(list(model.iterdir())) == 1
    (tmp_path / "empty").mkdir()
    sc.save_pretrained(tmp_path / "empty")  # an empty folder is filled
    with pytest.raises(NJTCError, match="already holds saved maps; pass `overwrite=True`"):
        other.save_pretrained(tmp_path / "empty")
    other.save_pretrained(tmp_path / "empty", overwrite=True)
    assert torch.equal(Shortcuts.from_pretrained(tmp_path / "empty").maps[0].weight, 2 * torch.eye(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model"]  # no temporary left


def test_a_failed_save_leaves_nothing_and_the_old_folder_whole(tmp_path, monkeypatch):
    sc = Shortcuts("jtc", {0: ShortcutMap(weight=torch.eye(4))}, 1)
    sc.save_pretrained(tmp_path / "maps")
    before = {p.name: p.read_bytes() for p in (tmp_path / "maps").iterdir()}

    def broken(config):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub, "card_text", broken)
    for target in ("maps", "new"):
        with pytest.raises(NJTCError, match="cannot write .*No space left on device"):
            sc.save_pretrained(tmp_path / target, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "maps").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]


def test_folders_that_are_not_saved_maps_are_refused_in_one_line(tmp_path):
    sc = Shortcuts("jtc", {0: ShortcutMap(weight=torch.eye(4))}, 1)
    folder = sc.save_pretrained(tmp_path / "maps")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "bare").mkdir()
    cases = {tmp_path / "nowhere" / "x": "neither a saved-maps folder nor a hub repository",
             tmp_path / "bare": "is not a saved-maps folder",
             tmp_path / "model": "a model's config",
             "not a repo id!": "neither a saved-maps folder nor a hub repository"}
    for path, message in cases.items():
        with pytest.raises(NJTCError, match=message) as err:
            Shortcuts.from_pretrained(path)
        assert "\n" not in str(err.value)
    config = json.loads((folder / "config.json").read_text())
    config["method"] = "nnjtc"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NJTCError, match="says method 'nnjtc', its shortcuts.safetensors 'jtc'"):
        Shortcuts.from_pretrained(folder)
    (folder / "shortcuts.safetensors").write_bytes(b"truncated")
    with pytest.raises(NJTCError):
        Shortcuts.from_pretrained(folder)


def test_a_hub_name_goes_through_snapshot_download(tmp_path, monkeypatch):
    sc = Shortcuts("jtc", {0: ShortcutMap(weight=torch.eye(4))}, 1, model_sha256="abc")
    snapshot = sc.save_pretrained(tmp_path / "snapshot")
    calls = []
    real = inspect.signature(huggingface_hub.snapshot_download)

    def fake_snapshot_download(repo_id, **kwargs):
        real.bind(repo_id, **kwargs)  # what the real function accepts, keyword-only as it is
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = Shortcuts.from_pretrained("someone/jtc-maps", revision="v1")
    assert loaded.model_sha256 == "abc" and torch.equal(loaded.maps[0].weight, torch.eye(4))
    [(repo_id, kwargs)] = calls
    assert repo_id == "someone/jtc-maps" and kwargs["revision"] == "v1"
    assert sorted(kwargs["allow_patterns"]) == ["README.md", "config.json", "shortcuts.safetensors"]

    def offline(repo_id, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(NJTCError, match=r"cannot load 'someone/jtc-maps' from the hub \(and there is no local folder of that name\): "
                                         r"OSError: We couldn't connect") as err:
        Shortcuts.from_pretrained("someone/jtc-maps")
    assert "\n" not in str(err.value)


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    sc = Shortcuts("jtc", {0: ShortcutMap(weight=torch.eye(4))}, 1)
    seen = {}

    class FakeApi:
        def __init__(self, token=None, **kwargs):
            seen["token"] = token

        def create_repo(self, repo_id, **kwargs):
            inspect.signature(huggingface_hub.HfApi.create_repo).bind(self, repo_id, **kwargs)
            seen["create"] = (repo_id, kwargs)

        def upload_folder(self, **kwargs):
            inspect.signature(huggingface_hub.HfApi.upload_folder).bind(self, **kwargs)
            folder = kwargs["folder_path"]
            seen["files"] = sorted(p.name for p in __import__("pathlib").Path(folder).iterdir())
            seen["upload"] = kwargs
            return type("CommitInfo", (), {"commit_url": "https://huggingface.co/someone/maps/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = sc.push_to_hub("someone/maps", token="hf_x", private=True)
    assert url.endswith("/commit/1") and seen["token"] == "hf_x"
    assert seen["create"] == ("someone/maps", {"private": True, "exist_ok": True})
    assert seen["files"] == ["README.md", "config.json", "shortcuts.safetensors"]
    assert seen["upload"]["repo_id"] == "someone/maps"
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(NJTCError, match="needs a token"):
        sc.push_to_hub("someone/maps")
    with pytest.raises(NJTCError, match="owner/name"):
        sc.push_to_hub("no-owner", token="hf_x")
