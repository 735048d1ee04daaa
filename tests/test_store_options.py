"""Smaller stores: a subset of source layers (`--layers`) and 16-bit storage (`--store-dtype`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_module
from test_extract import _one_line_exit_2

from njtc_solve.data.corpus import load_corpus
from njtc_solve.evaluation.evaluate import evaluate_shortcuts
from njtc_solve.data.extract import extract_activations
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.core.models import load_model
from njtc_solve.data.store import ActivationStore

PLAN = {"seq_len": 32, "max_tokens": 1024, "seed": 1}


@pytest.fixture(scope="module")
def stores(tiny_models, tmp_path_factory):
    """The same rows stored whole in float32, and as layers {1, L} in each 16-bit type."""
    model, tokenizer, name = load_model(str(tiny_models["llama"]))
    _, documents = load_corpus()
    root = tmp_path_factory.mktemp("stores")
    out = {"float32": extract_activations(model, tokenizer, documents, root / "full.h5", model_name=name,
                                          progress=False, **PLAN)}
    for dtype in ("float16", "bfloat16"):
        out[dtype] = extract_activations(model, tokenizer, documents, root / f"{dtype}.h5", model_name=name,
                                         progress=False, dtype=dtype, layers=[1], **PLAN)
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sixteen_bit_stores_hold_the_rounded_rows_of_the_chosen_layers(stores, dtype):
    with ActivationStore(stores["float32"]) as full, ActivationStore(stores[dtype]) as half:
        assert half.layers == [1, 3] and half.source_layers == [1]
        assert half.attrs["head_check_rel_err"] < 5e-2
        for layer in (1, 3):
            exact = full.file[f"hidden/{layer}"][...]
            rounded = torch.from_numpy(exact).to(getattr(torch, dtype)).float().numpy()
            [(_, chunk)] = list(half.iter_chunks([layer], chunk_rows=10**6))
            assert chunk[layer].dtype == np.float32
            np.testing.assert_array_equal(chunk[layer], rounded)  # round to nearest, read back exactly
        # half the bytes (beside a 4-byte checksum per chunk)
        assert half.file["hidden/1"].id.get_storage_size() < 0.51 * full.file["hidden/1"].id.get_storage_size()
        assert "hidden/2" not in half.file


def test_a_subset_store_fits_and_evaluates_its_layers_only(stores):
    with ActivationStore(stores["bfloat16"]) as store:
        [sc] = fit_shortcuts(store, method="njtc", ranks=[4], progress=False)
        assert sorted(sc.maps) == [1]
        with pytest.raises(Exception, match="layer 2 was not extracted"):
            fit_shortcuts(store, method="njtc", ranks=[4], layers=[2], progress=False)
        result = evaluate_shortcuts(store, [sc], progress=False)
        assert {r["layer"] for r in result.records} == {1}
    with ActivationStore(stores["float32"]) as full:  # 16-bit inputs barely move the map
        [exact] = fit_shortcuts(full, method="njtc", ranks=[4], layers=[1], progress=False)
    product = lambda m: m.U @ m.V
    assert float((product(sc.maps[1]) - product(exact.maps[1])).norm() / product(exact.maps[1]).norm()) < 0.05


def test_extract_layers_and_store_dtype_on_the_command_line(tiny_models, tmp_path):
    out = tmp_path / "a.h5"
    done = run_module("njtc_solve.extract", "--model", str(tiny_models["gpt2"]), "--out", str(out),
                      "--seq-len", "32", "--max-tokens", "256", "--layers", "0,2", "--store-dtype", "bfloat16",
                      "--no-progress")
    assert done.returncode == 0, done.stderr
    with ActivationStore(out) as store:
        assert store.layers == [0, 2, 3] and store.dtype == "bfloat16"
    _one_line_exit_2(run_module("njtc_solve.extract", "--model", str(tiny_models["gpt2"]), "--out",
                                str(tmp_path / "b.h5"), "--layers", "7"), "layer 7 is not in the model")
    assert not (tmp_path / "b.h5").exists()
