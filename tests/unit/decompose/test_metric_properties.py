"""Property-based tests (hypothesis): the invariances of the FVU / R² metrics against an
independent numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sae_darkmatter.linalg import R2Accumulator, fvu

FAST = settings(max_examples=40, deadline=None)

# ---------------------------------------------------------------------------------------- metrics

# Values are 0 or of magnitude 1e-6..1e3, so squares, sums and power-of-two scalings stay in the
# normal float64 range (no underflow): that makes the power-of-two scaling check exact.
VALUE = st.just(0.0) | st.floats(1e-6, 1e3) | st.floats(-1e3, -1e-6)


@st.composite
def pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """float64 (x, x_hat) of shape [n, d] whose x has a non-negligible spread."""
    n, d = draw(st.integers(2, 40)), draw(st.integers(1, 5))
    x = draw(hnp.arrays(np.float64, (n, d), elements=VALUE))
    x_hat = draw(hnp.arrays(np.float64, (n, d), elements=VALUE))
    assume(_np_sst(x) > 1e-9 * (1.0 + float(np.square(x).sum())))
    return x, x_hat


def _np_sst(x: np.ndarray) -> float:
    return float(np.square(x - x.mean(axis=0)).sum())


def _np_fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Independent reference: Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the per-dimension mean)."""
    return float(np.square(x - x_hat).sum()) / _np_sst(x)


def _tol(x: np.ndarray, x_hat: np.ndarray, shift: float = 0.0) -> float:
    """Absolute tolerance on fvu for inputs perturbed by rounding of ~eps·|entry|.

    A first-order bound with generous constants (eps = 2.2e-16, the 1e-12 factors leave room for
    n <= 40 terms): a perturbation δ of every entry moves SSE by ~2·sqrt(SSE·Σδ²) + Σδ² and SST
    by ~2·sqrt(SST·Σδ²); ``shift`` is the magnitude of a constant added before rounding.
    """
    m = float(np.square(np.abs(x) + np.abs(x_hat) + shift).sum())
    sse, sst = float(np.square(x - x_hat).sum()), _np_sst(x)
    f = sse / sst
    return (
        1e-9 * f + 1e-12 * (math.sqrt(sse * m) + 1e-12 * m) / sst + 1e-12 * f * math.sqrt(m / sst)
    )


def _fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    return fvu(torch.from_numpy(x), torch.from_numpy(x_hat))


@FAST
@given(xs=pairs())
def test_fvu_matches_numpy_and_is_zero_on_itself(xs: tuple[np.ndarray, np.ndarray]) -> None:
    x, x_hat = xs
    assert _fvu(x, x) == 0.0
    assert _fvu(x, x_hat) == pytest.approx(_np_fvu(x, x_hat), rel=0, abs=_tol(x, x_hat))


@FAST
@given(xs=pairs(), data=st.data())
def test_fvu_invariances(xs: tuple[np.ndarray, np.ndarray], data: st.DataObject) -> None:
    x, x_hat = xs
    ref = _fvu(x, x_hat)
    # a common permutation of the tokens: only the summation order changes
    perm = np.array(data.draw(st.permutations(range(len(x))), label="perm"))
    assert _fvu(x[perm], x_hat[perm]) == pytest.approx(ref, rel=0, abs=_tol(x, x_hat))
    # scaling by a power of two is exact in floating point, so the ratio is bit-identical
    k = data.draw(st.integers(-10, 10), label="log2 c")
    assert _fvu(x * 2.0**k, x_hat * 2.0**k) == ref
    # any c > 0: each scaled entry is rounded once
    c = data.draw(st.floats(1e-3, 1e3), label="c")
    assert _fvu(x * c, x_hat * c) == pytest.approx(ref, rel=0, abs=_tol(x, x_hat))
    # adding the same vector v to both: entries are rounded at the magnitude of x + v
    v = data.draw(hnp.arrays(np.float64, (x.shape[1],), elements=st.floats(-1e3, 1e3)), label="v")
    shift = float(np.abs(v).max())
    assert _fvu(x + v, x_hat + v) == pytest.approx(ref, rel=0, abs=_tol(x, x_hat, shift))


@FAST
@given(xs=pairs(), data=st.data())
def test_r2_accumulator_chunking_does_not_matter(
    xs: tuple[np.ndarray, np.ndarray], data: st.DataObject
) -> None:
    x, x_hat = xs
    n, d = x.shape
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1)), label="cuts"))
    one = R2Accumulator(d)
    one.update(torch.from_numpy(x), torch.from_numpy(x_hat))
    many = R2Accumulator(d)
    for lo, hi in zip([0, *cuts], [*cuts, n]):
        many.update(torch.from_numpy(x[lo:hi]), torch.from_numpy(x_hat[lo:hi]))
    assert many.n == one.n == n
    # Both accumulators keep the same sums up to the summation order and their reference row
    # (the first chunk's median): rel 1e-9 on top of the rounding bound.
    assert many.fvu() == pytest.approx(one.fvu(), rel=1e-9, abs=_tol(x, x_hat))
    assert many.sse() == pytest.approx(one.sse(), rel=1e-9)
    assert many.sst() == pytest.approx(one.sst(), rel=1e-9, abs=1e-12 * float(np.square(x).sum()))
    assert one.fvu() == pytest.approx(_np_fvu(x, x_hat), rel=0, abs=_tol(x, x_hat))
