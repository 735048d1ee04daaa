"""Faults a careless user or a hostile machine brings: a full disk, flipped bytes, two runs at
once, signals. Each must end in one line and a non-zero exit, never a traceback or a store
that says it is complete when it is not."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from conftest import ROOT, run_module
from test_extract import _kill_once_past, _one_line_exit_2

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import output_lock
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.data.store import ActivationStore


def _limited(limit_bytes):
    """A preexec_fn: files may grow to ``limit_bytes``; beyond, writes fail with EFBIG."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def _run_limited(limit_bytes, module, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, preexec_fn=_limited(limit_bytes))


def test_a_file_size_limit_at_creation_is_one_line(tiny_models, tmp_path):
    out = tmp_path / "a.h5"
    result = _run_limited(400_000, "njtc_solve.extract", "--model", str(tiny_models["llama"]), "--seq-len", "32",
                          "--max-tokens", "4096", "--no-progress", "--out", str(out))  # needs about 2.5 MB
    _one_line_exit_2(result, "File too large")
    assert not out.exists() and not (tmp_path / "a.h5.partial").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs (needs the right to mount, as root in this project's sandbox and CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_write_that_fails_mid_run_stops_it_and_resume_finishes(tiny_models, tmp_path, monkeypatch, capsys):
    """The disk refuses a write after 30 batches (a checksummed store claims its space when it is
    created, so a real disk fills up there, before the long pass; this is the same failure later)."""
    from njtc_solve.cli import extract, run_cli

    args = ["--model", str(tiny_models["llama"]), "--seq-len", "16", "--batch-size", "1", "--max-tokens", "1600",
            "--no-progress"]
    out, partial = tmp_path / "a.h5", tmp_path / "a.h5.partial"
    real, calls = h5py.Dataset.write_direct, []

    def failing(self, *args, **kwargs):  # passes everything through to the real write_direct
        calls.append(1)
        if len(calls) > 30 * 4:  # 4 layers a batch
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "write_direct", failing)
    assert run_cli(extract.main, [*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write") and "No space left on device" in err[-1] and "--resume" in err[-1]
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert not out.exists(), "a store that was not fully written must never get its final name"
    with h5py.File(partial, "r") as f:
        assert not f.attrs["complete"] and f.attrs["rows_written"] == 30 * 16
    monkeypatch.setattr(h5py.Dataset, "write_direct", real)
    assert run_cli(extract.main, [*args, "--resume", "--out", str(out)]) == 0
    assert run_cli(extract.main, [*args, "--out", str(tmp_path / "reference.h5")]) == 0
    with h5py.File(out, "r") as a, h5py.File(tmp_path / "reference.h5", "r") as b:
        assert a.attrs["complete"]
        for name in ("tokens", "final_top1", "hidden/0", "hidden/3"):
            assert (a[name][...] == b[name][...]).all(), name


def test_too_little_free_space_is_refused_before_the_work(tiny_models, small_disk):
    result = run_module("njtc_solve.extract", "--model", str(tiny_models["llama"]), "--seq-len", "32",
                        "--max-tokens", "65536", "--no-progress", "--out", str(small_disk / "a.h5"))
    _one_line_exit_2(result, "GB free")
    assert not list(small_disk.iterdir())


def test_a_full_disk_while_writing_the_report_leaves_no_report(tiny_store, tmp_path):
    out = tmp_path / "report"
    result = _run_limited(20_000, "njtc_solve.evaluate", "--store", str(tiny_store), "--shortcuts",
                          "--out", str(out), "--max-rows", "64", "--no-progress")
    _one_line_exit_2(result, "cannot write")
    assert not out.exists() and not list(tmp_path.glob("report*"))


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def test_a_flipped_data_byte_is_a_checksum_error(tiny_store, tmp_path):
    damaged = tmp_path / "damaged.h5"
    shutil.copy(tiny_store, damaged)
    with h5py.File(damaged, "r") as f:
        chunk = f["hidden/2"].id.get_chunk_info(1)
    _flip_byte(damaged, chunk.byte_offset + chunk.size // 2)
    with pytest.raises(NJTCError, match=r"cannot read hidden/2 rows .* the file is damaged"):
        fit_shortcuts(damaged, method="njtc", ranks=[2], layers=[2], progress=False)
    result = run_module("njtc_solve.fit", "--store", str(damaged), "--method", "njtc", "--rank", "2",
                        "--out", str(tmp_path / "o.safetensors"), "--no-progress")
    _one_line_exit_2(result, "the file is damaged")
    assert not list(tmp_path.glob("o.safetensors*"))


def test_a_flipped_split_byte_is_refused_on_opening(tiny_store, tmp_path):
    damaged = tmp_path / "damaged.h5"
    shutil.copy(tiny_store, damaged)
    with h5py.File(damaged, "r") as f:
        chunk = f["split"].id.get_chunk_info(0)
    _flip_byte(damaged, chunk.byte_offset + 10)
    with pytest.raises(NJTCError, match="damaged"):
        ActivationStore(damaged)


def test_a_corrupt_object_header_is_one_line(tiny_store, tmp_path):
    damaged = tmp_path / "damaged.h5"
    shutil.copy(tiny_store, damaged)
    with h5py.File(damaged, "r") as f:
        header = h5py.h5o.get_info(f["hidden/2"].id).addr
    _flip_byte(damaged, header + 20)
    result = run_module("njtc_solve.fit", "--store", str(damaged), "--method", "njtc", "--rank", "2",
                        "--out", str(tmp_path / "o.safetensors"), "--no-progress")
    _one_line_exit_2(result, "damaged")


def test_an_extraction_to_an_output_being_written_refuses(tiny_models, tmp_path):
    out = tmp_path / "a.h5"
    args = ["--model", str(tiny_models["gpt2"]), "--seq-len", "32", "--max-tokens", "2048", "--no-progress",
            "--out", str(out)]
    with output_lock(out):  # another run holds the output
        _one_line_exit_2(run_module("njtc_solve.extract", *args), "being written by another process")
    assert not list(tmp_path.glob("a.h5.partial"))
    assert run_module("njtc_solve.extract", *args).returncode == 0  # released: the next run goes ahead
    with ActivationStore(out) as store:
        assert store.n_rows == 2048
    assert not (tmp_path / "a.h5.lock").exists(), "the lock is released"


def test_the_output_lock_refuses_a_second_holder_and_is_released(tmp_path):
    out = tmp_path / "x.h5"
    with output_lock(out):
        with pytest.raises(NJTCError, match="another process"):
            with output_lock(out):
                pass
    with output_lock(out):  # released on the way out, also after an error
        pass
    with pytest.raises(ValueError), output_lock(out):
        raise ValueError
    with output_lock(out):
        pass


def test_sigterm_during_extraction_says_how_to_resume(tiny_models, tmp_path):
    out = tmp_path / "a.h5"
    cmd = [sys.executable, "-m", "njtc_solve.extract", "--model", str(tiny_models["llama"]), "--seq-len", "16",
           "--batch-size", "1", "--max-tokens", "32000", "--out", str(out)]  # the signal at 5%: ample margin
    percent, code, stderr = _kill_once_past(cmd, dict(os.environ, PYTHONPATH=str(ROOT)), 0.05, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, (percent, stderr[-2000:])
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].endswith("error: interrupted; the partial store is kept: "
                                                    "resume with --resume")
    assert (tmp_path / "a.h5.partial").exists() and not out.exists()


def test_ctrl_c_while_torch_imports_is_one_line(tiny_store, tmp_path):
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc to see the import under way")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "njtc_solve.fit", "--store", str(tiny_store), "--out",
                             str(tmp_path / "o.safetensors")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if "torch" in Path(f"/proc/{proc.pid}/maps").read_text():  # torch's libraries are loading
                break
        except OSError:
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines() == ["error: interrupted"]


def test_resume_with_nothing_to_resume_starts_afresh(tiny_models, tmp_path):
    out = tmp_path / "a.h5"
    result = run_module("njtc_solve.extract", "--model", str(tiny_models["gpt2"]), "--seq-len", "32",
                        "--max-tokens", "1024", "--no-progress", "--resume", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "nothing to resume" in result.stderr and "starting afresh" in result.stderr
    assert "Loading weights" not in result.stderr, "--no-progress silences transformers' bars too"
    with ActivationStore(out) as store:
        assert store.n_rows == 1024


def test_the_report_replaces_only_its_own_files(tiny_store, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "results.json").write_text("old")
    argv = ["--store", str(tiny_store), "--shortcuts", "--out", str(out), "--max-rows", "64", "--no-progress"]
    result = run_module("njtc_solve.evaluate", *argv)  # a results.json it did not write is not replaced (issue 19)
    assert result.returncode == 2 and "holds results.json, which this project did not write" in result.stderr
    assert (out / "results.json").read_text() == "old"
    (out / "results.json").unlink()
    for _ in range(2):  # into a folder of other files, then over its own report
        result = run_module("njtc_solve.evaluate", *argv)
        assert result.returncode == 0, result.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "results.json").read_text() != "old"
    assert not list(tmp_path.glob("results.*"))
    here = tmp_path / "here"
    here.mkdir()
    result = subprocess.run([sys.executable, "-m", "njtc_solve.evaluate", "--store", str(tiny_store), "--shortcuts",
                             "--out", ".", "--max-rows", "64", "--no-progress"], capture_output=True, text=True,
                            cwd=here, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert result.returncode == 0 and (here / "report.md").exists(), result.stderr


def test_no_validation_split_extracts(tiny_models, tmp_path):
    result = run_module("njtc_solve.extract", "--model", str(tiny_models["gpt2"]), "--seq-len", "32",
                        "--max-tokens", "512", "--val-fraction", "0", "--no-progress", "--out", str(tmp_path / "a.h5"))
    assert result.returncode == 0, result.stderr
    with ActivationStore(tmp_path / "a.h5") as store:
        assert store.count("validation") == 0 and len(store.validation_documents) == 0


def test_an_interruption_while_the_store_is_created_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    from njtc_solve.data.corpus import load_corpus
    from njtc_solve.data.extract import extract_activations
    from njtc_solve.core.head import Head
    from njtc_solve.core.models import load_model

    def interrupted(self, group):
        raise KeyboardInterrupt

    monkeypatch.setattr(Head, "write_group", interrupted)
    model, tok, _ = load_model(str(tiny_models["gpt2"]))
    with pytest.raises(KeyboardInterrupt):
        extract_activations(model, tok, load_corpus()[1], tmp_path / "a.h5", seq_len=32, max_tokens=512,
                            progress=False)
    assert not list(tmp_path.iterdir()), "a half-created store must not look resumable"


def test_a_multi_line_hdf5_write_error_is_reported_on_one_line():
    from njtc_solve.core.outputs import write_failure as _write_failure

    err = OSError("Can't synchronously write data (file write failed: time = now\n, filename = 'a.h5', "
                  "file descriptor = 4, errno = 28, error message = 'No space left on device', buf = 0x1)")
    assert _write_failure(err) == "No space left on device"
    assert _write_failure(OSError("two\nlines")) == "two"
    assert _write_failure(ValueError("a shape mismatch")) is None


def test_the_store_writer_holds_the_lock_and_ends_as_extraction_needs(tiny_models, tmp_path):
    """An interruption keeps the partial file to resume, a failed check removes it, the lock is held
    throughout, and a command's reservation of the output is the writer's own hold."""
    from njtc_solve.data.capture import forward_batches
    from njtc_solve.data.corpus import load_corpus
    from njtc_solve.core.head import Head
    from njtc_solve.core.models import load_model
    from njtc_solve.data.plan import plan_extraction
    from njtc_solve.data.store_writer import StoreWriter

    model, tok, _ = load_model(str(tiny_models["llama"]))
    docs = load_corpus()[1]
    plan = plan_extraction(tok, docs, seq_len=16, max_tokens=256)
    provenance = {"model": "tiny", "architecture": "llama", "n_layers": 3, "corpus": "", "corpus_sha256": "",
                  "model_sha256": "", "seed": 0, "val_fraction": 0.25, "max_tokens": 256, "n_documents": len(docs)}
    out, partial, lock = tmp_path / "a.h5", tmp_path / "a.h5.partial", tmp_path / "a.h5.lock"

    def writer(**kwargs):
        return StoreWriter(out, plan, Head.from_model(model), provenance=provenance, batch_size=2, **kwargs)

    with pytest.raises(KeyboardInterrupt), writer() as w:
        with pytest.raises(NJTCError, match="another process"), output_lock(out):
            pass
        batch = next(forward_batches(model, plan, 2))
        w.write(batch.rows, batch.hidden, batch.tokens, batch.logits)
        raise KeyboardInterrupt
    assert partial.exists() and not lock.exists() and not out.exists()
    with pytest.raises(NJTCError, match="is left from an interrupted run; pass `resume=True` or `overwrite=True`"):
        writer()
    with pytest.raises(NJTCError, match="stop"), writer(resume=True) as w:
        assert w.rows_written == 2 * 16 and w.head_checked is False
        raise NJTCError("stop")  # a failed check: nothing to resume
    assert not partial.exists() and not lock.exists()
    with StoreWriter.reserve(out) as reserved, writer() as w:  # a command's hold, then the writer's
        for batch in forward_batches(model, plan, 2):
            w.write(batch.rows, batch.hidden, batch.tokens, batch.logits)
        assert w.finish() == out == reserved
        with pytest.raises(NJTCError, match="another process"), output_lock(out):
            pass  # still the reservation's
    assert not lock.exists()
    with ActivationStore(out) as store:
        assert store.n_rows == plan.n_rows and store.attrs["head_check_top1_agreement"] == 1.0
