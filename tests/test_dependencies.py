"""Every command does its real work after a plain ``pip install .``: each installed package
that the project's core dependencies do not bring (pandas, tuned-lens, gguf, accelerate,
datasets, pytest, …) is made unimportable, and every command runs on a tiny model in one process.

An import the commands use but ``pyproject.toml`` does not declare fails here, in CI, rather
than on a user's machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

# Runs in a fresh interpreter: computes what `pip install .` installs (the closure of the
# core requirements, extras excluded), blocks every other installed top-level module, then
# runs each command's main() as `python -m njtc_solve.<command>` would.
_SCRIPT = textwrap.dedent('''
    import json, sys
    from importlib import metadata
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as canon

    def declared(dist):
        seen, todo = set(), [dist]
        while todo:
            name = canon(todo.pop())
            if name in seen:
                continue
            seen.add(name)
            try:
                requires = metadata.distribution(name).requires or []
            except metadata.PackageNotFoundError:
                continue
            for text in requires:
                req = Requirement(text)
                if req.marker is None or req.marker.evaluate({"extra": ""}):
                    todo.append(req.name)
        return seen

    keep = declared("njtc_solve")
    blocked = sorted(module for module, dists in metadata.packages_distributions().items()
                     if module != "njtc_solve" and not module.startswith("_")
                     and not any(canon(d) in keep for d in dists))
    for module in blocked:
        sys.modules[module] = None  # `import module` raises ModuleNotFoundError, find_spec gives None
    from importlib import import_module
    from njtc_solve.cli import run_cli

    codes = {}
    for label, command, argv in json.loads(sys.argv[1]):
        try:
            codes[label] = run_cli(import_module(f"njtc_solve.cli.{command}").main, argv)
        except SystemExit as stop:  # argparse's usage error
            codes[label] = stop.code
    loaded = sorted(set(blocked) & {name.split(".")[0] for name, m in sys.modules.items() if m is not None})
    print(json.dumps({"codes": codes, "blocked": blocked, "loaded_anyway": loaded}))
''')


def _run_with_only_declared_dependencies(commands, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``commands`` ([label, command, argv], ...) through ``_SCRIPT`` in a fresh interpreter, in ``cwd``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(commands)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def _commands(model: str, tmp) -> list:
    plan = ["--seq-len", "16", "--max-tokens", "1200"]
    store, stats, maps = str(tmp / "a.h5"), str(tmp / "stats.safetensors"), str(tmp / "maps.safetensors")
    quiet = ["--no-progress"]
    return [
        ("extract", "extract", ["--model", model, "--out", store, *plan, *quiet]),
        ("fit --store", "fit", ["--store", store, "--method", "njtc", "--rank", "4", "--out", maps,
                                "--save-stats", stats, *quiet]),
        ("fit --stats", "fit", ["--stats", stats, "--method", "jtc", "--out", str(tmp / "jtc.safetensors"), *quiet]),
        ("fit --model", "fit", ["--model", model, *plan, "--method", "nnjtc", "--rank", "4",
                                "--out", str(tmp / "live.safetensors"), *quiet]),
        ("evaluate --store", "evaluate", ["--store", store, "--shortcuts", maps, "--out", str(tmp / "report"), *quiet]),
        ("evaluate --model", "evaluate", ["--model", model, "--shortcuts", maps, "--corpus", "pydoc_data.topics",
                                          "--max-rows", "64", *quiet]),
        ("refine", "refine", ["--store", store, "--shortcuts", maps, "--steps", "2", "--check-rows", "32",
                              "--out", str(tmp / "refined.safetensors"), *quiet]),
        ("export", "export", ["--format", "tuned-lens", "--shortcuts", maps, "--out", str(tmp / "tuned"), "--model", model]),
        ("fit --no-intercept", "fit", ["--stats", stats, "--method", "jtc", "--no-intercept",
                                       "--out", str(tmp / "jtc0.safetensors"), *quiet]),
        ("export jacobian-lens", "export", ["--format", "jacobian-lens", "--shortcuts", str(tmp / "jtc0.safetensors"),
                                            "--out", str(tmp / "jlens"), "--model", model]),
        ("evaluate --jacobian-lens", "evaluate", ["--store", store, "--shortcuts", "--jacobian-lens", str(tmp / "jlens"),
                                                  "--out", str(tmp / "jreport"), *quiet]),
        ("lens", "lens", ["--model", model, "--shortcuts", maps, "--prompt", "def f(x): return x", "--top-k", "3",
                          "--out", str(tmp / "lens")]),
        ("lens --tuned-lens", "lens", ["--model", model, "--tuned-lens", str(tmp / "tuned"), "--prompt", "a b c"]),
        ("lens --jacobian-lens", "lens", ["--model", model, "--jacobian-lens", str(tmp / "jlens"), "--prompt", "a b c"]),
        ("prune", "prune", ["--model", model, "--remove", "1", "--start", "1", "--out", str(tmp / "pruned"),
                            *plan, "--score-tokens", "32", *quiet]),
    ]


def run_without_optional_packages(model: str, tmp) -> tuple[dict, subprocess.CompletedProcess]:
    commands = _commands(model, tmp)
    proc = _run_with_only_declared_dependencies(commands, tmp, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def test_a_gguf_model_without_the_gguf_extra_is_one_line(tmp_path):
    """The default model is a .gguf file: without the [gguf] extra, each command says so in one line."""
    from njtc_solve.core.errors import NJTCError
    from njtc_solve.core.models import default_model_path

    try:
        model = str(default_model_path())
    except NJTCError:  # the default model's package is not installed here
        model = str(tmp_path / "model.gguf")
        (tmp_path / "model.gguf").write_bytes(b"GGUF")
    commands = [("extract", "extract", ["--model", model, "--out", str(tmp_path / "a.h5"), "--no-progress"]),
                ("prune", "prune", ["--model", model, "--remove", "1", "--start", "1", "--out", str(tmp_path / "p"),
                                    "--no-progress"])]
    proc = _run_with_only_declared_dependencies(commands, tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "gguf" in result["blocked"]
    assert result["codes"] == {"extract": 2, "prune": 2}, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and all("needs `pip install gguf`" in line for line in lines), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_dataset_corpus_without_the_datasets_extra_is_one_line(tiny_models, tmp_path):
    """A Hugging Face dataset as --corpus needs the [datasets] extra: each command that reads a corpus says so."""
    (tmp_path / "docs.parquet").write_bytes(b"PAR1")  # never read: the import fails first
    model, out = str(tiny_models["llama"]), str(tmp_path / "a.h5")
    commands = [("extract parquet", "extract", ["--model", model, "--corpus", str(tmp_path / "docs.parquet"),
                                                "--out", out, "--no-progress"]),
                ("extract hf", "extract", ["--model", model, "--corpus", "hf:user/corpus", "--out", out,
                                           "--no-progress"]),
                ("fit --model hf", "fit", ["--model", model, "--corpus", "hf:user/corpus:en:train[:100]",
                                           "--method", "jtc", "--out", str(tmp_path / "m.safetensors"),
                                           "--no-progress"])]
    proc = _run_with_only_declared_dependencies(commands, tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "datasets" in result["blocked"]
    assert set(result["codes"].values()) == {2}, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 3 and all(line.startswith("error: ") and "[datasets] extra: pip install 'njtc_solve[datasets]'"
                                   in line for line in lines), proc.stderr[-2000:]
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "m.safetensors").exists()


def test_every_command_runs_with_only_the_declared_dependencies(tiny_models, tmp_path):
    result, proc = run_without_optional_packages(str(tiny_models["llama"]), tmp_path)
    # the blocker is real: what the dev extra and the optional extras install is blocked
    assert {"pandas", "pytest", "tuned_lens", "datasets"} <= set(result["blocked"]), result["blocked"]
    assert not result["loaded_anyway"]
    failed = {label: code for label, code in result["codes"].items() if code != 0}
    assert not failed, f"{failed}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "lens" / "trajectory.csv").is_file() and (tmp_path / "report" / "report.md").is_file()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once for this module's tests by its build backend (setuptools, in
    the dev extra) from a copy, so the tree gets no build/ or egg-info; no pip, no network."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "njtc_solve", source / "njtc_solve", ignore=shutil.ignore_patterns("__pycache__"))
    build = "from setuptools import build_meta; build_meta.build_wheel(__import__('sys').argv[1])"
    proc = subprocess.run([sys.executable, "-c", build, str(tmp / "dist")], capture_output=True, text=True,
                          cwd=source, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [built] = (tmp / "dist").glob("*.whl")
    return built


# the stage subpackages (each named in njtc_solve/__init__.py's layout)
SUBPACKAGES = ("core", "data", "maps", "solve", "evaluation", "infer", "prune", "cli")


def test_the_wheel_holds_every_module_of_the_package(wheel):
    """``pip install .`` installs what the wheel holds: every module of njtc_solve, each stage
    subpackage and the command layer (njtc_solve/cli) too."""
    packaged = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "njtc_solve").rglob("*.py")}
    assert "njtc_solve/cli/fit.py" in modules and not modules - packaged, sorted(modules - packaged)
    assert {f"njtc_solve/{name}/__init__.py" for name in SUBPACKAGES} <= packaged


# Runs in the fresh venv's interpreter, from a folder outside the tree: each `python -m` hand-over
# module and each console script as their processes would run them (runpy is what `python -m`
# uses), in one interpreter, so torch is imported once and the test stays quick.
_HELP = textwrap.dedent('''
    import contextlib, io, json, runpy, sys
    import njtc_solve

    results = {"__file__": njtc_solve.__file__}
    for label, kind, target in json.loads(sys.argv[1]):
        sys.argv, out, code = [target, "--help"], io.StringIO(), None
        with contextlib.redirect_stdout(out):
            try:
                if kind == "module":
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(target, run_name="__main__")
            except SystemExit as stop:
                code = stop.code
            except Exception as err:  # e.g. a module the wheel lacks: reported for this command
                code = f"{type(err).__name__}: {err}"
        results[label] = [code, out.getvalue()]
    print(json.dumps(results))
''')


def test_the_installed_wheel_runs_every_command_from_a_fresh_venv(wheel, tmp_path):
    """After ``pip install`` of the wheel into a fresh venv, ``python -m njtc_solve.<command> --help``
    and ``njtc-<command> --help`` print the usage of every command (``njtc_solve.cli.COMMANDS``;
    ``njtc <command>`` is the one script beside them),
    run from outside the source tree with the installed package, not the tree's: all of them in
    one interpreter (see ``_HELP``), and ``fit``'s two also as processes of their own.

    The heavy dependencies (torch, transformers, …) are not downloaded: a ``.pth`` line puts this
    venv's site-packages after the fresh venv's own (a path line: that folder's own ``.pth`` files,
    this project's editable install among them, are not run).
    """
    from njtc_solve.cli import COMMANDS

    fresh = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    run = lambda *cmd, **kw: subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env,
                                            cwd=tmp_path, timeout=300, **kw)
    made = run(sys.executable, "-m", "venv", "--without-pip", fresh)
    assert made.returncode == 0, made.stderr[-2000:]
    python = fresh / "bin" / "python"
    installed = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                    "--no-cache-dir", "--disable-pip-version-check", "--quiet", wheel)
    assert installed.returncode == 0, installed.stderr[-2000:]
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    (Path(purelib) / "_project_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    [entry_points] = Path(purelib).glob("njtc_solve-*.dist-info/entry_points.txt")
    scripts = {line.split("=")[0].strip() for line in entry_points.read_text().splitlines() if "=" in line}
    assert scripts == {"njtc"} | {f"njtc-{command}" for command in COMMANDS}, scripts
    for script in scripts:  # each script is pip's, run by the fresh venv's interpreter
        assert (fresh / "bin" / script).read_text().startswith(f"#!{python}")
    jobs = [(f"python -m njtc_solve.{c}", "module", f"njtc_solve.{c}") for c in COMMANDS] + \
        [(f"njtc-{c}", "script", str(fresh / "bin" / f"njtc-{c}")) for c in COMMANDS]
    proc = run(python, "-c", _HELP, json.dumps(jobs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    location = Path(results.pop("__file__")).resolve()
    assert fresh.resolve() in location.parents and ROOT.resolve() not in location.parents, location
    for (label, _, _), command in zip(jobs, COMMANDS * 2):
        code, printed = results[label]
        usage = f"usage: {label} " if label.startswith("njtc-") else f"usage: python -m njtc_solve.{command} "
        assert code == 0 and printed.startswith(usage), (label, code, printed[:300])
    for argv, usage in (([python, "-m", "njtc_solve.fit", "--help"], "usage: python -m njtc_solve.fit "),
                        ([fresh / "bin" / "njtc-fit", "--help"], "usage: njtc-fit "),
                        ([fresh / "bin" / "njtc", "fit", "--help"], "usage: njtc fit ")):
        real = run(*argv)  # and as processes of their own, for the mission's command
        assert real.returncode == 0 and real.stdout.startswith(usage), real.stderr[-2000:]
