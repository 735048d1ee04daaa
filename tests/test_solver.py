"""Closed-form solver against independent references: scikit-learn, brute-force SVD, Adam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression, Ridge

from njtc_solve.core.errors import NJTCError
from njtc_solve.solve.fit import fit_from_statistics
from njtc_solve.solve.solvers import gcv_alpha, solve_reduced_rank, sum_squared_error, weight_root
from njtc_solve.maps.shortcuts import normalize_rows
from njtc_solve.solve.stats import MomentAccumulator, Statistics


def make_data(n=400, d=12, seed=0, offset=0.0, noise=0.3):
    """Correlated inputs and a target with low-rank structure plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + offset
    y = x @ rng.normal(size=(d, 4)) @ rng.normal(size=(4, d)) + noise * rng.normal(size=(n, d)) + 2.0
    return x, y


def stats_of(x, y, chunk=None, input_norm="none", float64=True):
    acc = MomentAccumulator([0], input_norm, float64=float64)
    chunk = chunk or len(x)
    for i in range(0, len(x), chunk):
        acc.update({0: x[i:i + chunk]}, y[i:i + chunk])
    return acc.finalize({"target_layer": 1, "d_model": x.shape[1]})


# The float32 path's promise against float64 GEMMs (design.md §6, error model): the worst seen on
# these synthetic tests is 8.0e-6 (JTC) and 7.3e-6 (U), the same under MKL_CBWR=AVX2 and COMPATIBLE
# and ATEN_CPU_CAPABILITY=default and avx2; on SmolLM2 1.15e-5 (layer 1, MKL AVX2). ≥ 5× margin.
FLOAT32_PATH = 1e-4


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def full_map(stats, **kw):
    [sc] = fit_from_statistics(stats, method="jtc", ranks=None, **kw)
    m = sc.maps[0]
    return m.weight.double().numpy(), None if m.bias is None else m.bias.double().numpy()


def solve64(x, y, fit_intercept=True, alpha=0.0, rank=None):
    """float64 solve (the file format stores float32, so compare solutions here)."""
    s = stats_of(x, y)
    cxx, cxy = (s.layers[0].cxx, s.layers[0].cxy) if fit_intercept else s.raw(0)[:2]
    sol = solve_reduced_rank(cxx, cxy, alpha)
    coef = sol.coef_of_rank(rank)
    bias = (s.mean_y - s.layers[0].mean_x @ coef) if fit_intercept else torch.zeros(y.shape[1])
    return coef.numpy(), bias.numpy(), sol, s


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_full_rank_equals_sklearn(fit_intercept, alpha):
    x, y = make_data(offset=5.0)
    coef, bias, _, _ = solve64(x, y, fit_intercept, alpha)
    ref = (Ridge(alpha=alpha, fit_intercept=fit_intercept, solver="cholesky") if alpha
           else LinearRegression(fit_intercept=fit_intercept)).fit(x, y)
    assert rel(coef, ref.coef_.T) <= 1e-8
    if fit_intercept:
        assert rel(bias, ref.intercept_) <= 1e-8
    else:
        assert not bias.any()
    assert rel(x @ coef + bias, ref.predict(x)) <= 1e-8


def test_file_maps_match_float64_solution_to_float32_precision():
    x, y = make_data()
    weight, bias = full_map(stats_of(x, y))
    coef, b, _, _ = solve64(x, y)
    assert rel(weight, coef) <= 1e-6 and rel(bias, b) <= 1e-6


@pytest.mark.parametrize("rank", [1, 3, 4, 7])
def test_rank_r_equals_brute_force_svd_and_loss_identity(rank):
    x, y = make_data()
    coef, bias, sol, s = solve64(x, y, rank=rank)
    xc, yc = x - x.mean(0), y - y.mean(0)
    b_ols = np.linalg.lstsq(xc, yc, rcond=None)[0]
    _, sv, vt = np.linalg.svd(xc @ b_ols, full_matrices=False)  # SVD of the fitted values
    b_r = b_ols @ vt[:rank].T @ vt[:rank]
    assert rel(coef, b_r) <= 1e-8
    sse_direct = ((y - x @ coef - bias) ** 2).sum()
    sse_ols = ((yc - xc @ b_ols) ** 2).sum()
    assert sse_direct == pytest.approx(sse_ols + (sv[rank:] ** 2).sum(), rel=1e-9)
    m = s.layers[0]
    assert sum_squared_error(torch.from_numpy(coef), m.cxx, m.cxy, s.cyy) == pytest.approx(sse_direct, rel=1e-9)
    assert np.allclose(sol.singular_values.numpy(), sv, rtol=1e-9)


def test_every_rank_of_one_decomposition_equals_its_own_brute_force_solution():
    """One decomposition serves every rank: each rank's map against an independent SVD per rank."""
    x, y = make_data()
    s = stats_of(x, y)
    ranks = [1, 2, 4, 8, 12]
    fits = fit_from_statistics(s, method="njtc", ranks=ranks)
    xc, yc = x - x.mean(0), y - y.mean(0)
    b_ols = np.linalg.lstsq(xc, yc, rcond=None)[0]
    losses = []
    for rank, fit in zip(ranks, fits):
        _, _, vt = np.linalg.svd(xc @ b_ols, full_matrices=False)
        brute = b_ols @ vt[:rank].T @ vt[:rank]
        m = fit.maps[0]
        assert m.U.shape == (12, rank) and m.V.shape == (rank, 12)
        assert rel((m.U @ m.V).double().numpy(), brute) <= 1e-6, rank  # float32 file maps
        losses.append(fit.stats["layers"][0]["train_sse"])
        assert losses[-1] == pytest.approx(((yc - xc @ brute) ** 2).sum(), rel=1e-6)
    assert all(a > b for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adam_never_beats_the_closed_form(seed):
    x, y = make_data(n=300, d=10, seed=seed)
    rank = 3
    coef, bias, _, _ = solve64(x, y, rank=rank)
    optimum = ((y - x @ coef - bias) ** 2).mean()
    torch.manual_seed(seed)
    X, Y = torch.tensor(x), torch.tensor(y)
    U = torch.nn.Parameter(0.1 * torch.randn(10, rank, dtype=torch.float64))
    V = torch.nn.Parameter(0.1 * torch.randn(rank, 10, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    opt = torch.optim.Adam([U, V, b], lr=0.02)
    for _ in range(3000):
        opt.zero_grad()
        loss = ((Y - X @ U @ V - b) ** 2).mean()
        loss.backward()
        opt.step()
    final = float(((Y - X @ U @ V - b) ** 2).mean().detach())
    assert final >= optimum * (1 - 1e-10)
    assert final <= optimum * 1.05, "Adam should come close, else this comparison is vacuous"


def test_streaming_equals_in_memory():
    x, y = make_data(n=1000, offset=3.0)
    whole = stats_of(x, y)
    for chunk in (1, 7, 100, 999):
        part = stats_of(x, y, chunk=chunk)
        for a, b in [(part.layers[0].cxx, whole.layers[0].cxx), (part.layers[0].cxy, whole.layers[0].cxy),
                     (part.cyy, whole.cyy)]:
            assert rel(a, b) <= 1e-10
        assert rel(full_map(part)[0], full_map(whole)[0]) <= 1e-10


@pytest.mark.parametrize("float64", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_triangular_gram_equals_a_brute_force_float64_gram(float64, weighted):
    """Only the panels on and above the diagonal are multiplied (several panels, several GEMM row
    blocks, widths of one and of several panels); the statistics equal float64 brute force."""
    from njtc_solve.solve.stats import GEMM_ROWS, gram_panels

    g = np.random.default_rng(3)
    n, widths, d_y = 2 * GEMM_ROWS + 300, {0: 700, 1: 130, 2: 40}, 600
    xs = {k: (g.standard_normal((n, w)) * g.uniform(0.1, 10, w) + 5).astype(np.float32) for k, w in widths.items()}
    y = (g.standard_normal((n, d_y)) * 3 - 2).astype(np.float32)
    w = g.uniform(0.2, 3.0, n) if weighted else np.ones(n)
    acc = MomentAccumulator(widths, float64=float64)
    for start in range(0, n, 1100):
        part = slice(start, start + 1100)
        acc.update({k: x[part] for k, x in xs.items()}, y[part], torch.from_numpy(w[part]) if weighted else None)
    assert len(gram_panels(700)) == 2 and len(gram_panels(40)) == 1
    # below the diagonal blocks nothing is computed: the buffer holds zeros there until finalize mirrors
    c0, c1 = gram_panels(700)[1]
    assert not acc.sums["sxx.0"][c0:, :c0].any() and acc.sums["sxx.0"][:c0, c0:].all()
    stats = acc.finalize()

    def centred_gram(a, b):
        a, b = a.astype(np.float64), b.astype(np.float64)
        ma, mb = (w @ a) / w.sum(), (w @ b) / w.sum()
        return (a - ma).T @ ((b - mb) * w[:, None])

    tol = 1e-13 if float64 else 1e-6  # worst seen 1.4e-7 and 7.8e-16 (MKL_CBWR AVX2 and COMPATIBLE)
    assert rel(stats.cyy, centred_gram(y, y)) <= tol
    for k, x in xs.items():
        m = stats.layers[k]
        assert torch.equal(m.cxx, m.cxx.T)
        assert rel(m.cxx, centred_gram(x, x)) <= tol and rel(m.cxy, centred_gram(x, y)) <= tol
    assert torch.equal(stats.cyy, stats.cyy.T) and stats.n == pytest.approx(w.sum())


def test_shards_add_up_and_save_load_roundtrip(tmp_path):
    x, y = make_data(n=600, offset=10.0)
    whole = stats_of(x, y)
    total = stats_of(x[:250], y[:250]) + stats_of(x[250:], y[250:])
    assert total.n == 600
    assert rel(total.layers[0].cxx, whole.layers[0].cxx) <= 1e-12
    assert rel(total.layers[0].cxy, whole.layers[0].cxy) <= 1e-12
    assert rel(total.layers[0].mean_x, whole.layers[0].mean_x) <= 1e-14
    whole.save(tmp_path / "s.safetensors")
    back = Statistics.load(tmp_path / "s.safetensors")
    assert back.n == whole.n and torch.equal(back.layers[0].cxy, whole.layers[0].cxy)
    assert back.meta == whole.meta


def _outlier_data(n=200_000, d=16, seed=0):
    """Activations like a real LLM's: a large offset and sporadic outlier features ~1e4."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32) + 300.0
    x[:, 3] += 2000.0
    spikes = rng.random(n) < 0.01
    x[spikes, 5] = 1e4 * (1 + 0.1 * rng.normal(size=spikes.sum()))
    w = rng.normal(size=(d, d)).astype(np.float32)
    y = (x @ w + 50.0 + rng.normal(size=(n, d))).astype(np.float32)
    return x, y


def _naive_float32_map(x, y, chunk=4096):
    """Plain float32 sums without a shift: what design.md §6 warns against."""
    sxx = torch.zeros(x.shape[1], x.shape[1])
    sxy = torch.zeros(x.shape[1], y.shape[1])
    sx, sy = torch.zeros(x.shape[1]), torch.zeros(y.shape[1])
    for i in range(0, len(x), chunk):
        a, b = torch.from_numpy(x[i:i + chunk]), torch.from_numpy(y[i:i + chunk])
        sxx += a.T @ a
        sxy += a.T @ b
        sx += a.sum(0)
        sy += b.sum(0)
    n = len(x)
    cxx = sxx - torch.outer(sx, sx) / n
    cxy = sxy - torch.outer(sx, sy) / n
    return torch.linalg.lstsq(cxx.double(), cxy.double()).solution.numpy()


def test_shifted_float32_accumulation_is_accurate_where_plain_float32_fails():
    x, y = _outlier_data()
    reference = stats_of(x.astype(np.float64), y.astype(np.float64), chunk=4096, float64=True)
    ours = stats_of(x, y, chunk=4096, float64=False)
    ref_coef = solve_reduced_rank(reference.layers[0].cxx, reference.layers[0].cxy).coef.numpy()
    our_coef = solve_reduced_rank(ours.layers[0].cxx, ours.layers[0].cxy).coef.numpy()
    ours_err = rel(our_coef, ref_coef)
    naive_err = rel(_naive_float32_map(x, y), ref_coef)
    print(f"relative map error: shifted float32 {ours_err:.2e}, plain float32 {naive_err:.2e}")
    assert ours_err <= 5e-6  # worst seen 4.8e-7 (MKL AVX2, COMPATIBLE; ATen default, avx2)
    assert naive_err > 1e-2


def test_batch_standardised_nnjtc_equals_njtc_with_intercept():
    x, y = make_data(offset=4.0)
    x[:, 2] *= 50.0  # very different feature scales
    s = stats_of(x, y)
    [njtc] = fit_from_statistics(s, method="njtc", ranks=[3])
    [batch] = fit_from_statistics(s, method="nnjtc", ranks=[3], normalize="batch")
    assert rel(batch.transform_hidden(x, 0).double(), njtc.transform_hidden(x, 0).double()) <= 1e-5
    ln = stats_of(x, y, input_norm="layer")
    [layer] = fit_from_statistics(ln, method="nnjtc", ranks=[3], normalize="layer")
    assert rel(layer.transform_hidden(x, 0).double(), njtc.transform_hidden(x, 0).double()) > 1e-3


def test_layernorm_inputs_are_exactly_singular_and_still_solved():
    x, y = make_data()
    s = stats_of(x, y, input_norm="layer")
    lam = torch.linalg.eigvalsh(s.layers[0].cxx)
    assert lam[0] / lam[-1] < 1e-12, "LayerNorm outputs sum to zero: C_xx is singular"
    [fit] = fit_from_statistics(s, method="nnjtc", ranks=[4], normalize="layer")
    assert torch.isfinite(fit.maps[0].U).all()
    xn = normalize_rows(torch.tensor(x), "layer").numpy()
    ref = LinearRegression().fit(xn, y)
    [full] = fit_from_statistics(s, method="jtc", ranks=None, normalize="layer")
    assert rel(full.transform_hidden(x, 0).double(), ref.predict(xn)) <= 1e-5


def _llm_like(seed, n=40_000, d=256):
    """Residual-stream-like rows: a decaying spectrum, an offset and one massive feature; a target
    of rank-24 structure plus noise (float32, as a store holds them)."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    x = (rng.normal(size=(n, d)) * np.logspace(0, -1.5, d)) @ q.T + rng.normal(size=d)
    x[:, 7] += 60.0 + 10.0 * rng.normal(size=n)
    y = x @ rng.normal(size=(d, 24)) @ rng.normal(size=(24, d)) / d + 0.3 * rng.normal(size=(n, d))
    return x.astype(np.float32), y.astype(np.float32)


@pytest.mark.parametrize("seed", range(8))
def test_float32_layernorm_nnjtc_maps_equal_a_float64_accumulation(seed):
    """The default float32 path against float64 GEMMs, in the factors and the maps themselves.

    Before the all-ones direction was projected out, float32 rounding left it at ±1e-9 of the
    largest eigenvalue; 2 of these 8 seeds then gave maps 70–320% away from float64.
    """
    x, y = _llm_like(seed)
    s32 = stats_of(x, y, chunk=4096, input_norm="layer", float64=False)
    s64 = stats_of(x, y, chunk=4096, input_norm="layer", float64=True)
    assert s32.meta["accumulation"] == "float32" and s64.meta["accumulation"] == "float64"
    [a], [b] = (fit_from_statistics(s, method="nnjtc", ranks=[16], normalize="layer") for s in (s32, s64))
    [ja], [jb] = (fit_from_statistics(s, method="jtc", ranks=None, normalize="layer") for s in (s32, s64))
    A, B = a.maps[0], b.maps[0]
    assert rel(A.U, B.U) <= FLOAT32_PATH and rel(A.V, B.V) <= FLOAT32_PATH
    assert rel(A.U @ A.V, B.U @ B.V) <= FLOAT32_PATH and rel(A.bias, B.bias) <= FLOAT32_PATH
    assert rel(ja.maps[0].weight, jb.maps[0].weight) <= FLOAT32_PATH
    # no component along the all-ones input direction, which LayerNorm outputs never have
    assert float(A.U.double().sum(0).norm()) <= 1e-6 * float(A.U.double().norm())
    # so bf16-rounded inputs (not exactly normalised) get the same predictions
    rounded = torch.from_numpy(x[:2000]).bfloat16().float()
    assert rel(a.transform_hidden(rounded, 0), b.transform_hidden(rounded, 0)) <= FLOAT32_PATH


def test_projection_removes_the_ones_direction_that_float32_rounding_leaves():
    """Without the projection, float32 accumulation leaves ±1e-10…1e-9 on the all-ones direction."""
    from njtc_solve.solve.stats import project_out_ones

    x, y = _llm_like(4)
    s32 = stats_of(x, y, chunk=4096, input_norm="layer", float64=False)
    ones = torch.ones(256, dtype=torch.float64) / 16
    m = s32.layers[0]
    assert abs(float(ones @ m.cxx @ ones)) <= 1e-14 * float(torch.linalg.eigvalsh(m.cxx)[-1])
    assert float((ones @ m.cxy).norm()) <= 1e-14 * float(m.cxy.norm())
    assert project_out_ones(m).cxx.sub(m.cxx).abs().max() <= 1e-12 * m.cxx.abs().max()  # idempotent


def test_residual_map_is_rrr_on_the_difference():
    x, y = make_data()
    s = stats_of(x, y)
    [res] = fit_from_statistics(s, method="njtc", ranks=[2], residual=True)
    coef, bias, _, _ = solve64(x, y - x, rank=2)
    assert rel(res.transform_hidden(x, 0).double(), x + x @ coef + bias) <= 1e-5
    sse = ((y - res.transform_hidden(x, 0).double().numpy()) ** 2).sum()
    assert res.stats["layers"][0]["train_sse"] == pytest.approx(sse, rel=1e-4)


def test_weighted_rrr_equals_brute_force_in_the_weighted_metric():
    x, y = make_data(d=8)
    rng = np.random.default_rng(5)
    g = rng.normal(size=(8, 30))  # like diag(gain) @ unembedding.T
    s = stats_of(x, y)
    m = s.layers[0]
    sol = solve_reduced_rank(m.cxx, m.cxy, weight=weight_root(torch.tensor(g)))
    coef = sol.coef_of_rank(2).numpy()
    # brute force: f = sqrt(G Gᵀ); regress Y f on X, truncate the fitted values, map back
    lam, q = np.linalg.eigh(g @ g.T)
    f = (q * np.sqrt(lam)) @ q.T
    xc, yc = x - x.mean(0), y - y.mean(0)
    b = np.linalg.lstsq(xc, yc @ f, rcond=None)[0]
    _, _, vt = np.linalg.svd(xc @ b, full_matrices=False)
    brute = b @ vt[:2].T @ vt[:2] @ np.linalg.inv(f)
    assert rel(coef, brute) <= 1e-6
    weighted = lambda c: (((yc - xc @ c) @ g) ** 2).sum()
    unweighted = solve64(x, y, rank=2)[0]
    assert weighted(coef) < weighted(unweighted)


def test_weighted_rrr_with_an_ignored_direction_fits_it_on_its_own_features():
    """A LayerNorm head ignores the all-ones direction of its input (Γ singular): the weighted
    loss is minimised exactly, and that direction is fitted by least squares on the rank-r
    features, so the map keeps rank r."""
    x, y = make_data(d=8)
    rng = np.random.default_rng(6)
    g = rng.normal(size=(8, 30))
    g -= g.mean(0)  # P·G: the centring of a LayerNorm
    s = stats_of(x, y)
    m = s.layers[0]
    sol = solve_reduced_rank(m.cxx, m.cxy, weight=weight_root(torch.tensor(g)))
    coef = sol.coef_of_rank(2).numpy()
    assert np.linalg.matrix_rank(coef, tol=1e-8) == 2
    xc, yc = x - x.mean(0), y - y.mean(0)
    lam, q = np.linalg.eigh(g @ g.T)
    keep = lam > 1e-10 * lam.max()
    f, f_pinv, u = (q[:, keep] * np.sqrt(lam[keep])) @ q[:, keep].T, (q[:, keep] / np.sqrt(lam[keep])) @ q[:, keep].T, \
        q[:, ~keep]
    assert u.shape == (8, 1) and abs(abs(u[:, 0]).mean() - 8 ** -0.5) < 1e-8  # the all-ones direction
    b = np.linalg.lstsq(xc, yc @ f, rcond=None)[0]
    _, _, vt = np.linalg.svd(xc @ b, full_matrices=False)
    features = xc @ (b @ vt[:2].T)
    visible = b @ vt[:2].T @ vt[:2] @ f_pinv
    ignored = (b @ vt[:2].T) @ np.linalg.lstsq(features, yc @ u, rcond=None)[0] @ u.T
    assert rel(coef, visible + ignored) <= 1e-8
    weighted = lambda c: (((yc - xc @ c) @ g) ** 2).sum()
    assert weighted(coef) == pytest.approx(weighted(visible), rel=1e-10)


def test_logit_weight_factor_of_a_layernorm_head_ignores_the_ones_direction():
    from njtc_solve.core.head import Head

    rng = torch.Generator().manual_seed(0)
    kw = dict(eps=1e-5, norm_weight=torch.rand(6, generator=rng) + 0.5, unembed=torch.randn(20, 6, generator=rng))
    ln, rms = Head("layernorm", **kw).logit_weight_factor(), Head("rmsnorm", **kw).logit_weight_factor()
    assert float(ln.sum(0).abs().max()) <= 1e-12 and float(rms.sum(0).abs().max()) > 1e-3
    # an error along the ones direction does not change a LayerNorm head's logits at all
    head = Head("layernorm", **kw)
    h = torch.randn(4, 6, generator=rng)
    assert torch.allclose(head.logits(h + 3.0), head.logits(h), atol=1e-4)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_gcv_matches_explicit_hat_matrix(fit_intercept):
    """GCV against the hat matrix of the design itself: the unpenalised intercept is a column of
    ones and counts as one degree of freedom."""
    x, y = make_data(n=80, d=10, noise=2.0, offset=1.0)
    s = stats_of(x, y)
    grid = [0.1, 1.0, 10.0, 100.0]
    cxx, cxy, cyy = (s.layers[0].cxx, s.layers[0].cxy, s.cyy) if fit_intercept else s.raw(0)
    best, scores = gcv_alpha(cxx, cxy, cyy, s.n_rows, grid=grid, fit_intercept=fit_intercept)
    design = np.hstack([x, np.ones((80, 1))]) if fit_intercept else x
    for alpha in grid:
        penalty = alpha * np.eye(design.shape[1])
        if fit_intercept:
            penalty[-1, -1] = 0.0
        h = design @ np.linalg.solve(design.T @ design + penalty, design.T)
        resid = y - h @ y
        explicit = ((resid ** 2).sum() / 80) / (1 - np.trace(h) / 80) ** 2
        assert scores[alpha] == pytest.approx(explicit, rel=1e-9)
    assert best == min(scores, key=scores.get)
    [auto] = fit_from_statistics(s, method="jtc", ranks=None, alpha="auto")
    assert auto.stats["layers"][0]["alpha"] > 0


def test_gcv_counts_rows_not_total_weight():
    x, y = make_data(n=200, d=10, noise=2.0)
    w = np.full(200, 0.25)  # weights that sum to 50 rows' worth
    acc = MomentAccumulator([0], float64=True)
    acc.update({0: x}, y, w)
    s = acc.finalize()
    assert s.n == pytest.approx(50.0) and s.n_rows == 200
    grid = [1.0]
    _, by_rows = gcv_alpha(s.layers[0].cxx, s.layers[0].cxy, s.cyy, s.n_rows, grid=grid)
    plain = stats_of(x, y)  # the same rows unweighted: the weighted SSE is a quarter of it
    _, unweighted = gcv_alpha(plain.layers[0].cxx, plain.layers[0].cxy, plain.cyy, plain.n_rows, grid=[4.0])
    assert by_rows[1.0] == pytest.approx(unweighted[4.0] / 4, rel=1e-9)


def test_bad_method_arguments():
    s = stats_of(*make_data())
    with pytest.raises(NJTCError, match="rank 0"):
        fit_from_statistics(s, method="njtc", ranks=[0])
    with pytest.raises(NJTCError, match="rank 13"):
        fit_from_statistics(s, method="njtc", ranks=[13])
    with pytest.raises(NJTCError, match="drop `ranks`"):
        fit_from_statistics(s, method="jtc", ranks=[4])
    with pytest.raises(NJTCError, match="statistics of layer-normalised"):
        fit_from_statistics(s, method="nnjtc", ranks=[4])
    with pytest.raises(NJTCError, match="no layer 3"):
        fit_from_statistics(s, method="njtc", ranks=[4], layers=[3])
    s.layers[0].cxy[0, 0] = float("nan")
    with pytest.raises(NJTCError, match="NaN"):
        fit_from_statistics(s, method="njtc", ranks=[4])


def test_row_weighted_statistics_equal_sklearn_sample_weight():
    x, y = make_data(n=500, offset=7.0)
    w = np.random.default_rng(3).uniform(0.1, 5.0, size=500)
    acc = MomentAccumulator([0], float64=True)
    for i in range(0, 500, 64):
        acc.update({0: x[i:i + 64]}, y[i:i + 64], w[i:i + 64])
    s = acc.finalize({"target_layer": 1, "d_model": 12})
    assert s.n == pytest.approx(w.sum())
    coef, bias = full_map(s)
    ref = LinearRegression().fit(x, y, sample_weight=w)
    assert rel(coef, ref.coef_.T) <= 1e-6 and rel(bias, ref.intercept_) <= 1e-6  # float32 file maps
    exact = solve_reduced_rank(s.layers[0].cxx, s.layers[0].cxy).coef.numpy()
    assert rel(exact, ref.coef_.T) <= 1e-8


def test_a_massive_sparse_feature_keeps_every_resolved_direction_in_float32():
    """One feature at 3000 on 2% of rows (a "massive activation") puts λ_min/λ_max near 5e-8; a
    cut-off at float32 precision relative to λ_max would drop resolved directions (an 18% error)."""
    rng = np.random.default_rng(0)
    x = (0.1 * rng.normal(size=(40_000, 64))).astype(np.float32)
    x[rng.random(40_000) < 0.02, 5] = 3000.0
    y = (x @ rng.normal(size=(64, 64)) / 8 + 0.1 * rng.normal(size=(40_000, 64))).astype(np.float32)
    s32, s64 = stats_of(x, y, chunk=4096, float64=False), stats_of(x, y, chunk=4096, float64=True)
    lam = torch.linalg.eigvalsh(s64.layers[0].cxx)
    assert lam[0] / lam[-1] < 1e-7
    b32 = solve_reduced_rank(s32.layers[0].cxx, s32.layers[0].cxy).coef
    b64 = solve_reduced_rank(s64.layers[0].cxx, s64.layers[0].cxy).coef
    assert rel(b32, b64) <= FLOAT32_PATH  # worst seen 7.6e-6


def test_fit_passes_the_row_count_and_the_intercept_to_gcv():
    x, y = make_data(n=30, d=10, noise=3.0)
    w = np.random.default_rng(1).uniform(0.2, 0.6, size=30)
    acc = MomentAccumulator([0], float64=True)
    acc.update({0: x}, y, w)
    s = acc.finalize({"target_layer": 1, "d_model": 10})
    for fit_intercept in (True, False):
        [auto] = fit_from_statistics(s, method="jtc", ranks=None, alpha="auto", fit_intercept=fit_intercept)
        cxx, cxy, cyy = (s.layers[0].cxx, s.layers[0].cxy, s.cyy) if fit_intercept else s.raw(0)
        expected, _ = gcv_alpha(cxx, cxy, cyy, 30, fit_intercept=fit_intercept)
        wrong, _ = gcv_alpha(cxx, cxy, cyy, s.n, fit_intercept=not fit_intercept)
        assert auto.stats["layers"][0]["alpha"] == expected
        assert expected != wrong, "the check must tell the right call from the wrong one"
