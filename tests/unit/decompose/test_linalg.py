"""Streaming least squares and metrics against independent numpy references."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.linalg import LinearProbe, R2Accumulator, StreamingLstsq, fvu

D_IN, D_OUT, N = 64, 32, 5000


def offset_data(n: int = N, seed: int = 0, mean: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """float32 X with a large mean offset (100, std ~1) and strongly correlated columns; Y linear
    + noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, D_IN))
    mix = np.eye(D_IN) + 0.8 * rng.standard_normal((D_IN, D_IN)) / np.sqrt(D_IN)
    mix[:, 1] = mix[:, 0] + 0.01 * mix[:, 1]  # column 1 nearly duplicates column 0
    x = mean + z @ mix
    w = rng.standard_normal((D_IN, D_OUT))
    y = (x - mean) @ w + 3.0 + rng.standard_normal((n, D_OUT))
    return x.astype(np.float32), y.astype(np.float32)


def with_ones(x: np.ndarray) -> np.ndarray:
    return np.hstack([x.astype(np.float64), np.ones((x.shape[0], 1))])


def fit(x: np.ndarray, y: np.ndarray, chunks: list[int] | None = None, **kw) -> StreamingLstsq:
    acc = StreamingLstsq(x.shape[1], y.shape[1], **kw)
    bounds = np.cumsum([0, *(chunks or [len(x)])])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc.update(torch.from_numpy(x[lo:hi]), torch.from_numpy(y[lo:hi]))
    return acc


def pred_err(probe: LinearProbe, ref: LinearProbe, x: np.ndarray) -> float:
    """Prediction error of ``probe`` against ``ref``, relative to the spread of ref's
    predictions."""
    want = ref.predict(torch.from_numpy(x).double())
    got = probe.predict(torch.from_numpy(x).double())
    return float((got - want).norm() / (want - want.mean(0)).norm())


def rel(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_matches_numpy_lstsq_with_large_offset_where_naive_float32_fails():
    x, y = offset_data()
    ref, *_ = np.linalg.lstsq(with_ones(x), y.astype(np.float64), rcond=None)
    probe = fit(x, y, chunks=[1000] * 5).solve()
    # cond of the centred XᵀX is ~1e5 here (the near-duplicate column), so a backward-stable
    # float64 solve is accurate to ~eps·cond ≈ 1e-11; 1e-8 leaves a wide margin.
    xc = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    assert 1e4 < np.linalg.cond(xc.T @ xc) < 1e7
    assert rel(probe.weight, ref[:-1]) < 1e-8
    assert rel(probe.bias, ref[-1]) < 1e-8
    pred = probe.predict(torch.from_numpy(x))
    assert pred.dtype == torch.float32
    assert rel(pred, with_ones(x) @ ref) < 1e-6  # float32 output: ~6e-8 rounding per entry

    # Naive: uncentred normal equations of [X, 1] formed in float32 (solved in float64).
    a = with_ones(x).astype(np.float32)
    gram, rhs = (a.T @ a).astype(np.float64), (a.T @ y).astype(np.float64)
    naive = np.linalg.solve(gram, rhs)
    assert rel(naive[:-1], ref[:-1]) > 0.5  # measured ~3: no correct digit left


def test_float32_gemms_are_accurate_on_offset_data():
    x, y = offset_data()
    ref = fit(x, y).solve()
    fast = fit(x, y, gemm_dtype=torch.float32).solve()
    # Worst case ≈ eps32 · cond(centred, scaled XᵀX) ≈ 6e-8 · 2e5 ≈ 1e-2; measured 5e-5
    # (the naive float32 predictions above are off by 7e-2). Weights move more (~3e-3).
    assert pred_err(fast, ref, offset_data(seed=1)[0]) < 5e-4


def test_float32_gemms_warn_when_ill_conditioned(caplog):
    x, y = offset_data()
    x[:, 2] = x[:, 3] + 1e-3 * (x[:, 2] - 100)  # cond of the scaled, centred XᵀX ~1e7
    with caplog.at_level(logging.WARNING):
        fit(x, y).solve()
    assert "float32" not in caplog.text
    with caplog.at_level(logging.WARNING):
        fit(x, y, gemm_dtype=torch.float32).solve()
    assert "float32 GEMMs" in caplog.text


def test_no_bias_matches_lstsq_without_ones_column():
    x, y = offset_data()
    ref, *_ = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)
    probe = fit(x, y, bias=False).solve()
    assert torch.count_nonzero(probe.bias) == 0
    # Without an intercept the mean stays in XᵀX: cond ~2e10, so eps·cond ≈ 5e-6 bounds the
    # weight error of any normal-equations solve (measured ~2e-8); predictions are far better.
    assert rel(probe.weight, ref) < 1e-6
    assert rel(probe.predict(torch.from_numpy(x).double()), x.astype(np.float64) @ ref) < 1e-8


@pytest.mark.parametrize("ridge", [0.5, 1e3])
def test_ridge_matches_closed_form_with_unpenalised_intercept(ridge: float):
    x, y = offset_data()
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    xm, ym = x64.mean(0), y64.mean(0)
    xc, yc = x64 - xm, y64 - ym
    w = np.linalg.solve(xc.T @ xc + ridge * np.eye(D_IN), xc.T @ yc)
    probe = fit(x, y, chunks=[2500, 2500]).solve(ridge=ridge)
    assert rel(probe.weight, w) < 1e-9
    assert rel(probe.bias, ym - xm @ w) < 1e-9

    w0 = np.linalg.solve(x64.T @ x64 + ridge * np.eye(D_IN), x64.T @ y64)
    assert rel(fit(x, y, bias=False).solve(ridge=ridge).weight, w0) < 1e-6  # cond ~2e10, see above


def test_chunking_and_merging_are_invariant():
    x, y = offset_data()
    one = fit(x, y).solve()
    chunked = fit(x, y, chunks=[1, 7, 992, 3000, 1000]).solve()
    # Halves pick different reference rows; merge re-expresses the sums exactly.
    a, b = fit(x[:2000], y[:2000]), fit(x[2000:], y[2000:])
    assert not torch.equal(a.shift_x, b.shift_x)
    a.merge(b)
    assert a.n == N
    merged = a.solve()
    for probe in (chunked, merged):
        assert rel(probe.weight, one.weight) < 1e-10
        assert rel(probe.bias, one.bias) < 1e-10


def test_merge_and_load_into_empty_or_float32_accumulators():
    x, y = offset_data()
    one = fit(x, y).solve()
    shift = torch.from_numpy(x[0]).double() + 1e-9  # not representable in float32
    first = fit(x[:2500], y[:2500], shift_x=torch.full((D_IN,), 100.0 + 1e-9))
    empty = StreamingLstsq(D_IN, D_OUT, gemm_dtype=torch.float32)
    empty.merge(first)  # adopts a float32-representable reference, re-expresses the sums
    assert torch.equal(empty.shift_x, empty.shift_x.float().double())
    loaded = StreamingLstsq(D_IN, D_OUT, gemm_dtype=torch.float32)
    loaded.load_state_dict(fit(x[:2500], y[:2500], shift_x=shift).state_dict())
    for acc in (empty, loaded):
        acc.update(torch.from_numpy(x[2500:]), torch.from_numpy(y[2500:]))
        assert acc.n == N
        assert pred_err(acc.solve(), one, offset_data(seed=1)[0]) < 5e-4  # float32 rows, see above


def test_state_sums_add_like_all_reduce():
    x, y = offset_data()
    one = fit(x, y).solve()
    shift_x, shift_y = torch.from_numpy(x[0]), torch.from_numpy(y[0])
    parts = [fit(x[i::3], y[i::3], shift_x=shift_x, shift_y=shift_y) for i in range(3)]
    states = [p.state_dict() for p in parts]
    total = dict(states[0])
    for key in StreamingLstsq.ADDITIVE_KEYS:  # what all_reduce(SUM) does to each tensor
        total[key] = sum(s[key] for s in states)
    acc = StreamingLstsq(D_IN, D_OUT)
    acc.load_state_dict(total)
    assert acc.n == N
    assert rel(acc.solve().weight, one.weight) < 1e-10


def test_empty_state_round_trip_keeps_reference_unset():
    x, y = offset_data(n=100)
    empty = StreamingLstsq(D_IN, D_OUT)
    fresh = StreamingLstsq(D_IN, D_OUT)
    fresh.load_state_dict(empty.state_dict())
    assert fresh.shift_x is None and fresh.n == 0
    fresh.update(torch.from_numpy(x), torch.from_numpy(y))
    assert torch.equal(fresh.shift_x, fit(x, y).shift_x)
    with pytest.raises(DarkMatterError):
        StreamingLstsq(D_IN, D_OUT).solve()


def test_duplicate_column_falls_back_to_pseudo_inverse(caplog):
    rng = np.random.default_rng(3)
    x = (50 + rng.standard_normal((800, 8))).astype(np.float32)
    x[:, 5] = x[:, 2]  # exactly singular
    y = (x @ rng.standard_normal((8, 3)) + rng.standard_normal((800, 3))).astype(np.float32)
    xt = (50 + rng.standard_normal((200, 8))).astype(np.float32)
    xt[:, 5] = xt[:, 2]
    ref, *_ = np.linalg.lstsq(with_ones(x), y.astype(np.float64), rcond=None)
    with caplog.at_level(logging.WARNING):
        probe = fit(x, y).solve()
    assert "rank deficient" in caplog.text
    assert probe.rank == 7
    assert np.isfinite(probe.weight.numpy()).all()
    # Weights are not unique, but predictions on rows in the column space are.
    for rows in (x, xt):
        assert rel(probe.predict(torch.from_numpy(rows).double()), with_ones(rows) @ ref) < 1e-9


def test_constant_column_gets_zero_weight_with_bias():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 4)).astype(np.float32)
    x[:, 1] = 7.0
    y = (x[:, :1] * 2 + 1).astype(np.float32)
    probe = fit(x, y).solve()
    assert probe.rank == 3
    assert float(probe.weight[1, 0]) == 0.0
    assert abs(float(probe.weight[0, 0]) - 2) < 1e-6 and abs(float(probe.bias[0]) - 1) < 1e-5


def test_state_size_does_not_depend_on_rows():
    sizes = []
    for n in (10, 4000):
        x, y = offset_data(n=n)
        state = fit(x, y).state_dict()
        sizes.append({k: tuple(v.shape) for k, v in state.items()})
    assert sizes[0] == sizes[1]
    assert sizes[0]["sum_xx"] == (D_IN, D_IN) and sizes[0]["sum_xy"] == (D_IN, D_OUT)
    numel = sum(math.prod(s) for s in sizes[0].values())
    # + shifts, n, bias flag, float32 row count, float32 check
    assert numel == (D_IN + 1) * (D_IN + D_OUT) + D_IN + D_OUT + 4


def test_input_validation():
    acc = StreamingLstsq(3, 2)
    with pytest.raises(ShapeMismatchError):
        acc.update(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(ShapeMismatchError):
        acc.update(torch.zeros(4, 2), torch.zeros(4, 2))
    bad = torch.zeros(4, 3)
    bad[1, 1] = math.nan
    with pytest.raises(DarkMatterError):
        acc.update(bad, torch.zeros(4, 2))
    assert acc.n == 0


def test_inputs_are_not_modified():
    rng = np.random.default_rng(10)
    x, y = (
        torch.from_numpy(rng.standard_normal((50, 3))),
        torch.from_numpy(rng.standard_normal((50, 2))),
    )
    before = (x.clone(), y.clone())
    StreamingLstsq(3, 2).update(x, y)
    R2Accumulator(2).update(y, y[:, [1, 0]])
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])


def test_scalar_target_and_predict_dtype():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 5)).astype(np.float32) + 30
    t = x @ np.arange(1, 6, dtype=np.float32) - 4
    acc = StreamingLstsq(5, 1)
    acc.update(torch.from_numpy(x), torch.from_numpy(t))  # 1-D target for d_out == 1
    probe = acc.solve()
    assert isinstance(probe, LinearProbe) and probe.weight.dtype == torch.float64
    np.testing.assert_allclose(probe.weight[:, 0].numpy(), np.arange(1, 6), rtol=1e-5)
    out = probe.predict(torch.from_numpy(x).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (300, 1)


# ---------------------------------------------------------------- R² / FVU


def np_scores(y: np.ndarray, y_hat: np.ndarray) -> tuple[float, np.ndarray]:
    """Independent two-pass reference: pooled FVU and per-dimension R² (NaN for constant dims)."""
    sse = ((y - y_hat) ** 2).sum(0)
    sst = ((y - y.mean(0)) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(sst > 0, 1 - sse / sst, np.nan)
    return float(sse.sum() / sst.sum()), r2


def scored(y: np.ndarray, y_hat: np.ndarray, chunks: list[int]) -> R2Accumulator:
    acc = R2Accumulator(y.shape[1])
    bounds = np.cumsum([0, *chunks])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc.update(torch.from_numpy(y[lo:hi]), torch.from_numpy(y_hat[lo:hi]))
    return acc


def test_r2_accumulator_matches_numpy_chunked_and_merged():
    rng = np.random.default_rng(6)
    y = 1e4 + rng.standard_normal((3000, 6)) * np.arange(1, 7)
    y[:, 4] = -2.5  # constant dimension: SST exactly 0, excluded from the mean
    y_hat = y + 0.5 * rng.standard_normal(y.shape)
    ref_fvu, ref_r2 = np_scores(y, y_hat)
    one = scored(y, y_hat, [3000])
    chunked = scored(y, y_hat, [1, 999, 2000])
    merged = scored(y[:1200], y_hat[:1200], [1200])
    merged.merge(scored(y[1200:], y_hat[1200:], [1800]))
    for acc in (one, chunked, merged):
        assert acc.n == 3000
        assert acc.sst_per_dim()[4] == 0.0
        assert abs(acc.fvu() - ref_fvu) < 1e-10 * ref_fvu
        assert abs(acc.r2_pooled() - (1 - ref_fvu)) < 1e-10
        np.testing.assert_allclose(acc.r2_per_dim().numpy(), ref_r2, rtol=1e-9, equal_nan=True)
        assert abs(acc.r2_mean_dim() - np.nanmean(ref_r2)) < 1e-9
        assert abs(acc.sse() - ((y - y_hat) ** 2).sum()) < 1e-9 * acc.sse()
    assert math.isnan(float(one.r2_per_dim()[4]))


def test_sst_is_stable_under_huge_offsets():
    rng = np.random.default_rng(7)
    y = 1e7 + rng.standard_normal((4000, 3))
    exact = ((y - y.mean(0)) ** 2).sum()  # two-pass
    naive = (y**2).sum() - 4000 * (y.mean(0) ** 2).sum()  # one-pass textbook formula
    ours = scored(y, y, [1000] * 4).sst()
    assert abs(naive - exact) > 1e-6 * exact
    assert abs(ours - exact) < 1e-10 * exact


def test_r2_state_round_trip_and_degenerate_cases():
    rng = np.random.default_rng(8)
    y, y_hat = rng.standard_normal((50, 2)), rng.standard_normal((50, 2))
    acc = scored(y, y_hat, [50])
    copy = R2Accumulator(2)
    copy.load_state_dict(acc.state_dict())
    assert copy.fvu() == acc.fvu() and copy.n == 50
    assert math.isnan(R2Accumulator(2).fvu())
    const = scored(np.ones((5, 2)), np.zeros((5, 2)), [5])
    assert math.isnan(const.fvu()) and math.isnan(const.r2_mean_dim())


def test_fvu_function_matches_definition():
    rng = np.random.default_rng(9)
    x = (170 + rng.standard_normal((2000, 16))).astype(np.float32)
    x_hat = x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    ref, _ = np_scores(x.astype(np.float64), x_hat.astype(np.float64))
    assert abs(fvu(torch.from_numpy(x), torch.from_numpy(x_hat)) - ref) < 1e-10 * ref
    with pytest.raises(ShapeMismatchError):
        fvu(torch.zeros(3, 2), torch.zeros(3, 3))
