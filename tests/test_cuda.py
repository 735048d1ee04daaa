"""GPU paths (marked ``cuda``, skipped without a GPU): accumulation, the float64 solve on the
device, and the NCCL fit. CI has no GPU; run them where one is (``pytest -m cuda``).

``NJTC_CUDA_TESTS_DEVICE=cpu`` runs the same comparisons with the CPU standing in for the GPU
(the NCCL test skipped): ``benchmarks/gpu.sh --rehearse`` uses it to try this file's code paths
in the device's environment before device time is spent."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.solve.statistics_pass import accumulate_statistics
from njtc_solve.data.store import ActivationStore

DEVICE = os.environ.get("NJTC_CUDA_TESTS_DEVICE", "cuda")  # "cpu": a rehearsal of these tests without a GPU
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def test_statistics_stay_on_the_gpu_and_equal_the_cpu(tiny_store):
    with ActivationStore(tiny_store) as store:
        cpu = accumulate_statistics(store, [0, 2], input_norm="layer", device="cpu", progress=False)
        gpu = accumulate_statistics(store, [0, 2], input_norm="layer", device=DEVICE, progress=False)
    assert gpu.cyy.device.type == DEVICE and gpu.layers[2].cxx.dtype == torch.float64
    assert gpu.n_rows == cpu.n_rows
    for layer in (0, 2):
        assert _rel(gpu.layers[layer].cxy, cpu.layers[layer].cxy) <= 1e-6
        assert _rel(gpu.layers[layer].cxx, cpu.layers[layer].cxx) <= 1e-6


@pytest.mark.parametrize("kw", [dict(method="nnjtc", ranks=[4]), dict(method="njtc", ranks=[4], weight="logits"),
                                dict(method="jtc", ranks=None, alpha="auto")])
def test_the_solve_on_the_gpu_equals_the_cpu(tiny_store, kw):
    [cpu] = fit_shortcuts(tiny_store, progress=False, device="cpu", **kw)
    [gpu] = fit_shortcuts(tiny_store, progress=False, device=DEVICE, **kw)
    for layer, m in cpu.maps.items():
        g = gpu.maps[layer]
        full = (lambda s: s.weight) if m.weight is not None else (lambda s: s.U @ s.V)
        assert _rel(full(g), full(m)) <= 1e-4, layer


def _nccl_worker(rank, world, port, store, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from njtc_solve.core.distributed import Communicator

    comm = Communicator("cuda")
    try:
        fits = fit_shortcuts(store, method="njtc", ranks=[4], device=str(comm.device), progress=False, comm=comm)
        results[rank] = {l: (m.U @ m.V).cpu() for l, m in fits[0].maps.items()} if fits else {}
    finally:
        comm.close()


@pytest.mark.parametrize("world", [1, 2])
def test_nccl_fit_equals_a_single_process(tiny_store, world):
    """In-place all-reduce, the vote and the gather of the layers' solves, over NCCL."""
    if DEVICE != "cuda" or torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    from test_distributed import _free_port

    [single] = fit_shortcuts(tiny_store, method="njtc", ranks=[4], progress=False)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_nccl_worker, args=(r, world, port, str(tiny_store), results))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
        outcome = dict(results)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(outcome[0]) == sorted(single.maps)
    for layer, m in single.maps.items():
        assert _rel(outcome[0][layer], m.U @ m.V) <= 1e-4
    assert all(outcome[r] == {} for r in range(1, world))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_live_fit_on_the_gpu_equals_the_cpu(tiny_models, dtype):
    """The model on the GPU (bf16 too), its rows upcast and accumulated there, the solve there."""
    from njtc_solve.data.corpus import load_corpus
    from njtc_solve.core.models import load_model
    from njtc_solve.data.live import LiveSource

    documents = load_corpus()[1]
    fits = {}
    for role, device in (("reference", "cpu"), ("device", DEVICE)):
        model, tokenizer, name = load_model(str(tiny_models["llama"]), device=device, dtype=dtype)
        live = LiveSource(model, tokenizer, documents, seq_len=32, max_tokens=2048, model_name=name)
        [fits[role]] = fit_shortcuts(live, method="njtc", ranks=[4], device=device, progress=False)
    for layer, m in fits["reference"].maps.items():
        g = fits["device"].maps[layer]
        assert _rel(g.U @ g.V, m.U @ m.V) <= (1e-4 if dtype == "float32" else 0.1)
