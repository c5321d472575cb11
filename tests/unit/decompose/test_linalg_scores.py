"""``SharedTargetR2``: many predictions of shared targets, against numpy, with jackknife intervals;
and the bootstrap helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_darkmatter.linalg import R2Accumulator, bootstrap_counts, percentile_interval
from sae_darkmatter.linalg.scores import SharedTargetR2, jackknife_interval


def _mean_dim_r2(y: np.ndarray, pred: np.ndarray) -> float:
    sst = ((y - y.mean(0)) ** 2).sum(0)
    return float((1 - ((y - pred) ** 2).sum(0) / sst).mean())


def _data(n=900, d=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.normal(3.0, 1.0, (n, d))
    pred = y + rng.normal(0, 0.7, (n, d))
    return y, pred, rng.permutation(n) % 4


def test_scores_equal_numpy_and_the_jackknife_its_definition():
    y, pred, groups = _data()
    scores = SharedTargetR2(5, torch.device("cpu"), n_groups=4)
    for lo in range(0, 900, 250):  # chunks of unequal size
        sl = slice(lo, lo + 250)
        scores.targets(torch.from_numpy(groups[sl]), a=torch.from_numpy(y[sl]).float())
        scores.add(("p", "a"), "a", torch.from_numpy(pred[sl]).float())
    y32 = torch.from_numpy(y).float().double().numpy()  # the targets as float32 data
    p32 = torch.from_numpy(pred).float().double().numpy()
    full = _mean_dim_r2(y32, p32)
    assert scores.accumulator(("p", "a")).r2_mean_dim() == pytest.approx(full, abs=1e-12)
    ref = R2Accumulator(5)
    ref.update(torch.from_numpy(y32), torch.from_numpy(p32))
    assert scores.accumulator(("p", "a")).sse() == pytest.approx(ref.sse(), rel=1e-12)
    thetas = [_mean_dim_r2(y32[groups != g], p32[groups != g]) for g in range(4)]
    low, high = scores.r2_mean_dim_interval(("p", "a"))
    t = np.array(thetas)
    se = np.sqrt(3 / 4 * ((t - t.mean()) ** 2).sum())
    assert (low, high) == pytest.approx((full - 1.96 * se, full + 1.96 * se), abs=1e-10)
    assert jackknife_interval(thetas, full) == pytest.approx((low, high), abs=1e-10)


def test_one_group_gives_no_interval_and_non_finite_predictions_are_refused():
    y, pred, _ = _data(n=50)
    scores = SharedTargetR2(5, torch.device("cpu"), n_groups=4)
    scores.targets(torch.zeros(50, dtype=torch.int64), a=torch.from_numpy(y))
    scores.add(("p", "a"), "a", torch.from_numpy(pred))
    assert scores.r2_mean_dim_interval(("p", "a")) is None
    bad = torch.from_numpy(pred).clone()
    bad[3, 1] = float("nan")
    with pytest.raises(Exception, match=r"\('q', 'a'\) of a is not finite"):
        scores.add(("q", "a"), "a", bad)


def test_bootstrap_counts_are_resamples_with_replacement():
    counts = bootstrap_counts(7, 50, seed=3)
    assert counts.shape == (50, 7) and counts.dtype == np.float64
    assert (counts.sum(1) == 7).all() and (counts >= 0).all()
    assert np.array_equal(counts, bootstrap_counts(7, 50, seed=3))  # a pure function of seed
    assert percentile_interval(np.array([np.nan, *range(101)])) == pytest.approx([2.5, 97.5])
