"""Scale-out: real torchrun processes with gloo on the CPU, against single-process results."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import ROOT
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.maps.shortcuts import Shortcuts
from njtc_solve.solve.solvers import solve_reduced_rank
from njtc_solve.solve.stats import Statistics
from njtc_solve.data.store import ActivationStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module, *args, nproc=2, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_two_process_fit_equals_single_process(tiny_store, tmp_path):
    result = torchrun("njtc_solve.fit", "--store", str(tiny_store), "--method", "njtc", "--rank", "4",
                      "--chunk-rows", "300", "--save-stats", str(tmp_path / "stats.safetensors"),
                      "--out", str(tmp_path / "dist.safetensors"), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    with ActivationStore(tiny_store) as store:
        [single] = fit_shortcuts(store, method="njtc", ranks=[4], chunk_rows=300, progress=False,
                                 save_stats=tmp_path / "single.safetensors")
    dist_stats = Statistics.load(tmp_path / "stats.safetensors")
    single_stats = Statistics.load(tmp_path / "single.safetensors")
    assert dist_stats.n == single_stats.n
    for layer in range(3):
        a, b = dist_stats.layers[layer], single_stats.layers[layer]
        assert ((a.cxy - b.cxy).norm() / b.cxy.norm()) <= 1e-12
        # the maps, solved in float64, agree to 1e-10
        ua = solve_reduced_rank(a.cxx, a.cxy).coef_of_rank(4)
        ub = solve_reduced_rank(b.cxx, b.cxy).coef_of_rank(4)
        assert ((ua - ub).norm() / ub.norm()) <= 1e-10
    dist = Shortcuts.load(tmp_path / "dist.safetensors")
    for layer in range(3):
        assert torch.allclose(dist.maps[layer].U @ dist.maps[layer].V, single.maps[layer].U @ single.maps[layer].V,
                              rtol=1e-5, atol=1e-6)
    # from the saved statistics, under torchrun too: rank 0 solves alone
    result = torchrun("njtc_solve.fit", "--store", str(tiny_store), "--method", "njtc", "--rank", "4",
                      "--stats", str(tmp_path / "stats.safetensors"), "--out", str(tmp_path / "again.safetensors"),
                      "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    again = Shortcuts.load(tmp_path / "again.safetensors")
    assert all(torch.equal(again.maps[l].U, dist.maps[l].U) for l in range(3))


def _failing_worker(rank, world, port, store, out, fail_rank, results, marker):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      NJTC_DIST_TIMEOUT="60")
    from njtc_solve.solve import stats
    from njtc_solve.cli import fit, run_cli

    if rank == fail_rank:  # a real mid-run failure: the second chunk's accumulation raises
        original = stats.MomentAccumulator.update
        calls = {"n": 0}

        def update(self, xs, y, weight=None):  # the signature of MomentAccumulator.update
            calls["n"] += 1
            if calls["n"] > 1:
                with open(marker, "w") as f:  # proof that the fault ran, after a successful chunk
                    f.write(str(calls["n"]))
                raise OSError("disk read failed")
            return original(self, xs, y, weight)

        stats.MomentAccumulator.update = update
    try:
        results[rank] = run_cli(fit.main, ["--store", store, "--method", "njtc", "--rank", "2", "--chunk-rows",
                                           "200", "--out", out, "--no-progress"])
    except BaseException as err:  # report any escape as this process's failure
        results[rank] = repr(err)


def test_a_failing_process_fails_the_run_and_writes_nothing(tiny_store, tmp_path):
    out = tmp_path / "never.safetensors"
    marker = tmp_path / "fault-ran"
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_failing_worker,
                             args=(r, 2, port, str(tiny_store), str(out), 1, results, str(marker)))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert not p.is_alive(), "a process hung after its peer failed"
        outcome = dict(results)
    assert marker.read_text() == "2", "the injected fault did not run on the second chunk"
    assert outcome[1] not in (0, 2), outcome  # the OSError itself, not a one-line user error
    assert outcome[0] == 2, outcome  # the peer: "another process failed", exit 2
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_sharded_extraction_equals_single_process(tiny_models, tmp_path):
    args = ["--model", str(tiny_models["gpt2"]), "--seq-len", "32", "--max-tokens", "3200", "--no-progress"]
    result = torchrun("njtc_solve.extract", *args, "--out", str(tmp_path / "sharded.h5"))
    assert result.returncode == 0, result.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "njtc_solve.extract", *args, "--out", str(tmp_path / "single.h5")],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert single.returncode == 0, single.stderr
    assert sorted(p.name for p in tmp_path.glob("sharded*")) == [
        "sharded.h5", "sharded.shard0-of-2.h5", "sharded.shard1-of-2.h5"]
    with ActivationStore(tmp_path / "sharded.h5") as a, ActivationStore(tmp_path / "single.h5") as b:
        assert a.n_rows == b.n_rows == 3200
        for name in ("tokens", "sequence", "position", "split", "final_top1", "document", "final_topk"):
            assert np.array_equal(a.read(name), b.read(name)), name
        assert np.array_equal(a.validation_documents, b.validation_documents)
        for layer in range(a.n_layers + 1):
            np.testing.assert_allclose(a.file[f"hidden/{layer}"][...], b.file[f"hidden/{layer}"][...],
                                       rtol=1e-5, atol=1e-5)
        same = {k: v for k, v in b.attrs.items() if not k.startswith("head_check")}
        assert {k: a.attrs[k] for k in same} == same
    # the combined store works from another folder too (relative links)
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in tmp_path.glob("sharded*.h5"):
        p.rename(moved / p.name)
    with ActivationStore(moved / "sharded.h5") as store:
        assert store.count("validation") > 0 and store.file["hidden/2"][-1].shape == (32,)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_single_process_needs_no_process_group(tiny_store, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
    result = subprocess.run([sys.executable, "-m", "njtc_solve.fit", "--store", str(tiny_store), "--method", "njtc",
                             "--rank", "2", "--out", str(tmp_path / "s.safetensors"), "--no-progress"],
                            capture_output=True, text=True, env=dict(env, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    with h5py.File(tiny_store) as f:
        assert f.attrs["shard"] == "0/1"


def test_two_process_live_fit_equals_single_process(tiny_models, tmp_path):
    """Under torchrun each process runs the model over its share of the training documents,
    and one all-reduce joins the statistics: the same as one process over all of them."""
    plan = ["--model", str(tiny_models["llama"]), "--seq-len", "32", "--max-tokens", "2048", "--seed", "2"]
    result = torchrun("njtc_solve.fit", *plan, "--method", "njtc", "--rank", "4",
                      "--save-stats", str(tmp_path / "dist-stats.safetensors"),
                      "--out", str(tmp_path / "dist.safetensors"), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "njtc_solve.fit", *plan, "--method", "njtc", "--rank", "4",
                             "--save-stats", str(tmp_path / "single-stats.safetensors"),
                             "--out", str(tmp_path / "single.safetensors"), "--no-progress"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = (Statistics.load(tmp_path / f"{n}-stats.safetensors") for n in ("dist", "single"))
    assert a.n_rows == b.n_rows > 1000
    for layer in range(3):
        assert ((a.layers[layer].cxy - b.layers[layer].cxy).norm() / b.layers[layer].cxy.norm()) <= 1e-6
    dist, one = (Shortcuts.load(tmp_path / f"{n}.safetensors") for n in ("dist", "single"))
    assert dist.provenance == one.provenance
    for layer in range(3):
        assert torch.allclose(dist.maps[layer].U @ dist.maps[layer].V, one.maps[layer].U @ one.maps[layer].V,
                              rtol=1e-4, atol=1e-5)
