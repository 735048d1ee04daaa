"""Doctest set-up (``make test`` runs every docstring example; scikit-learn ships its conftest
the same way): each example runs in a fresh folder holding ``activations.h5``, a store of a
tiny random Llama model, with ``model``, ``tokenizer`` and ``documents`` in its namespace."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest


def _test_support():
    path = Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("njtc_test_support", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def _doctest_store(tmp_path_factory):
    from njtc_solve.data.corpus import load_corpus
    from njtc_solve.data.extract import extract_activations
    from njtc_solve.core.models import load_model

    root = tmp_path_factory.mktemp("doctest")
    folder = _test_support().build_tiny_model("llama", root / "model")
    model, tokenizer, name = load_model(str(folder))
    documents = load_corpus()[1]
    store = extract_activations(model, tokenizer, documents, root / "activations.h5", model_name=name,
                                seq_len=32, max_tokens=2048, progress=False)
    return store, {"model": model, "tokenizer": tokenizer, "documents": documents}


@pytest.fixture(autouse=True)
def _doctest_folder(_doctest_store, doctest_namespace, tmp_path, monkeypatch):
    store, namespace = _doctest_store
    shutil.copy(store, tmp_path / "activations.h5")
    monkeypatch.chdir(tmp_path)
    doctest_namespace.update(namespace)
