"""The one I/O module: nothing lost, nothing silently different.

An output never replaces nor goes inside an input (a dataset's own files, a model folder, a
statistics file), a file this project did not write is never replaced (``--overwrite`` or not),
the user's own files in an output folder this project wrote are kept when it is written again,
a writer refuses what would not be finite in the dtype it writes, a reader refuses what is not
finite, and the package imports where ``fcntl`` does not exist (Windows).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from njtc_solve.cli import run_cli
from njtc_solve.core.errors import NJTCError
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts

D, L = 32, 3


def _run(capsys, main, argv) -> tuple[int, str]:
    code = run_cli(main, [str(a) for a in argv])
    return code, capsys.readouterr().err


def test_the_package_imports_and_locks_without_fcntl(tmp_path):
    """A meta-path blocker makes ``import fcntl`` fail, as on Windows: the package still imports, and
    the output lock still refuses a second holder."""
    script = textwrap.dedent(f"""
        import sys, warnings
        warnings.simplefilter("ignore")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fcntl":
                    raise ImportError("no fcntl here")
        sys.modules.pop("fcntl", None)
        sys.meta_path.insert(0, Block())
        import njtc_solve, njtc_solve.core.errors, njtc_solve.core.outputs, njtc_solve.data.store_writer
        from njtc_solve.core.errors import NJTCError
        from njtc_solve.core.outputs import output_lock
        with output_lock({str(tmp_path / 'a.h5')!r}):
            try:
                with output_lock({str(tmp_path / 'a.h5')!r}):
                    print("admitted")
            except NJTCError:
                print("refused")
        print("fcntl" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["refused", "False"], done.stdout


def _jtc(scale: float = 0.3) -> Shortcuts:
    g = torch.Generator().manual_seed(0)
    maps = {l: ShortcutMap(weight=torch.eye(D) + scale * torch.randn(D, D, generator=g)) for l in range(L)}
    return Shortcuts("jtc", maps, L, model_sha256="x", fit_intercept=False)


def test_jacobian_lens_export_never_replaces_a_lens_it_did_not_write(tmp_path):
    from njtc_solve.maps.jacobian_lens import export_jacobian_lens

    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "lens.pt").write_bytes(b"someone else's lens")
    with pytest.raises(NJTCError, match="lens.pt, which this project did not write"):
        export_jacobian_lens(_jtc(), folder, overwrite=True)
    assert (folder / "lens.pt").read_bytes() == b"someone else's lens"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]  # no temporary folder left


def test_export_refuses_what_float16_cannot_hold(tmp_path):
    from njtc_solve.maps.jacobian_lens import export_jacobian_lens

    big = _jtc(scale=1e5)
    with pytest.raises(NJTCError, match=r"is not finite float16 \(beyond its range"):
        export_jacobian_lens(big, tmp_path / "jlens", dtype=torch.float16)
    assert not (tmp_path / "jlens").exists()
    export_jacobian_lens(big, tmp_path / "jlens", dtype=torch.float32)  # float32 holds it


def test_a_reader_refuses_non_finite_values(tmp_path):
    jtc = _jtc()
    jtc.save(tmp_path / "a.safetensors")
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = load_file(tmp_path / "a.safetensors")
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(NJTCError, match="finite"):  # refused before this work too, by the shortcut reader
        Shortcuts.load(tmp_path / "bad.safetensors")


def test_save_pretrained_again_keeps_the_users_notes(tmp_path):
    folder = _jtc().save_pretrained(tmp_path / "maps")
    (folder / "notes.md").write_text("my notes")
    _jtc(scale=0.2).save_pretrained(folder, overwrite=True)
    assert (folder / "notes.md").read_text() == "my notes"
    assert Shortcuts.from_pretrained(folder).name == "jtc"
    assert json.loads((folder / "config.json").read_text())["written_files"] == [
        "README.md", "config.json", "shortcuts.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]


@pytest.fixture(scope="module")
def pruned(tiny_models, tmp_path_factory):
    """A folder written by prune, and the arguments that wrote it."""
    from njtc_solve.cli.prune import main

    out = tmp_path_factory.mktemp("prune") / "pruned"
    argv = ["--model", tiny_models["llama"], "--remove", "1", "--start", "1", "--seq-len", "32", "--max-tokens",
            "1200", "--score-tokens", "64", "--no-progress"]
    assert run_cli(main, [str(a) for a in argv + ["--out", out]]) == 0
    return out, argv


def test_prune_again_keeps_the_users_files_and_a_statistics_file_inside(pruned, capsys):
    from njtc_solve.cli.prune import main

    out, argv = pruned
    (out / "notes.txt").write_text("mine")
    stats = out / "stats.safetensors"
    code, err = _run(capsys, main, argv + ["--out", out, "--overwrite", "--save-stats", stats])
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert stats.is_file(), "the statistics file the command reported written is there"
    record = json.loads((out / "njtc_prune.json").read_text())
    assert "notes.txt" not in record["written_files"] and "stats.safetensors" not in record["written_files"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def test_prune_refuses_one_path_for_two_outputs_before_the_model_loads(pruned, tmp_path, capsys, monkeypatch):
    from njtc_solve.cli import prune as command

    _, argv = pruned
    monkeypatch.setattr(command, "load_model_from_args", lambda *a, **k: pytest.fail("the model loaded"))
    code, err = _run(capsys, command.main, argv + ["--out", tmp_path / "x", "--save-stats", tmp_path / "x"])
    assert code == 2 and "two outputs are one file" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def _saved_dataset(folder: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": [f"document number {i} says something." for i in range(40)]}).save_to_disk(
        str(folder))
    return next(folder.glob("*.arrow"))


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_extract_never_writes_over_or_into_its_dataset(tiny_models, tmp_path, capsys, kind):
    """``extract --corpus DATA[:N] --out <one of the dataset's own files> --overwrite`` is refused and the
    dataset's file is byte for byte what it was."""
    from njtc_solve.cli.extract import main

    if kind == "folder":
        corpus = tmp_path / "data"
        target = _saved_dataset(corpus)
    else:
        pytest.importorskip("datasets")
        import datasets

        target = corpus = tmp_path / "data.parquet"
        datasets.Dataset.from_dict({"text": ["a document."] * 40}).to_parquet(str(corpus))
    before = target.read_bytes()
    capsys.readouterr()  # the dataset's own progress bars
    code, err = _run(capsys, main, ["--model", tiny_models["llama"], "--corpus", f"{corpus}[:30]", "--out", target,
                                    "--overwrite", "--seq-len", "8", "--no-progress"])
    assert code == 2 and err.count("\n") == 1 and "--corpus" in err, err
    assert target.read_bytes() == before
