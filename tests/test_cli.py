"""The command layer: argparse lives only in njtc_solve.cli, library errors speak in parameters and
the commands in flags, and every ``python -m njtc_solve.<command>`` hands over to its command."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys

import pytest

from njtc_solve.cli import COMMANDS, command, flags_of, run_cli, translate
from njtc_solve.core.errors import NJTCError

from conftest import ROOT

PACKAGE = ROOT / "njtc_solve"


def argument_glue(source: str) -> list[str]:
    """What ties a module to the command line: an argparse import, a parser, a parsed namespace."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
            found.append(f"line {node.lineno}: import argparse")
        elif isinstance(node, ast.ImportFrom) and node.module == "argparse":
            found.append(f"line {node.lineno}: from argparse import")
        elif isinstance(node, ast.Attribute) and node.attr in ("parse_args", "add_argument", "Namespace"):
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def test_no_module_outside_the_command_layer_sees_argparse():
    outside = [p for p in PACKAGE.rglob("*.py") if PACKAGE / "cli" not in p.parents]
    assert len(outside) > 20
    glue = {str(p.relative_to(ROOT)): argument_glue(p.read_text()) for p in outside}
    assert {path: found for path, found in glue.items() if found} == {}
    # the check finds what it looks for (it would fail on the commands' own modules)
    assert argument_glue((PACKAGE / "cli" / "fit.py").read_text())
    assert argument_glue("import argparse\n") and argument_glue("def f(p):\n    p.add_argument('--x')\n")


def _toy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _library_function(seq_len: int, overwrite: bool = False) -> None:
    """A library function as the library writes them: its errors name its parameters."""
    raise NJTCError(f"`seq_len` must be at least 2, not {seq_len}; `ranks` [0] is below 1; "
                    f"pass `overwrite={not overwrite}` or `progress=False`; `chunk_rows` is not this command's")


@command(_toy_parser, ranks="--rank")
def _toy_main(args) -> int:
    _library_function(args.seq_len, args.overwrite)
    return 0


def test_a_library_error_names_parameters_and_the_command_names_flags(capsys):
    with pytest.raises(NJTCError, match=r"^`seq_len` must be at least 2, not 1;"):  # called from Python
        _library_function(1)
    assert run_cli(_toy_main, ["--seq-len", "1"]) == 2
    line = capsys.readouterr().err.strip()
    assert line == ("error: --seq-len must be at least 2, not 1; --rank [0] is below 1; pass --overwrite or "
                    "--no-progress; `chunk_rows` is not this command's")
    with pytest.raises(NJTCError) as raised:  # the library's error stays the cause, for a traceback's reader
        _toy_main(["--seq-len", "1"])
    assert isinstance(raised.value.__cause__, NJTCError) and "`seq_len`" in str(raised.value.__cause__)


def test_flags_of_reads_each_destination_and_takes_renames():
    flags = flags_of(_toy_parser(), ranks="--rank")
    assert flags["seq_len"] == "--seq-len" and flags["overwrite"] == "--overwrite" and flags["ranks"] == "--rank"
    assert flags["progress=False"] == "--no-progress"  # a --no-NAME switch is NAME=False
    assert "help" in flags and "rank" in flags  # every destination, renamed ones too
    assert translate("`seq_len=0` and `rank`", flags) == "--seq-len 0 and --rank"
    assert translate("no `parameter` here", {}) == "no `parameter` here"


def test_every_command_is_run_as_python_m_njtc_solve_dot_command(tmp_path):
    """``python -m njtc_solve.<command>`` hands its ``__main__`` over to ``njtc_solve.cli.<command>``, which
    runs the command as ``python -m njtc_solve.cli.<command>`` too; each usage line names the module as typed."""
    script = """
import json, runpy, sys
from contextlib import redirect_stdout
from io import StringIO
progs = {}
for name in json.loads(sys.argv[1]):
    for module in (f"njtc_solve.{name}", f"njtc_solve.cli.{name}"):
        sys.argv = [name, "--help"]
        out = StringIO()
        try:
            with redirect_stdout(out):
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            progs[module] = [stop.code, out.getvalue().startswith(f"usage: python -m {module} ")]
print(json.dumps(progs))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(COMMANDS)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    progs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert progs == {f"njtc_solve.{cli}{name}": [0, True] for name in COMMANDS for cli in ("", "cli.")}, progs
    listing = subprocess.run([sys.executable, "-m", "njtc_solve"], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=120)
    assert all(f"python -m njtc_solve.{name}" in listing.stdout for name in COMMANDS)



def test_the_readme_error_example_from_python_and_from_the_command_line(tiny_store, tmp_path, capsys):
    """The same refusal, worded for each caller (README, Python API section)."""
    from njtc_solve import fit_shortcuts
    from njtc_solve.cli import fit

    with pytest.raises(NJTCError) as raised:
        fit_shortcuts(tiny_store, method="jtc", ranks=[8])
    assert str(raised.value) == "jtc fits full-rank maps; drop `ranks` (or use `method` njtc)"
    out = tmp_path / "jtc.safetensors"
    assert run_cli(fit.main, ["--store", str(tiny_store), "--method", "jtc", "--rank", "8", "--out", str(out),
                              "--no-progress"]) == 2
    assert capsys.readouterr().err == "error: jtc fits full-rank maps; drop --rank (or use --method njtc)\n"
    assert not out.exists()


def test_a_store_being_written_is_named_so_not_as_a_leftover_to_resume(tmp_path, capsys):
    """The output lock is taken before the output is checked: a second run is told another process
    writes the store, in flags, not that a leftover .partial wants --resume."""
    from njtc_solve.cli import extract
    from njtc_solve.core.outputs import output_lock

    out = tmp_path / "a.h5"
    (tmp_path / "a.h5.partial").write_bytes(b"being written")
    with output_lock(out):  # another writer (flock: another open file is another holder, even in-process)
        for extra in ([], ["--resume"]):
            assert run_cli(extract.main, ["--model", str(tmp_path / "no-model"), "--out", str(out), *extra]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {out} is being written by another process"), err
            assert err.endswith("wait for it to finish or choose another --out\n"), err
    assert (tmp_path / "a.h5.partial").read_bytes() == b"being written"


def test_evaluate_writes_its_warnings_with_flags_into_the_report(tiny_store, tmp_path, capsys):
    """A warning of the library (in parameters) reaches the command's stderr and results.json in flags."""
    from njtc_solve import Shortcuts, fit_shortcuts
    from njtc_solve.cli import evaluate

    [jtc] = fit_shortcuts(tiny_store, method="jtc", layers=[1], progress=False)
    refined = jtc.replace(stats={**jtc.stats, "refined": {"check_rows": [4, 20], "check_split": "validation"}})
    refined.save(tmp_path / "refined.safetensors")
    assert "use `max_rows` 4" in str(__import__("njtc_solve.evaluation.evaluate", fromlist=["x"]).check_rows_overlap(
        Shortcuts.load(tmp_path / "refined.safetensors"), 64, 1))  # the library's wording
    out = tmp_path / "report"
    assert run_cli(evaluate.main, ["--store", str(tiny_store), "--shortcuts", str(tmp_path / "refined.safetensors"),
                                   "--max-rows", "64", "--out", str(out), "--no-progress"]) == 0
    warnings = json.loads((out / "results.json").read_text())["meta"]["warnings"]
    assert len(warnings) == 1 and warnings[0].endswith("(use --max-rows 4)"), warnings
    assert f"warning: {warnings[0]}" in capsys.readouterr().err



def test_evaluate_refuses_a_skip_bound_below_one(tiny_store, tmp_path, capsys):
    from njtc_solve.cli import evaluate

    assert run_cli(evaluate.main, ["--store", str(tiny_store), "--skip-rows", "0", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == "error: --skip-rows must be positive\n"
    assert not (tmp_path / "r").exists()


def test_export_refuses_what_tuned_lens_cannot_hold_before_the_model_loads(tiny_store, tmp_path, capsys):
    """Maps to an intermediate layer, and the identity, are refused by check_exportable; the command
    says so before it loads the model (here a model path that does not exist: loading it would fail)."""
    from njtc_solve import Shortcuts, fit_shortcuts
    from njtc_solve.cli import export
    from njtc_solve.maps.tuned_lens import check_exportable

    [to_2] = fit_shortcuts(tiny_store, method="jtc", target_layer=2, progress=False)
    to_2.save(tmp_path / "t2.safetensors")
    assert run_cli(export.main, ["--format", "tuned-lens", "--shortcuts", str(tmp_path / "t2.safetensors"),
                                 "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "lens")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shortcuts jtc target layer 2, not the last layer of their model (3)"), err
    assert not (tmp_path / "lens").exists()
    with pytest.raises(NJTCError, match="identity is tuned-lens's LogitLens"):
        check_exportable(Shortcuts.identity([0, 1, 2], 3))
    [jtc] = fit_shortcuts(tiny_store, method="jtc", progress=False)
    assert sorted(check_exportable(jtc)) == [f"{i}.{kind}" for i in range(3) for kind in ("bias", "weight")]


def test_a_store_in_a_missing_folder_is_named_so(tmp_path):
    from njtc_solve.data.store_writer import StoreWriter

    with pytest.raises(NJTCError, match=r"a\.h5: folder .*missing does not exist$"):
        with StoreWriter.reserve(tmp_path / "missing" / "a.h5"):
            pass


def test_pairwise_bounds_must_be_positive(tiny_store):
    from njtc_solve.evaluation.layer_pairs import evaluate_pairs

    for bounds, name in (({"skip_rows": 0}, "skip_rows"), ({"max_rows": -1}, "max_rows")):
        with pytest.raises(NJTCError, match=f"^`{name}` must be positive"):
            evaluate_pairs(tiny_store, [], **bounds)


def test_evaluate_names_several_lenses_each_by_its_folder(tiny_store, tmp_path, capsys):
    """``--tuned-lens A B C`` evaluates three lenses; two folders of the same name get their parents too."""
    from njtc_solve import fit_shortcuts
    from njtc_solve.cli import evaluate
    from njtc_solve.maps.tuned_lens import export_tuned_lens

    [jtc] = fit_shortcuts(tiny_store, method="jtc", layers=[1], progress=False)
    folders = [tmp_path / "a" / "lens", tmp_path / "b" / "lens", tmp_path / "c"]
    for folder in folders:
        folder.parent.mkdir(exist_ok=True)
        export_tuned_lens(jtc, folder)
    out = tmp_path / "report"
    assert run_cli(evaluate.main, ["--store", str(tiny_store), "--shortcuts", "--tuned-lens", *map(str, folders),
                                   "--max-rows", "32", "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    methods = {r["method"] for r in json.loads((out / "results.json").read_text())["records"]}
    assert methods == {"identity", "tuned-lens-a/lens", "tuned-lens-b/lens", "tuned-lens-c"}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_can_hide_its_progress(name):
    import importlib

    parser = importlib.import_module(f"njtc_solve.cli.{name}").build_parser()
    assert "--no-progress" in parser._option_string_actions  # argparse has no public list of its options


def test_one_njtc_script_runs_every_command(tiny_store, tmp_path, capsys, monkeypatch):
    """``njtc COMMAND ...`` is ``njtc-COMMAND ...``; its usage and errors name it so."""
    from njtc_solve.cli import main

    monkeypatch.setattr(sys, "argv", ["/venv/bin/njtc"])
    assert main(["--help"]) == 0
    printed = capsys.readouterr().out
    assert all(c in printed for c in COMMANDS), printed
    assert main([]) == 2 and capsys.readouterr().err.startswith("usage: njtc ")
    assert main(["fitt"]) == 2 and "error: unknown command 'fitt'; choose from extract, fit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert capsys.readouterr().out.startswith("usage: njtc fit ")
    out = tmp_path / "jtc.safetensors"
    assert main(["fit", "--store", str(tiny_store), "--method", "jtc", "--out", str(out), "--no-progress"]) == 0
    assert out.is_file()
    assert main(["evaluate", "--store", str(tiny_store), "--max-rows", "0"]) == 2
    assert capsys.readouterr().err.endswith("error: --max-rows must be positive\n")
