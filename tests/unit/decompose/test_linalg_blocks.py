"""Sub-problems sliced from one streamed least-squares system (``sub_lstsq``) and composed affine
maps (``compose``), against accumulators fed only those columns and numpy least squares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.linalg import LinearProbe, StreamingLstsq
from sae_darkmatter.linalg.blocks import compose, sub_lstsq

N, D_X, D_Y = 3000, 12, 4
CHUNKS = (700, 1100, 1200)


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 X with a large offset and correlated columns; Y affine in X plus noise."""
    rng = np.random.default_rng(seed)
    mix = np.eye(D_X) + 0.7 * rng.standard_normal((D_X, D_X)) / np.sqrt(D_X)
    x = 50.0 + rng.standard_normal((N, D_X)) @ mix
    y = (x - 50.0) @ rng.standard_normal((D_X, D_Y)) + 2.0 + rng.standard_normal((N, D_Y))
    return x.astype(np.float32), y.astype(np.float32)


def fed(x: np.ndarray, y: np.ndarray, **kw) -> StreamingLstsq:
    acc = StreamingLstsq(x.shape[1], y.shape[1], **kw)
    bounds = np.cumsum([0, *CHUNKS])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc.update(torch.from_numpy(x[lo:hi]), torch.from_numpy(y[lo:hi]))
    return acc


@pytest.mark.parametrize("bias", [True, False])
def test_slice_equals_an_accumulator_fed_those_columns(bias: bool):
    x, y = data()
    inputs, outputs = [5, 0, 7, 11], [D_X + 1, 2, D_X + 3, 0]  # permuted; outputs from X and Y
    z = np.hstack([x, y])
    sub = sub_lstsq(fed(x, y, bias=bias), inputs, outputs)
    direct = fed(x[:, inputs], z[:, outputs], bias=bias)
    assert (sub.d_in, sub.d_out, sub.bias, sub.n) == (4, 4, bias, N)
    for key, want in direct.state_dict().items():  # same references, same rows: same sums
        torch.testing.assert_close(sub.state_dict()[key], want, rtol=1e-12, atol=1e-9)
    got, want = sub.solve(), direct.solve()
    torch.testing.assert_close(got.weight, want.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.bias, want.bias, rtol=1e-10, atol=1e-10)
    a = x[:, inputs].astype(np.float64)
    a = np.hstack([a, np.ones((N, 1))]) if bias else a
    ref = np.linalg.lstsq(a, z[:, outputs].astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(got.weight.numpy(), ref[:4], rtol=1e-8, atol=1e-9)
    if bias:
        np.testing.assert_allclose(got.bias.numpy(), ref[4], rtol=1e-8, atol=1e-8)


def test_state_input_repeated_columns_and_an_empty_fit():
    x, y = data(1)
    state = fed(x, y).state_dict()
    twice = sub_lstsq(state, [3, 3], [D_X])  # collinear on purpose: the solver's fallback
    assert twice.gemm_dtype == torch.float64
    probe = twice.solve()
    assert probe.regularized and probe.rank == 1
    one = sub_lstsq(state, [3], [D_X]).solve()
    torch.testing.assert_close(probe.weight.sum(0), one.weight[0], rtol=1e-9, atol=1e-12)
    empty = sub_lstsq(StreamingLstsq(D_X, D_Y).state_dict(), [0, 1], [D_X])
    with pytest.raises(DarkMatterError, match="no rows"):
        empty.solve()


def test_float32_sums_keep_their_dtype_and_bad_indices_are_refused():
    x, y = data(2)
    fit = fed(x, y, gemm_dtype=torch.float32)
    assert sub_lstsq(fit, [0], [1]).gemm_dtype == torch.float32
    for inputs, outputs in (([D_X], [0]), ([0], [D_X + D_Y]), ([], [0]), ([0], []), ([-1], [0])):
        with pytest.raises(DarkMatterError, match="out of range"):
            sub_lstsq(fit, inputs, outputs)


@pytest.mark.parametrize("ridge", [0.0, 3.0])
def test_fit_of_an_affine_target_is_the_composed_fit(ridge: float):
    """Least squares is linear in the targets: fitting t' = t·W + b equals composing."""
    x, y = data(3)
    g = torch.Generator().manual_seed(0)
    then = LinearProbe(torch.randn(D_Y, 3, generator=g, dtype=torch.float64),
                       torch.randn(3, generator=g, dtype=torch.float64))
    mapped = then.predict(torch.from_numpy(y).double()).numpy()  # float64: no target rounding
    first = fed(x, y).solve(ridge)
    composed = compose(first, then)
    direct = fed(x.astype(np.float64), mapped).solve(ridge)
    torch.testing.assert_close(composed.weight, direct.weight, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(composed.bias, direct.bias, rtol=1e-9, atol=1e-9)
    xs = torch.from_numpy(x[:5]).double()
    torch.testing.assert_close(composed.predict(xs), then.predict(first.predict(xs)))
    with pytest.raises(DarkMatterError, match="outputs"):
        compose(then, then)
