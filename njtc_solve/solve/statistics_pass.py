"""The statistics pass: one stream over the training rows of a store or a live model into float64 moments."""

from __future__ import annotations

import itertools
import time

import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.solve.saved_statistics import saved_statistics
from njtc_solve.solve.stats import MomentAccumulator, Statistics, pass_meta, training_bar

__all__ = ["accumulate_statistics", "store_statistics"]


def accumulate_statistics(store, layers: list[int], *, input_norm: str = "none", device: str = "cpu",
                          chunk_rows: int = 4096, float64: bool = False, progress: bool = True, comm=None,
                          row_weight: str = "none", skip_positions: int | None = None,
                          target_layer: int | None = None) -> Statistics:
    """Stream the training rows once and accumulate statistics of all ``layers`` against the target.

    Parameters
    ----------
    store : ActivationStore or LiveSource
        The rows.
    layers : list of int
        Source layers; the target layer is read once per chunk and shared.
    input_norm : {"none", "layer", "rms"}
        Per-token normalisation of the source rows.
    device : str
        Where the chunk GEMMs run and the statistics stay.
    chunk_rows : int
        Rows per chunk; memory is ``O(chunk_rows × d × layers + layers × d²)``.
    float64 : bool
        Do the chunk GEMMs in float64 too.
    progress : bool
        Show a bar over the rows.
    comm : njtc_solve.core.distributed.Communicator, optional
        Process group for a sharded pass (each process reads its share of the chunks).
    row_weight : {"none", "inv_sigma2"}
        ``inv_sigma2`` weights each row by ``1/σ²`` of its target under the final norm, over its
        mean on the first training chunk (the row weights of ``weight="logits"``).
    skip_positions : int, optional
        Leave out rows at positions below this (default: the store's
        :attr:`~njtc_solve.data.store.ActivationStore.default_skip_positions`).
    target_layer : int, optional
        The layer the maps predict (default: the last); every source must be below it.

    Returns
    -------
    Statistics
        With the pass's timing (``seconds``, ``rows_per_s``, ``gflops``) and ``provenance`` in ``meta``.
    """
    target = store.n_layers if target_layer is None else int(target_layer)
    skip = store.default_skip_positions if skip_positions is None else int(skip_positions)
    acc = MomentAccumulator(layers, input_norm, device, float64)
    start = time.perf_counter()
    failure = None
    try:
        _stream(store, acc, layers, target, skip=skip, chunk_rows=chunk_rows, comm=comm, row_weight=row_weight,
                progress=progress)
    except Exception as err:  # in a distributed run, tell the peers before failing
        if comm is None:
            raise
        failure = err
    if comm is not None:
        _reduce(comm, acc, failure, {l: store.d_model for l in layers}, store.d_model)
    meta = {"target_layer": target, **pass_meta(store, device=device, start=start, n_rows=acc.n_rows,
                                                products=2 * len(layers) + 1, skip_positions=skip,
                                                row_weight=row_weight)}
    stats = acc.finalize(meta)
    stats.check_finite()
    return stats


def _stream(store, acc: MomentAccumulator, layers, target: int, *, skip: int, chunk_rows: int, comm,
            row_weight: str, progress: bool) -> None:
    """This process's share of the training chunks into ``acc``, shifted by the first chunk's means."""
    with training_bar(store, skip, "statistics", progress, counted=comm is None) as bar:
        shard = (0, 1) if comm is None else (comm.rank, comm.world_size)
        reading = sorted(set(layers) | {target})
        chunks = store.iter_chunks(reading, split="train", chunk_rows=chunk_rows, shard=shard, skip_positions=skip)
        if shard == (0, 1):  # the first chunk serves the shift and is accumulated too: read (or run) once
            first_chunk = next(chunks)
            chunks, first = itertools.chain([first_chunk], chunks), first_chunk[1]
        else:  # every process shifts by the first training chunk's mean, as a single process would
            _, first = next(store.iter_chunks(reading, split="train", chunk_rows=chunk_rows, skip_positions=skip))
        acc.shift_from_chunk({l: first[l] for l in layers}, first[target])
        weigh = _row_weights(store, first[target]) if row_weight == "inv_sigma2" else None
        for _, chunk in chunks:
            acc.update({l: chunk[l] for l in layers}, chunk[target], None if weigh is None else weigh(chunk[target]))
            bar.update(len(chunk[target]))


def _inverse_norm_scale(norm: str, eps: float, y) -> torch.Tensor:
    """``1/σ²`` of each target row under the model's final norm."""
    y = torch.as_tensor(y).double()
    var = y.var(-1, unbiased=False) if norm == "layernorm" else y.pow(2).mean(-1)
    return 1.0 / (var + eps)


def _row_weights(store, first_target):
    """``y ↦ 1/σ²(y)`` over its mean on the first training chunk (the same in every process)."""
    head = store.head()
    norm = (head.norm, head.eps)
    scale = float(_inverse_norm_scale(*norm, first_target).mean())
    return lambda y: _inverse_norm_scale(*norm, y) / scale


def _reduce(comm, acc: MomentAccumulator, failure, d_x: dict, d_y: int) -> None:
    """Sum every process's share into ``acc`` once all agree that they succeeded."""
    if not comm.vote(failure is None):
        if failure is not None:
            raise failure
        raise NJTCError("another process failed during the statistics pass; no output written")
    if acc.buffer is None:  # this process's share held no training rows
        acc.allocate(d_x, d_y)
    comm.all_reduce(acc)


def store_statistics(store, layers, target: int, spec, *, statistics, progress, comm) -> Statistics:
    """The statistics of a fit ``spec`` that has rows: one pass over them, or saved ``statistics`` of the same model."""
    if statistics is None:
        return accumulate_statistics(store, layers, input_norm=spec.input_norm, device=spec.device,
                                     chunk_rows=spec.chunk_rows, float64=spec.float64, progress=progress, comm=comm,
                                     row_weight=spec.row_weight, skip_positions=spec.skip_positions,
                                     target_layer=target)
    stats, _ = saved_statistics(statistics, spec, target)
    if stats.meta.get("model_sha256") != store.model_sha256:
        raise NJTCError("the statistics were accumulated from another model's store (model_sha256 differs)")
    return stats
