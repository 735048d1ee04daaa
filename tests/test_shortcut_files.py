"""Shortcut files: every disagreement between metadata and tensors is refused on load, and a
failed write (full disk) is one line that leaves neither a final nor a temporary file."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, benchmark_module, run_module
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from test_extract import _one_line_exit_2

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import atomic_output
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts
from njtc_solve.data.store import ActivationStore


def _narrow(path):
    """A valid rank-2 file (d = 4) with one map, for layer 1."""
    g = torch.Generator().manual_seed(0)
    m = ShortcutMap(U=torch.randn(4, 2, generator=g), V=torch.randn(2, 4, generator=g), bias=torch.randn(4, generator=g))
    Shortcuts("njtc", {1: m}, target_layer=3, model_sha256="x", rank=2).save(path)
    return path


def _tamper(path, meta=None, tensors=None):
    """Rewrite ``path`` with metadata and tensors changed (a value of None removes the entry)."""
    with safe_open(str(path), "pt") as f:
        old_meta, old = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    new_meta = {k: v for k, v in {**old_meta, **(meta or {})}.items() if v is not None}
    new = {k: v for k, v in {**old, **(tensors or {})}.items() if v is not None}
    save_file(new, str(path), metadata=new_meta)
    return path


NO_UV = {"layers.1.U": None, "layers.1.V": None}
CASES = {  # name: (metadata changes, tensor changes, what the message says)
    "layer without tensors": ({"layers": "[1, 2]"}, None, "layer 2 is listed in its metadata but has no tensors"),
    "tensor of an unlisted layer": (None, {"layers.5.bias": torch.zeros(4)}, "layers.5.bias is for a layer"),
    "unexpected tensor": (None, {"extra": torch.zeros(4)}, "unexpected tensor 'extra'"),
    "layers not JSON": ({"layers": "[1,"}, None, "metadata layers='[1,' is not a JSON list"),
    "layers not ints": ({"layers": '["1"]'}, None, "is not a JSON list of distinct layer numbers"),
    "layers missing": ({"layers": None}, None, "its metadata has no 'layers'"),
    "rank edited": ({"rank": "16"}, None, "layers.1.U has shape (4, 2), not 4 × 16 (d=4 from layers.1.U, r=16 from its metadata's rank)"),
    "rank not a number": ({"rank": "abc"}, None, "metadata rank='abc' is not \"none\" or a positive integer"),
    "rank none with U, V": ({"rank": "none"}, None, "rank=none and normalize=none need weight"),
    "rank with a full map": (None, {**NO_UV, "layers.1.weight": torch.eye(4)}, "has bias, weight; rank=2"),
    "U without V": (None, {"layers.1.V": None}, "need U, V"),
    "U of the wrong width": (None, {"layers.1.U": torch.zeros(3, 2)}, "has shape (2, 4), not 2 × 3 (d=3 from layers.1.U, r=2"),
    "V of the wrong rank": (None, {"layers.1.V": torch.zeros(3, 4)}, "layers.1.V has shape (3, 4), not 2 × 4"),
    "V of the wrong width": (None, {"layers.1.V": torch.zeros(2, 5)}, "layers.1.V has shape (2, 5), not 2 × 4"),
    "U one-dimensional": (None, {"layers.1.U": torch.zeros(4)}, "layers.1.U has shape (4,), not d × 2"),
    "bias of the wrong width": (None, {"layers.1.bias": torch.zeros(5)}, "layers.1.bias has shape (5,), not 4 (d=4 from layers.1.U)"),
    "weight not square": ({"rank": "none"}, {**NO_UV, "layers.1.weight": torch.zeros(4, 5)},
                          "has shape (4, 5), not 4 × 4"),
    "normalize unknown": ({"normalize": "group"}, None, "metadata normalize='group' is not none, batch, layer or rms"),
    "batch without its tensors": ({"normalize": "batch"}, None, "need U, V, norm_mean, norm_scale"),
    "norm tensors without batch": (None, {"layers.1.norm_mean": torch.zeros(4), "layers.1.norm_scale": torch.ones(4)},
                                   "rank=2 and normalize=none need U, V"),
    "norm_scale of the wrong width": ({"normalize": "batch"}, {"layers.1.norm_mean": torch.zeros(4),
                                                               "layers.1.norm_scale": torch.ones(3)},
                                      "layers.1.norm_scale has shape (3,), not 4"),
    "residual not a boolean": ({"residual": "yes"}, None, "metadata residual='yes' is not true or false"),
    "fit_intercept not a boolean": ({"fit_intercept": "1"}, None, "metadata fit_intercept='1' is not true or false"),
    "target_layer not an int": ({"target_layer": "last"}, None, "metadata target_layer='last' is not an integer"),
    "alpha not a number": ({"alpha": "small"}, None, "metadata alpha='small' is not a non-negative number or \"auto\""),
    "alpha not finite": ({"alpha": "nan"}, None, "metadata alpha='nan'"),
    "stats not JSON": ({"stats": "{"}, None, "metadata stats='{' is not a JSON object"),
    "provenance not an object": ({"provenance": "[1]"}, None, "metadata provenance='[1]' is not a JSON object"),
    "method missing": ({"method": None}, None, "its metadata has no 'method'"),
    "format_version not a number": ({"format_version": "one"}, None, "metadata format_version='one' is not an integer"),
    "format_version 3": ({"format_version": "3"}, None, "has shortcut format version 3"),
    "format_version 2 without one_jump": ({"format_version": "2"}, None, "its metadata has no 'one_jump'"),
    "bias not finite": (None, {"layers.1.bias": torch.tensor([0.0, float("nan"), 0.0, 0.0])},
                        "layers.1.bias is not finite float32"),
    "bias not float32": (None, {"layers.1.bias": torch.zeros(4, dtype=torch.float64)}, "layers.1.bias is not finite"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_file_that_disagrees_with_itself_is_refused_on_one_line(tmp_path, case):
    meta, tensors, message = CASES[case]
    path = _tamper(_narrow(tmp_path / "sc.safetensors"), meta, tensors)
    with pytest.raises(NJTCError) as err:
        Shortcuts.load(path)
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value), err.value


def test_files_the_library_writes_still_load(tmp_path):
    narrow = Shortcuts.load(_narrow(tmp_path / "narrow.safetensors"))
    assert (narrow.name, narrow.rank, sorted(narrow.maps), tuple(narrow.maps[1].U.shape)) == ("njtc-r2", 2, [1], (4, 2))
    full = Shortcuts("jtc", {0: ShortcutMap(weight=torch.eye(4)), 2: ShortcutMap(weight=torch.eye(4))}, 3,
                     fit_intercept=False, alpha="auto", stats={"layers": {"0": {"alpha": 1.0}}})
    full.save(tmp_path / "full.safetensors")
    again = Shortcuts.load(tmp_path / "full.safetensors")
    assert (again.name, again.rank, again.alpha, again.fit_intercept, again.stats) == (
        "jtc", None, "auto", False, {"layers": {"0": {"alpha": 1.0}}})
    trained = benchmark_module("gradient").GradientShortcut(4, rank=2, batch_norm=True).to_shortcut_map()  # as gradient.as_shortcuts wraps it
    Shortcuts("nnjtc", {1: trained}, 3, model_sha256="x", rank=2, normalize="batch", label="nnjtc-adam").save(tmp_path / "adam.safetensors")
    adam = Shortcuts.load(tmp_path / "adam.safetensors")
    x = torch.randn(5, 4)
    assert adam.name == "nnjtc-adam" and torch.equal(adam.transform_hidden(x, 1), trained.predict(x))


def test_a_fit_with_fewer_directions_than_its_rank_saves_a_file_that_loads(tiny_store, tmp_path):
    [sc] = fit_shortcuts(tiny_store, method="nnjtc", ranks=[32], layers=[1], normalize="layer", progress=False)
    # LayerNorm outputs span d - 1 = 31 directions: the 32nd is zero, so U keeps its rank's shape
    assert sc.maps[1].rank == 32 and not sc.maps[1].U[:, 31].any() and sc.maps[1].U[:, 30].any()
    [full] = fit_shortcuts(tiny_store, method="jtc", ranks=None, layers=[1], normalize="layer", progress=False)
    torch.testing.assert_close(sc.maps[1].U @ sc.maps[1].V, full.maps[1].weight, rtol=1e-4, atol=1e-4)
    sc.save(tmp_path / "sc.safetensors")
    loaded = Shortcuts.load(tmp_path / "sc.safetensors")
    with ActivationStore(tiny_store) as store:
        x = store.file["hidden/1"][:20]
    assert loaded.name == "nnjtc-layer-r32" and loaded.maps[1].rank == 32
    torch.testing.assert_close(loaded.transform_hidden(x, 1), sc.transform_hidden(x, 1))


def test_evaluate_refuses_an_inconsistent_file_on_one_line(tiny_store, tmp_path):
    [sc] = fit_shortcuts(tiny_store, method="njtc", ranks=[2], layers=[1], progress=False)
    sc.save(tmp_path / "bad.safetensors")  # layer 2 listed without tensors was scored as the identity map
    bad = _tamper(tmp_path / "bad.safetensors", {"layers": "[1, 2]"})
    result = run_module("njtc_solve.evaluate", "--store", str(tiny_store), "--shortcuts", str(bad),
                        "--out", str(tmp_path / "report"))
    _one_line_exit_2(result, "layer 2 is listed in its metadata but has no tensors")


def _limit_file_size(n):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    return limit


def test_a_full_disk_is_one_line_and_leaves_no_file(tiny_store, tmp_path):
    out = tmp_path / "jtc.safetensors"  # about 15 KB from the tiny store: larger than the limit
    result = subprocess.run([sys.executable, "-m", "njtc_solve.fit", "--store", str(tiny_store), "--method", "jtc",
                             "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, preexec_fn=_limit_file_size(8000))
    _one_line_exit_2(result, f"cannot write {out}: File too large")
    assert list(tmp_path.iterdir()) == []  # neither jtc.safetensors nor jtc.safetensors.partial


@pytest.mark.parametrize("failure, reason", [
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "No space left on device (os error 28)"),
    (SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                     'on device" })'), "No space left on device"),  # safetensors < 0.5
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (ValueError("a bug, not a failure to write"), None),
], ids=["safetensors", "safetensors<0.5", "OSError", "other error"])
def test_a_failed_write_keeps_the_old_file_and_removes_the_partial_one(tmp_path, failure, reason):
    path = tmp_path / "out.safetensors"
    path.write_text("previous")
    with pytest.raises(NJTCError if reason else type(failure)) as err:
        with atomic_output(path) as tmp:
            tmp.write_text("half")
            raise failure
    if reason:
        assert str(err.value) == f"cannot write {path}: {reason}"
    assert path.read_text() == "previous" and sorted(tmp_path.iterdir()) == [path]
