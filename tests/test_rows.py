"""The row-source protocol that the store and a live model share, and the one compatibility check of maps."""

from __future__ import annotations

import inspect

import pytest
import torch

from njtc_solve.maps.compatibility import check_compatible
from njtc_solve.data.corpus import load_corpus
from njtc_solve.core.errors import NJTCError
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.core.models import load_model, model_sha256
from njtc_solve.data.rows import RowSource, RowSourceBase
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts
from njtc_solve.data.live import LiveSource
from njtc_solve.data.store import ActivationStore

METHODS = ("head", "check_layers", "count", "evaluated_documents", "iter_chunks")


@pytest.fixture(scope="module")
def llama(tiny_models):
    model, tokenizer, name = load_model(str(tiny_models["llama"]))
    return model, tokenizer, name


@pytest.fixture(scope="module")
def live(llama):
    model, tokenizer, name = llama
    return LiveSource(model, tokenizer, load_corpus()[1], model_name=name, seq_len=32, max_tokens=6000)  # tiny_store's plan


@pytest.fixture(scope="module")
def jtc(tiny_store):
    with ActivationStore(tiny_store) as store:
        [sc] = fit_shortcuts(store, method="jtc", layers=[0, 1], progress=False)
    return sc


def _leading_parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("kind", ["store", "live"])
def test_the_store_and_a_live_model_are_row_sources(kind, tiny_store, live):
    source = ActivationStore(tiny_store) if kind == "store" else live
    try:
        assert isinstance(source, RowSource) and isinstance(source, RowSourceBase)
        for name in METHODS:  # the protocol's parameters, in its order and with its defaults, then any extra
            expected = _leading_parameters(getattr(RowSource, name))
            assert _leading_parameters(getattr(type(source), name))[:len(expected)] == expected, name
        assert source.source_layers == [0, 1, 2] and source.check_layers(["3", 0]) == [3, 0]
        with pytest.raises(NJTCError, match=f"layer 4 is not in the {'store' if kind == 'store' else 'model'} "
                                            r"\(layers 0\.\.3\)"):
            source.check_layers([1, 4])
        with pytest.raises(NJTCError, match="unknown split 'test'"):
            source.count("test")
        assert source.count("train", 1) + source.count("validation", 1) == source.count(None, 1) > 0
    finally:
        if kind == "store":
            source.close()


def test_a_class_missing_a_member_is_not_a_row_source(tiny_store):
    class Rows:  # everything but iter_chunks
        n_layers, d_model, path, provenance, model_sha256, default_skip_positions = 3, 32, "x", {}, "", 1
        layers = source_layers = [0, 1, 2, 3]

        def head(self): ...
        def check_layers(self, layers): ...
        def count(self, split=None, skip_positions=0): ...
        def evaluated_documents(self, skip_positions=0): ...

    assert not isinstance(Rows(), RowSource)
    Rows.iter_chunks = lambda self, layers, split=None, chunk_rows=4096, max_rows=None, shard=(0, 1), skip_positions=0: iter(())
    assert isinstance(Rows(), RowSource)
    with pytest.raises(NJTCError, match="`source` must be a row source, a model or None, not str"):
        check_compatible(Shortcuts.identity([0], 3), "activations.h5")


def test_check_compatible_accepts_maps_on_their_own_rows_and_model(tiny_store, jtc, llama, live):
    with ActivationStore(tiny_store) as store:
        head = check_compatible(jtc, store, same_split=True)
        assert head.fingerprint() == store.head().fingerprint()
        assert check_compatible(jtc, store, head=False) is None
        assert check_compatible(jtc, store, target="any", head=head) is head
    assert check_compatible(jtc, live, same_split=True).fingerprint() == head.fingerprint()  # the same plan's split
    assert check_compatible(jtc, llama[0]).fingerprint() == head.fingerprint()
    assert check_compatible(jtc) is None  # against its own record: it targets the last layer
    assert check_compatible(Shortcuts.identity(range(3), 3), llama[0]) is not None  # the identity fits every model


def test_check_compatible_refuses_each_mismatch(tiny_store, tiny_models, jtc, llama):
    name = jtc.name
    gpt2 = load_model(str(tiny_models["gpt2"]), progress=False)[0]
    cases = [
        (jtc.replace(model_sha256="0" * 64), "store", {},
         rf"shortcuts {name} were fitted on another model \(model_sha256 000000000000…; .*activations\.h5 has "),
        (jtc, gpt2, {}, rf"shortcuts {name} were fitted on another model \(model_sha256 .*; this model has "),
        (jtc.replace(target_layer=2, maps={1: jtc.maps[1]}), "store", {},
         rf"shortcuts {name} target layer 2, not the last layer of .*activations\.h5 \(3\); maps read through"),
        (jtc.replace(target_layer=5), "store", {"target": "any"}, rf"shortcuts {name} target layer 5, not in 1\.\.3"),
        (jtc.replace(maps={1: jtc.maps[1], 3: jtc.maps[1]}), "store", {},
         rf"shortcuts {name} have maps for layers \[3\], outside 0\.\.2"),
        (jtc.replace(maps={1: ShortcutMap(weight=torch.eye(8))}), llama[0], {},
         rf"shortcuts {name} map layer 1 to width 8; this model's is 32"),
        (jtc.replace(provenance={**jtc.provenance, "split_id": "another"}), "store", {"same_split": True},
         rf"shortcuts {name} were fitted under another document split than .*activations\.h5; use the rows"),
        (jtc, llama[0], {"same_split": True}, r"`same_split=True` needs a row source"),
        (jtc.replace(head_sha256="0" * 64), "store", {}, rf"shortcuts {name} were fitted for another head"),
        (jtc.replace(head_description={"norm": "other"}), llama[0], {"model_sha256": jtc.model_sha256},
         rf"shortcuts {name} were fitted for another head \(\{{\"norm\": \"other\"\}}; this model's: "),
        (jtc.replace(stats={**jtc.stats, "n_layers": 5}), None, {},
         rf"shortcuts {name} target layer 3, not the last layer of their model \(5\)"),
        (jtc, None, {"target": "first"}, r"`target` must be one of last, any, not 'first'"),
    ]
    with ActivationStore(tiny_store) as store:
        for maps, source, options, message in cases:
            with pytest.raises(NJTCError, match=message):
                check_compatible(maps, store if source == "store" else source, **options)
    sha = model_sha256(llama[0])  # a model cast since: the hash given, the head compared by its description
    assert check_compatible(jtc.replace(head_sha256="0" * 64), llama[0], model_sha256=sha) is not None
