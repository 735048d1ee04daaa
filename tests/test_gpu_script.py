"""benchmarks/gpu.sh --dry-run: the prepared GPU run's commands exist and take the flags it passes, without a GPU."""

from __future__ import annotations

import subprocess

from conftest import ROOT


def test_gpu_script_dry_run_checks_its_commands(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in ("cuda_tests", "throughput", "live_fit", "speculate"):
        assert f"[{step}," in proc.stdout
    assert "pytest -m cuda" in proc.stdout and "--device cuda" in proc.stdout
    assert str(tmp_path) in proc.stdout and "error" not in proc.stdout
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--bogus"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
