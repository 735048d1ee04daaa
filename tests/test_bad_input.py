"""Bad input on every command: exit 2, one line, inputs untouched, no output left (issue 19).

Each test runs commands in-process through ``run_cli(main, argv)`` and checks, for every case:
the exit status is 2, stderr is one ``error:`` line without a traceback, every input file is
byte-identical afterwards (hashed before and after) and no output (nor a ``.partial``) is left.
A model that does not exist (``/nonexistent/model``) shows that a check ran before the model
would load: had it loaded, the error would be about the model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from safetensors.torch import load_file, save_file

from njtc_solve.cli import evaluate, export, extract, fit, lens, refine, run_cli
from njtc_solve.core.errors import NJTCError
from njtc_solve.maps.tuned_lens import export_tuned_lens
from njtc_solve.data.extract import extract_activations
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.data.store import ActivationStore

from conftest import ROOT

NO_MODEL = "/nonexistent/model"  # loading it would fail with another message


def _digest(path: Path) -> str:
    """sha256 of a file, or of every file under a folder (names included)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def refused(capsys, main, argv, match, inputs=(), outputs=()):
    """Run ``main(argv)``; assert exit 2, one error line matching ``match``, inputs unchanged, no output."""
    before = {p: _digest(p) for p in inputs}
    capsys.readouterr()
    code = run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(match, lines[0]), lines[0]
    if os.environ.get("NJTC_SHOW_MESSAGES"):  # the list of cases and messages in the closing note
        print(lines[0], file=sys.__stderr__)
    for p, digest in before.items():
        assert _digest(p) == digest, f"{p} changed"
    for p in outputs:
        p = Path(p)
        assert not p.exists() and not p.with_name(p.name + ".partial").exists(), f"{p} was left"
    return lines[0]


@pytest.fixture(scope="module")
def files(tiny_store, tiny_models, tmp_path_factory):
    """A fitted JTC file, its statistics (with the head) and a tuned-lens folder exported from it."""
    root = tmp_path_factory.mktemp("bad-input")
    [jtc] = fit_shortcuts(tiny_store, method="jtc", ranks=None, progress=False, save_stats=root / "stats.safetensors")
    jtc.save(root / "jtc.safetensors")
    [skip0] = fit_shortcuts(tiny_store, method="jtc", ranks=None, layers=[1], progress=False, skip_positions=0)
    skip0.save(root / "jtc-skip0.safetensors")
    export_tuned_lens(jtc, root / "lens")
    return {"root": root, "jtc": root / "jtc.safetensors", "stats": root / "stats.safetensors",
            "skip0": root / "jtc-skip0.safetensors", "lens": root / "lens", "store": tiny_store,
            "model": tiny_models["llama"]}


def test_an_output_never_destroys_an_input_or_a_file_it_did_not_write(files, capsys, tmp_path):
    stats, jtc, store = files["stats"], files["jtc"], files["store"]
    # fit --stats S --out S: the statistics would have become a shortcut file
    refused(capsys, fit.main, ["--stats", stats, "--method", "njtc", "--rank", "2", "--out", stats],
            r"--out .*stats\.safetensors is --stats .*: an output never replaces an input", [stats])
    # the same file under another name: a symbolic link and a hard link are the same inode
    (tmp_path / "link.safetensors").symlink_to(stats)
    os.link(stats, tmp_path / "hard.safetensors")
    for alias in ("link.safetensors", "hard.safetensors"):
        refused(capsys, fit.main, ["--stats", stats, "--method", "njtc", "--rank", "2", "--out", tmp_path / alias],
                "an output never replaces an input", [stats])
    # fit --save-stats X --out X: two outputs in one file
    out = tmp_path / "x.safetensors"
    refused(capsys, fit.main, ["--store", store, "--method", "jtc", "--save-stats", out, "--out", out, "--no-progress"],
            "two outputs are one file", [store], [out])
    # one rank twice: the flag at fault is --rank (its two files would share one name)
    refused(capsys, fit.main, ["--stats", stats, "--method", "njtc", "--rank", "2,2", "--out", tmp_path / "n.safetensors"],
            r"--rank lists 2 more than once; give each rank once", [stats])
    # a store, a shortcut file as the output of the command that reads them
    refused(capsys, fit.main, ["--store", store, "--method", "jtc", "--out", store, "--no-progress"],
            "is --store", [store])
    refused(capsys, refine.main, ["--shortcuts", jtc, "--store", store, "--out", jtc, "--no-progress"],
            "is --shortcuts", [jtc, store])
    # ... or through the temporary file it is written through
    partial = tmp_path / "y.safetensors.partial"
    shutil.copy(jtc, partial)
    refused(capsys, refine.main, ["--shortcuts", partial, "--store", store, "--out", tmp_path / "y.safetensors"],
            r"written through y\.safetensors\.partial", [partial])
    # a file of another kind the project wrote, or one it did not write, is never replaced
    refused(capsys, fit.main, ["--store", store, "--method", "jtc", "--out", stats, "--no-progress"],
            "exists and is not a shortcut file this project wrote", [stats, store])
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    refused(capsys, fit.main, ["--store", store, "--method", "jtc", "--save-stats", notes,
                               "--out", tmp_path / "z.safetensors"],
            "--save-stats .*notes.txt exists and is not a statistics file", [notes], [tmp_path / "z.safetensors"])
    # export into a Hugging Face model folder: its config.json is not ours
    model_copy = tmp_path / "model"
    shutil.copytree(files["model"], model_copy)
    refused(capsys, export.main, ["--format", "tuned-lens", "--shortcuts", jtc, "--out", model_copy],
            "holds config.json, which this project did not write and never replaces; move it away or choose another --out", [model_copy, jtc],
            [model_copy / "params.pt"])
    # lens and evaluate into a folder holding someone's file of the name they write
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("# my report\n")
    (mine / "trajectory.csv").write_text("a,b\n")
    refused(capsys, evaluate.main, ["--store", store, "--shortcuts", jtc, "--out", mine, "--no-progress"],
            "holds report.md, which this project did not write", [mine, jtc, store])
    refused(capsys, lens.main, ["--model", NO_MODEL, "--prompt", "x", "--out", mine],
            "holds trajectory.csv, which this project did not write", [mine])
    # an input inside the folder evaluation replaces as a whole (its temporary folder)
    temporary = tmp_path / "report.partial"
    temporary.mkdir()
    shutil.copy(jtc, temporary / "jtc.safetensors")
    refused(capsys, evaluate.main, ["--store", store, "--shortcuts", temporary / "jtc.safetensors",
                                    "--out", tmp_path / "report", "--no-progress"],
            "would replace the folder .*report.partial", [temporary])
    # extraction over its own corpus, even with --overwrite
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one document\nanother document\n")
    refused(capsys, extract.main, ["--model", NO_MODEL, "--corpus", corpus, "--out", corpus, "--overwrite"],
            "is --corpus", [corpus])


def _variant(src: Path, dst: Path, change) -> Path:
    """A copy of the statistics file ``src`` with ``change(tensors, meta)`` applied."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(src)
    change(tensors, meta)
    save_file(tensors, dst, metadata=meta)
    return dst


def test_every_file_read_is_validated_naming_the_file_the_entry_and_the_shapes(files, capsys, tmp_path):
    stats = files["stats"]
    cases = {  # name: (change, message)
        "wrong-shape": (lambda t, m: t.update({"layers.1.cxy": t["layers.1.cxy"][:, :16].contiguous()}),
                        r"layers\.1\.cxy has shape \(32, 16\), expected \(32, 32\)"),
        "no-cyy": (lambda t, m: t.pop("cyy"), "it has no tensor cyy"),
        "no-input-norm": (lambda t, m: m.pop("input_norm"), "its metadata has no 'input_norm'"),
        "n-zero": (lambda t, m: t.update({"n": torch.zeros(1, dtype=torch.float64)}), "n = 0: it holds no rows"),
        "nan": (lambda t, m: t["layers.2.cxx"].__setitem__((0, 0), float("nan")), r"layers\.2\.cxx is not finite float64"),
        "meta-not-object": (lambda t, m: m.update({"meta": "[1, 2]"}), "metadata meta is not a JSON object"),
        "head-width": (lambda t, m: t.update({k: v[..., :16].contiguous() for k, v in t.items()
                                               if k in ("head.unembed", "head.norm_weight", "head.norm_bias")}),
                       r"head\.unembed has width 16, expected the statistics' 32"),
        "head-inconsistent": (lambda t, m: t.update({"head.norm_weight": torch.ones(16)}),
                              r"the head's norm_weight has shape \(16,\), not \(32,\)"),
        "stray-tensor": (lambda t, m: t.update({"layers.x.cxx": torch.zeros(1)}), "unexpected tensor layers.x.cxx"),
    }
    for name, (change, message) in cases.items():
        bad = _variant(stats, tmp_path / f"{name}.safetensors", change)
        out = tmp_path / f"{name}-out.safetensors"
        line = refused(capsys, fit.main, ["--stats", bad, "--method", "njtc", "--rank", "2", "--out", out],
                       message, [bad], [out])
        assert str(bad) in line, "the message names the file"
    # tuned-lens folders: read before any store or model
    cases = {
        "non-tensor": (lambda d: torch.save({**torch.load(d / "params.pt"), "0.weight": [1.0, 2.0]}, d / "params.pt"),
                       r"params\.pt entry 0\.weight is a list, not a tensor"),
        "bias-shape": (lambda d: torch.save({**torch.load(d / "params.pt"), "1.bias": torch.zeros(5)}, d / "params.pt"),
                       r"params\.pt entry 1\.bias has shape \(5,\), expected \(32,\)"),
        "weight-shape": (lambda d: torch.save({**torch.load(d / "params.pt"), "2.weight": torch.zeros(32, 8)},
                                              d / "params.pt"), r"2\.weight has shape \(32, 8\), expected \(32, 32\)"),
        "sidecar-list": (lambda d: (d / "njtc.json").write_text("[1, 2]"), "njtc.json is not a JSON object"),
        "config-list": (lambda d: (d / "config.json").write_text("[]"), "config.json holds a JSON list, not an object"),
        "pickle": (lambda d: (d / "params.pt").write_bytes(b"not a zip"), r"params\.pt cannot be read"),
    }
    for name, (change, message) in cases.items():
        folder = tmp_path / f"lens-{name}"
        shutil.copytree(files["lens"], folder)
        change(folder)
        report = tmp_path / f"report-{name}"
        line = refused(capsys, evaluate.main, ["--store", files["store"], "--shortcuts", "--tuned-lens", folder,
                                               "--out", report, "--no-progress"], message, [folder], [report])
        assert str(folder) in line
        refused(capsys, lens.main, ["--model", NO_MODEL, "--tuned-lens", folder, "--prompt", "x"], message, [folder])


def test_checks_run_before_the_long_work_and_before_the_model_loads(files, capsys, tmp_path, monkeypatch):
    jtc = files["jtc"]
    # --top-k above the vocabulary the maps record
    refused(capsys, lens.main, ["--model", NO_MODEL, "--shortcuts", jtc, "--prompt", "x", "--top-k", "100000"],
            r"--top-k 100000 is above the vocabulary .*\(\d+ tokens\)", [jtc])
    # a prompt that is not UTF-8: from a file, or as undecodable bytes on the command line
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"caf\xe9 \xff\xfe")
    refused(capsys, lens.main, ["--model", NO_MODEL, "--prompt-file", prompt], "is not UTF-8 text", [prompt])
    refused(capsys, lens.main, ["--model", NO_MODEL, "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")],
            "--prompt is not UTF-8 text")
    refused(capsys, lens.main, ["--model", NO_MODEL, "--prompt-file", tmp_path / "missing.txt"], "not found")
    # a live plan that cannot work: refused before the model loads
    for command in (fit.main, evaluate.main, extract.main):
        out = tmp_path / "live-out"
        refused(capsys, command, ["--model", NO_MODEL, "--seq-len", "1", "--out", out],
                "--seq-len must be at least 2", outputs=[out])
    refused(capsys, fit.main, ["--model", NO_MODEL, "--val-fraction", "1.5", "--out", tmp_path / "o.safetensors"],
            r"--val-fraction must be in \[0, 1\)")
    refused(capsys, extract.main, ["--model", NO_MODEL, "--seed", "-1", "--out", tmp_path / "a.h5"],
            "--seed must be 0 or more")
    for command in (fit.main, evaluate.main, refine.main, lens.main):
        argv = {lens.main: ["--prompt", "x"], refine.main: ["--shortcuts", jtc, "--out", tmp_path / "r.safetensors"]}
        refused(capsys, command, ["--model", NO_MODEL, "--device", "gpu0"] + argv.get(command, []),
                "--device 'gpu0' is not a device")
    # an output folder that cannot be written, before the model loads (a read-only file system,
    # as root sees one: os.access says yes to root, so the check creates a file)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_open = os.open

    def no_write(path, flags, *args):
        if Path(path).parent == read_only and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_write)
    refused(capsys, lens.main, ["--model", NO_MODEL, "--prompt", "x", "--out", read_only / "lens"],
            r"cannot write .*read-only/lens: folder .*read-only is not writable \(Read-only file system\)")
    refused(capsys, export.main, ["--format", "tuned-lens", "--shortcuts", jtc, "--model", NO_MODEL,
                                  "--out", read_only], "is not writable", [jtc])
    refused(capsys, fit.main, ["--stats", files["stats"], "--method", "njtc", "--rank", "2",
                               "--out", read_only / "x.safetensors"], "is not writable", [files["stats"]])
    refused(capsys, extract.main, ["--model", NO_MODEL, "--out", read_only / "a.h5"],
            r"cannot write .*a\.h5: .*Read-only file system")
    refused(capsys, extract.main, ["--model", NO_MODEL, "--out", jtc], r"jtc\.safetensors exists; pass --overwrite",
            [jtc])
    monkeypatch.undo()
    if os.geteuid() != 0:  # a folder without write permission, where that binds
        read_only.chmod(0o555)
        try:
            refused(capsys, lens.main, ["--model", NO_MODEL, "--prompt", "x", "--out", read_only],
                    "is not writable")
        finally:
            read_only.chmod(0o755)


def _hold_open(path: Path):
    """A process that holds ``path`` open for writing, as an HDF5 writer does, until killed."""
    code = ("import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "open"
    return proc


def test_no_false_success(files, capsys, tmp_path):
    jtc, store = files["jtc"], files["store"]
    out = tmp_path / "refined.safetensors"
    # non-finite or absurd settings are refused, not "converged"
    for lr in ("inf", "nan", "-1", "0"):
        refused(capsys, refine.main, ["--shortcuts", jtc, "--store", store, "--lr", lr, "--out", out],
                "--lr must be a positive finite number", [jtc, store], [out])
    # a run in which no layer improved writes nothing and says so
    refused(capsys, refine.main, ["--shortcuts", jtc, "--store", store, "--lr", "1e30", "--steps", "4",
                                  "--check-every", "2", "--layers", "1", "--out", out, "--no-progress"],
            r"no layer improved on its held-out kl in \d+ steps .*nothing was written", [jtc, store], [out])
    # maps fitted on other positions than those evaluated
    report = tmp_path / "report"
    refused(capsys, evaluate.main, ["--store", store, "--shortcuts", files["skip0"], "--out", report, "--no-progress"],
            r"fitted leaving out positions < 0, and this evaluation leaves out positions < 1; evaluate it with "
            "--skip-positions 0", [files["skip0"], store], [report])
    # a store another process is writing is not "corrupt"
    busy = tmp_path / "busy.h5"
    shutil.copy(store, busy)
    holder = _hold_open(busy)
    try:
        line = refused(capsys, evaluate.main, ["--store", busy, "--shortcuts", jtc, "--out", report, "--no-progress"],
                       "is being written by another process", [jtc], [report])
        assert "corrupt" not in line
    finally:
        holder.kill()
        holder.wait()
    shutil.copy(store, tmp_path / "being.h5.partial")  # extract writes OUT.partial, then renames it
    refused(capsys, fit.main, ["--store", tmp_path / "being.h5", "--method", "jtc", "--out", out, "--no-progress"],
            r"being\.h5\.partial is being written by extract", outputs=[out])


def test_refine_says_when_its_check_rows_overlap_evaluation(files, capsys, tmp_path):
    """Not a refusal: refine and evaluate say so (and the report records it)."""
    out = tmp_path / "jtc-kl.safetensors"
    code = run_cli(refine.main, [str(a) for a in ["--shortcuts", files["jtc"], "--store", files["store"], "--steps", "4",
                                                  "--check-every", "2", "--layers", "1", "--lr", "1e-3",
                                                  "--check-rows", "1000000", "--out", out, "--no-progress"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: early stopping used all" in captured.err and "layers refined" in captured.out
    code = run_cli(evaluate.main, [str(a) for a in ["--store", files["store"], "--shortcuts", out, "--layers", "1",
                                                    "--out", tmp_path / "report", "--no-progress"]])
    captured = capsys.readouterr()
    assert code == 0 and "they overlap, so its figures are not fully held out" in captured.err
    meta = json.loads((tmp_path / "report" / "results.json").read_text())["meta"]
    assert len(meta["warnings"]) == 1


def _drop_a_chunk(src: Path, dst: Path, dataset: str) -> None:
    """A copy of store ``src`` in which ``dataset`` lacks its first chunk: what a damaged chunk
    index looks like to a reader (HDF5 reads the missing rows as fill zeros, without an error)."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for key, value in f.attrs.items():
            g.attrs[key] = value
        for name in f:
            if name != dataset.split("/")[0]:
                f.copy(name, g)
        group = g.create_group(dataset.split("/")[0])
        for name, ds in f[dataset.split("/")[0]].items():
            full = f"{group.name.lstrip('/')}/{name}"
            if full != dataset:
                f.copy(ds, group, name)
                continue
            new = group.create_dataset(name, shape=ds.shape, dtype=ds.dtype, chunks=ds.chunks, fletcher32=True)
            rows = ds.chunks[0]
            new[rows:] = ds[rows:]  # the first chunk is never written: it is not in the index


def test_damaged_chunk_index_and_write_failures(files, capsys, tmp_path, monkeypatch, tiny_models):
    store = files["store"]
    damaged = tmp_path / "damaged.h5"
    _drop_a_chunk(store, damaged, "hidden/1")
    with h5py.File(damaged, "r") as f:  # the damage itself reads silently as zeros
        assert not f["hidden/1"][0].any() and f["hidden/1"][-1].any()
    out = tmp_path / "fit.safetensors"
    refused(capsys, fit.main, ["--store", damaged, "--method", "jtc", "--out", out, "--no-progress"],
            r"damaged\.h5 is damaged: the chunk index of hidden/1 covers (\d+) of its (\d+) chunks", [damaged], [out])
    # a healthy store opens (what the check costs is measured by benchmarks/chunk_index.py, not timed here)
    with ActivationStore(store) as s:
        assert s.n_rows > 0
    # an fsync failure at the end of an extraction leaves no partial file to resume
    from njtc_solve.data.corpus import load_corpus
    from njtc_solve.core.models import load_model

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    model, tokenizer, name = load_model(str(tiny_models["llama"]))
    monkeypatch.setattr("njtc_solve.data.store_writer.os.fsync", failing_fsync)  # os.fsync itself, which the store writer calls
    target = tmp_path / "new.h5"
    with pytest.raises(NJTCError, match=r"Input/output error \(fsync failed\).*partial file is removed"):
        extract_activations(model, tokenizer, load_corpus()[1], target, seq_len=32, max_tokens=512,
                                    progress=False)
    assert not target.exists() and not target.with_name("new.h5.partial").exists()


def test_target_all_checks_every_file_it_writes(files, capsys, tmp_path):
    """``--target-layer all`` writes OUT-t{t}[-r{r}].safetensors, never OUT: those files are checked."""
    store = files["store"]
    out = tmp_path / "fits.safetensors"
    # a foreign file where target 2's shortcuts would go
    foreign = tmp_path / "fits-t2.safetensors"
    foreign.write_text("not ours\n")
    refused(capsys, fit.main, ["--store", store, "--method", "jtc", "--target-layer", "all", "--out", out,
                               "--no-progress"],
            r"--out .*fits-t2\.safetensors exists and is not a shortcut file this project wrote",
            [store, foreign], [out, tmp_path / "fits-t1.safetensors", tmp_path / "fits-t3.safetensors"])
    foreign.unlink()
    # the same with several ranks: OUT-t{t}-r{r}
    foreign = tmp_path / "fits-t3-r4.safetensors"
    foreign.write_text("not ours\n")
    refused(capsys, fit.main, ["--store", store, "--method", "njtc", "--rank", "2,4", "--target-layer", "all",
                               "--out", out, "--no-progress"],
            r"--out .*fits-t3-r4\.safetensors exists and is not a shortcut file",
            [store, foreign], [tmp_path / f"fits-t{t}-r{r}.safetensors" for t in (1, 2, 3) for r in (2, 4)
                               if (t, r) != (3, 4)])
    foreign.unlink()
    # --save-stats is one of the shortcut files: the statistics would be overwritten by target 3's maps
    saved = tmp_path / "fits-t3.safetensors"
    refused(capsys, fit.main, ["--store", store, "--method", "jtc", "--target-layer", "all", "--save-stats", saved,
                               "--out", out, "--no-progress"],
            r"fits-t3\.safetensors is --(out|save-stats) .*: two outputs are one file",
            [store], [saved, tmp_path / "fits-t1.safetensors", tmp_path / "fits-t2.safetensors"])
    # --stats is one of the shortcut files: the fit would destroy its own input
    pairs = tmp_path / "pairs.safetensors"
    assert run_cli(fit.main, ["--store", str(store), "--method", "jtc", "--target-layer", "all",
                              "--save-stats", str(pairs), "--out", str(tmp_path / "p.safetensors"),
                              "--no-progress"]) == 0
    inside = tmp_path / "fits-t3.safetensors"
    shutil.copy(pairs, inside)
    refused(capsys, fit.main, ["--stats", inside, "--method", "jtc", "--target-layer", "all", "--out", out],
            r"--out .*fits-t3\.safetensors is --stats .*: an output never replaces an input",
            [inside], [tmp_path / "fits-t1.safetensors", tmp_path / "fits-t2.safetensors"])



def test_damaged_pair_statistics_are_one_line(files, capsys, tmp_path):
    """An all-pairs statistics file is checked like a single-target one: file, entry, shapes."""
    store = files["store"]
    pairs = tmp_path / "pairs.safetensors"
    assert run_cli(fit.main, ["--store", str(store), "--method", "jtc", "--target-layer", "all",
                              "--save-stats", str(pairs), "--out", str(tmp_path / "p.safetensors"),
                              "--no-progress"]) == 0
    capsys.readouterr()

    def meta_without(key):
        def change(t, m):
            extra = json.loads(m["meta"])
            extra.pop(key)
            m["meta"] = json.dumps(extra)
        return change

    cases = {  # name: (change, message)
        "no-cxy": (lambda t, m: t.pop("targets.2.cxy"), r"it has no tensor targets\.2\.cxy"),
        "no-cxx": (lambda t, m: t.pop("layers.1.cxx"), r"it has no tensor layers\.1\.cxx"),
        "wrong-shape": (lambda t, m: t.update({"targets.2.cxy": t["targets.2.cxy"][:, :16].contiguous()}),
                        r"targets\.2\.cxy has shape \(64, 16\), expected \(64, 32\)"),
        # the last target damaged: with all, refused before target 1's and 2's files are written
        "last-shape": (lambda t, m: t.update({"targets.3.cxy": t["targets.3.cxy"][:64].contiguous()}),
                       r"targets\.3\.cxy has shape \(64, 32\), expected \(96, 32\)"),
        "no-sources": (meta_without("sources"), r"metadata meta has no 'sources'"),
        "no-d-model": (meta_without("d_model"), r"metadata meta has no 'd_model'"),
        "nan": (lambda t, m: t["targets.2.cyy"].__setitem__((0, 0), float("nan")), r"targets\.2\.cyy holds NaN or Inf"),
    }
    for name, (change, message) in cases.items():
        bad = _variant(pairs, tmp_path / f"pairs-{name}.safetensors", change)
        out = tmp_path / f"o-{name}.safetensors"
        for target in ("all",) if name == "last-shape" else ("all", "2"):
            refused(capsys, fit.main, ["--stats", bad, "--method", "jtc", "--target-layer", target, "--out", out],
                    rf"pairs-{name}\.safetensors is not a valid statistics file: {message}", [bad],
                    [out, *(tmp_path / f"o-{name}-t{t}.safetensors" for t in (1, 2, 3))])
