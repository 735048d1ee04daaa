"""Hugging Face datasets as corpora (the [datasets] extra): the same texts give the same store
whether they come as .jsonl, a save_to_disk folder, a parquet, arrow or csv file; bad
datasets are one line, exit 2, nothing written."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest

from njtc_solve.cli import extract, run_cli
from njtc_solve.core.errors import NJTCError
from njtc_solve.data.corpus import is_dataset, load_corpus

datasets = pytest.importorskip("datasets")

PLAN = ["--seq-len", "16", "--max-tokens", "640", "--no-progress"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    docs = load_corpus()[1][:60]
    return docs[:5] + ["", "   "] + docs[5:]  # blank rows are dropped, as blank .jsonl records are


@pytest.fixture(scope="module")
def sources(texts, tmp_path_factory) -> dict[str, str]:
    """The same rows as .jsonl, a save_to_disk folder, .parquet, .arrow and .csv (with another column)."""
    root = tmp_path_factory.mktemp("corpora")
    rows = {"text": texts, "id": list(range(len(texts)))}
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    data = datasets.Dataset.from_dict(rows)
    data.save_to_disk(str(root / "saved"))
    data.to_parquet(str(root / "docs.parquet"))
    data.to_csv(str(root / "docs.csv"), index=False)
    [arrow] = sorted((root / "saved").glob("*.arrow"))  # save_to_disk's own arrow stream file
    datasets.DatasetDict({"train": data, "test": data.select(range(5))}).save_to_disk(str(root / "dict"))
    return {"jsonl": str(root / "docs.jsonl"), "saved": str(root / "saved"), "parquet": str(root / "docs.parquet"),
            "arrow": str(arrow), "csv": str(root / "docs.csv"), "dict": str(root / "dict")}


def test_each_dataset_kind_reads_the_same_documents(sources, texts):
    expected = [t for t in texts if t.strip()]
    for kind in ("jsonl", "saved", "parquet", "arrow", "csv"):
        name, docs = load_corpus(sources[kind])
        assert name == sources[kind] and docs == expected, kind
        assert is_dataset(sources[kind]) == (kind != "jsonl")
    assert load_corpus(sources["dict"] + "/test")[1] == expected[:5]
    assert load_corpus(sources["parquet"] + "[2:9]")[1] == [t for t in texts[2:9] if t.strip()]
    assert load_corpus(sources["saved"] + "[:4]")[1] == expected[:4]


def test_the_hub_spec_goes_through_load_dataset(monkeypatch, texts):
    """``hf:NAME:CONFIG:SPLIT[slice]`` streams the split and reads only the slice's rows."""
    calls, read = [], []

    def rows():
        for i, t in enumerate(texts):
            read.append(i)
            yield {"text": t}

    class Streamed:
        column_names = ["text"]

        def __iter__(self):
            return rows()

    def load_dataset(path, name=None, *, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return Streamed()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    name, docs = load_corpus("hf:user/corpus:en:validation[:3]")
    assert name == "hf:user/corpus:en:validation[:3]" and docs == texts[:3]
    assert calls == [("user/corpus", "en", "validation", True)] and read == [0, 1, 2]  # no row past the slice
    load_corpus("hf:user/corpus")
    assert calls[-1] == ("user/corpus", None, "train", True)


def _store(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {"tokens": f["tokens"][:], "split": f["split"][:]}
        out.update({name: f[name][:] for name in (f"hidden/{k}" for k in f["hidden"])})
        out["corpus_sha256"] = f.attrs["corpus_sha256"]
    return out


def test_a_dataset_gives_the_store_of_the_same_texts_as_jsonl(sources, tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    stores = {}
    for kind in ("jsonl", "saved", "parquet"):
        out = tmp_path / f"{kind}.h5"
        assert run_cli(extract.main, ["--model", model, "--corpus", sources[kind], "--out", str(out), *PLAN]) == 0
        stores[kind] = _store(out)
    reference = stores.pop("jsonl")
    assert len(reference["tokens"]) == 640
    for kind, got in stores.items():
        assert got.keys() == reference.keys()
        for name, value in reference.items():
            assert np.array_equal(got[name], value), (kind, name)


def _refused(capsys, argv, match, out):
    capsys.readouterr()
    code = run_cli(extract.main, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(match, lines[0]), lines[0]
    assert not out.exists() and not list(out.parent.glob(out.name + "*"))


def test_bad_datasets_are_one_line_and_write_nothing(sources, tiny_models, tmp_path, capsys):
    model = str(tiny_models["llama"])
    out = tmp_path / "a.h5"
    base = ["--model", model, "--out", str(out), *PLAN]
    _refused(capsys, [*base, "--corpus", sources["saved"], "--text-field", "body"],
             r"has no column 'body' \(its columns: text, id\); see --text-field", out)
    _refused(capsys, [*base, "--corpus", sources["csv"], "--text-field", "body"], r"has no column 'body'", out)
    _refused(capsys, [*base, "--corpus", sources["parquet"], "--text-field", "id"], r"row 0 has no string 'id'", out)
    empty = datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")}))
    empty.save_to_disk(str(tmp_path / "empty"))
    _refused(capsys, [*base, "--corpus", str(tmp_path / "empty")], r"holds no text \(an empty split", out)
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    _refused(capsys, [*base, "--corpus", str(tmp_path / "empty.parquet")], r"holds no text \(an empty split", out)
    _refused(capsys, [*base, "--corpus", sources["parquet"] + "[100:200]"], r"holds no text", out)
    _refused(capsys, [*base, "--corpus", sources["dict"]], r"holds several splits \(test, train\); name one", out)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    _refused(capsys, [*base, "--corpus", str(tmp_path / "broken.parquet")], r"cannot read corpus .* as a dataset", out)
    with pytest.raises(NJTCError, match="must be hf:NAME"):
        load_corpus("hf:")


def test_without_the_extra_a_dataset_names_it(sources, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails as without the extra
    for spec in (sources["saved"], sources["parquet"], "hf:user/corpus"):
        with pytest.raises(NJTCError, match=re.escape("needs the [datasets] extra: pip install 'njtc_solve[datasets]'")):
            load_corpus(spec)
    assert load_corpus(sources["jsonl"])[1]  # the other corpora need no extra
