"""Float32 GEMMs into float64 sums at a 7B model's width (d = 4096) on rows with attention-sink outliers.

A few features of the residual stream are 100-1000x the rest, and on the sink tokens larger still
(Sun et al. 2024, "Massive activations"). The statistics accumulate in float32 GEMMs of
``GEMM_ROWS`` rows, shifted by the first chunk's mean, added into float64; the maps solved from
them must equal those of a float64 accumulation. Few rows keep it to seconds: a ridge penalty
makes the 4096-wide solve well posed, and the same float64 solve is applied to both statistics,
so the comparison isolates the accumulation (docs/reference/numerics.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import njtc_solve.solve.stats as stats
from njtc_solve.solve.stats import MomentAccumulator


def sink_rows(n: int, d: int, d_y: int, seed: int = 0):
    """Rows like a large model's residual stream: Gaussian features, 4 outlier features with a large mean
    (100-1000x the typical scale) and, on one row in 32 (the sink tokens), those features near 1e4."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d)).astype(np.float32)
    massive = g.choice(d, 4, replace=False)
    x[:, massive] = x[:, massive] * 20 + g.uniform(100, 1000, 4).astype(np.float32)
    sinks = np.arange(0, n, 32)
    x[np.ix_(sinks, massive)] = g.uniform(5e3, 2e4, (len(sinks), 4)).astype(np.float32)
    b = (g.standard_normal((d, d_y)) / np.sqrt(d)).astype(np.float32)
    y = x @ b + 0.5 * g.standard_normal((n, d_y)).astype(np.float32)
    y[:, :2] += 300.0  # the target's own large features
    return x, y


def ridge_map(cxx: torch.Tensor, cxy: torch.Tensor, alpha_rel: float = 1e-3) -> torch.Tensor:
    """``(C_xx + αI)⁻¹ C_xy`` solved in float64 (Cholesky), α relative to the mean eigenvalue."""
    cxx, cxy = cxx.double(), cxy.double()
    d = cxx.shape[0]
    alpha = alpha_rel * float(torch.trace(cxx)) / d
    return torch.cholesky_solve(cxy, torch.linalg.cholesky(cxx + alpha * torch.eye(d, dtype=torch.float64)))


def test_float32_gemms_into_float64_sums_give_the_float64_maps_at_d_4096_with_attention_sinks():
    x, y = sink_rows(n=1024, d=4096, d_y=64)
    stats = {}
    for float64 in (False, True):
        acc = MomentAccumulator([0], float64=float64)
        for start in range(0, len(x), 512):
            acc.update({0: x[start:start + 512]}, y[start:start + 512])
        stats[float64] = acc.finalize()
    reference = ridge_map(stats[True].layers[0].cxx, stats[True].layers[0].cxy)
    ours = ridge_map(stats[False].layers[0].cxx, stats[False].layers[0].cxy)
    err = float((ours - reference).norm() / reference.norm())
    print(f"d=4096 with sinks: map relative error {err:.2e}")
    # worst seen 7.9e-5 under MKL_CBWR=AVX2 and MKL_CBWR=COMPATIBLE; the rows' float32 products are the limit
    # (one plain float32 GEMM of these 1024 rows is as close, 7-9e-5; the shift and the float64 sums matter
    # as rows grow: test_solver.py::test_shifted_float32_accumulation_is_accurate_where_plain_float32_fails)
    assert err <= 4e-4


@pytest.mark.parametrize("batch_bytes", [32 << 20, 1, 2 * 96 * 64 * 4])
@pytest.mark.parametrize("rows", [0, 1, 1023, 1024, 1025, 5000])
def test_batched_gram_adds_every_block_once_whatever_the_batch(monkeypatch, rows, batch_bytes):
    """add_gram's batched GEMMs (one block at a time, two, or the whole chunk) against a float64 product of the
    same float32 rows: each 1024-row block added once (a block dropped or added twice is off by ~1e-1)."""
    monkeypatch.setattr(stats, "GEMM_BATCH_BYTES", batch_bytes)
    g = torch.Generator().manual_seed(rows)
    a, b = torch.randn(rows, 96, generator=g) * 10 + 3, torch.randn(rows, 64, generator=g)
    total = torch.ones(96, 64, dtype=torch.float64)
    stats.add_gram(total, a, b)
    expected = 1 + a.double().T @ b.double()
    assert torch.allclose(total, expected, rtol=1e-5, atol=1e-3 * max(rows, 1) ** 0.5)
