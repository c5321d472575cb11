"""Hostile numbers in decompose and least squares (non-finite rows, mismatched SAEs, float16
overflow, degenerate designs) get specific errors or a warning and a safe result.

Each test feeds one kind of bad input and asserts the error class and what its message names
(keys, files, offsets, sizes, token positions), or agreement with an independent reference.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from sae_darkmatter.config import (
    DecomposeConfig,
    SplitConfig,
    TokenFilter,
)
from sae_darkmatter.decompose import check_sae, decompose, require_finite
from sae_darkmatter.errors import (
    DarkMatterError,
    IncompatibleSAEError,
    NonFiniteError,
    ShapeMismatchError,
)
from sae_darkmatter.linalg import StreamingLstsq
from sae_darkmatter.saes import TopKSAE
from sae_darkmatter.splits import make_splits
from sae_darkmatter.store import ActivationStore

# ------------------------------------------------------------------------------- decompose

D, T = 8, 6


def _store(tmp_path, x: np.ndarray) -> ActivationStore:
    st = ActivationStore.create_or_resume(
        tmp_path / "store", hooks={"h": D}, context_length=T, meta={}
    )
    st.append(context_start=0, acts={"h": x.reshape(-1, T, D).astype(np.float32)},
              tokens=np.full((x.shape[0] // T, T), 5), loss=None)
    return st


def _data(n_ctx: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 3.0 + rng.normal(size=(n_ctx * T, D))


def _sae(seed: int = 1) -> TopKSAE:
    return TopKSAE(D, 16, 3, generator=torch.Generator().manual_seed(seed))


SPLIT = SplitConfig(filter=TokenFilter(skip_positions=1, max_norm_ratio=None))
DEC = DecomposeConfig(device="cpu")


def test_decompose_refuses_nan_and_inf_in_a_store_with_positions(tmp_path):
    x = _data()
    x[2 * T + 3, 4] = math.nan  # context 2, position 3
    x[7 * T + 0, 1] = math.inf  # context 7, position 0: skipped by the filter, still counted
    x[9 * T + 5, :] = -math.inf  # context 9, position 5
    st = _store(tmp_path, x)
    splits = make_splits(st, SPLIT)
    with pytest.raises(NonFiniteError) as info:
        decompose(st, _sae(), splits, DEC, progress=False)
    err = info.value
    assert err.places == [(2, 3, "nan"), (7, 0, "inf"), (9, 5, "inf")]
    assert err.n_bad == 3 and err.n_total == x.shape[0]
    assert "stored activations of hook 'h'" in str(err) and "re-harvest" in str(err)


def test_require_finite_is_a_no_op_on_finite_rows(tmp_path):
    st = _store(tmp_path, _data(4))
    rows = np.arange(st.n_rows)
    require_finite(st.gather("h", rows), rows, st, "h")  # no error


def test_sae_width_dtype_and_mixed_dtypes(tmp_path, caplog):
    st = _store(tmp_path, _data())
    with pytest.raises(
        ShapeMismatchError,
        match=r"SAE 'wide' has d_in 12 but the store's 'h' activations have width 8",
    ):
        check_sae("wide", TopKSAE(12, 16, 3), st, "h")
    mixed = _sae()
    mixed.W_dec.data = mixed.W_dec.data.half()
    with pytest.raises(
        IncompatibleSAEError,
        match=r"SAE 'mixed' mixes parameter dtypes: \{W_dec: float16, W_enc: float32",
    ):
        check_sae("mixed", mixed, st, "h")
    ints = _sae()
    ints.b_dec = torch.nn.Parameter(torch.zeros(D, dtype=torch.int32), requires_grad=False)
    with pytest.raises(
        IncompatibleSAEError, match=r"SAE 'ints' has non-float parameters \{b_dec: int32\}"
    ):
        check_sae("ints", ints, st, "h")

    # A bfloat16 SAE runs in bfloat16 (inputs cast, logged); e = x - x̂ in float32.
    splits = make_splits(st, SPLIT)
    bf16 = _sae().to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="sae_darkmatter.decompose"):
        out = decompose(st, bf16, splits, DEC, progress=False)
    assert "SAE 'sae' has bfloat16 weights: it encodes and decodes in bfloat16" in caplog.text
    x = st.gather("h", splits.probe_test).double()
    with torch.no_grad():
        x_hat = bf16(x.to(torch.bfloat16)).double()
    want = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert out.metrics.fvu == pytest.approx(want, rel=1e-5)


def test_float16_sae_overflow_is_reported(tmp_path):
    st = _store(tmp_path, _data())
    big = _sae().half()
    with torch.no_grad():
        big.W_dec.mul_(3e4)
    with pytest.raises(
        NonFiniteError,
        match=r"SAE 'sae' reconstructions of hook 'h'.*float16 arithmetic overflowed",
    ):
        decompose(st, big, make_splits(st, SPLIT), DEC, progress=False)


def test_decompose_with_a_duplicated_dimension_records_regularization(tmp_path, caplog):
    x = _data()
    x[:, 5] = x[:, 2]
    st = _store(tmp_path, x)
    splits = make_splits(st, SPLIT)
    with caplog.at_level(logging.WARNING):
        out = decompose(st, _sae(), splits, DEC, progress=False)
    m = out.metrics
    assert (
        m.probe_regularized
        and m.probe_rank == D - 1
        and (m.probe_cond is None or m.probe_cond > 1e10)
    )
    assert "linearly dependent x dimensions [2, 5]" in caplog.text
    # Held-out predictions agree with numpy's minimum-norm lstsq (test rows share the duplicate).
    sae = _sae()
    xa = np.asarray(st.gather("h", np.arange(st.n_rows)), np.float64)
    with torch.no_grad():
        e = xa - sae(torch.from_numpy(xa).float()).double().numpy()
    def ones(a):
        return np.hstack([a, np.ones((len(a), 1))])
    w, *_ = np.linalg.lstsq(ones(xa[splits.probe_train]), e[splits.probe_train], rcond=None)
    te = splits.probe_test
    got = out.error_probe.predict(torch.from_numpy(xa[te])).numpy()
    assert np.linalg.norm(got - ones(xa[te]) @ w) / np.linalg.norm(ones(xa[te]) @ w) < 1e-6
    # (float32 e in the decomposition vs float64 here: ~1e-7 relative)


# ------------------------------------------------------------------------- least squares

RCOND = 1e-10  # StreamingLstsq.solve's default: eigenvalue cutoff of the scaled XᵀX


def _streaming(x: np.ndarray, y: np.ndarray, bias: bool = True) -> StreamingLstsq:
    acc = StreamingLstsq(x.shape[1], y.shape[1], bias=bias)
    for lo in range(0, len(x), 97):  # several chunks
        acc.update(torch.from_numpy(x[lo : lo + 97]), torch.from_numpy(y[lo : lo + 97]))
    return acc


def _min_norm_standardized(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Reference: numpy's minimum-norm lstsq on centred, unit-spread x (constant columns zeroed),
    cutting singular values below sqrt(RCOND)·σ_max (= eigenvalues below RCOND·λ_max of XᵀX)."""
    x, y, rows = (np.asarray(a, np.float64) for a in (x, y, rows))
    mx, my = x.mean(0), y.mean(0)
    spread = np.sqrt(((x - mx) ** 2).sum(0))
    scale = np.where(spread > 0, 1 / np.where(spread > 0, spread, 1), 0.0)
    w, *_ = np.linalg.lstsq((x - mx) * scale, y - my, rcond=math.sqrt(RCOND))
    return ((rows - mx) * scale) @ w + my


def _degenerate_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(x, held-out rows) for each degenerate design; x has a large offset like activations."""
    rng = np.random.default_rng(7)
    n, d = 600, 8
    def base(m):
        return 40 + rng.normal(size=(m, d))
    out = {}
    x, t = base(n), base(50)
    x[:, 5], t[:, 5] = x[:, 2], t[:, 2]
    out["duplicate"] = (x, t)
    x, t = base(n), base(50)
    x[:, 1], t[:, 1] = 0.0, 0.0
    out["dead"] = (x, t)
    x, t = base(n), base(50)
    x[:, 6], t[:, 6] = 7.5, 7.5
    out["constant"] = (x, t)
    mix = rng.normal(size=(3, d))
    out["rank3"] = (40 + rng.normal(size=(n, 3)) @ mix, 40 + rng.normal(size=(50, 3)) @ mix)
    x, t = base(n), base(50)
    noise = 1e-7 * rng.normal(size=n)  # collinear to 1e-7 of the spread: below the cutoff
    x[:, 4], t[:, 4] = x[:, 3] * 2 - 1 + noise, t[:, 3] * 2 - 1
    out["near_collinear"] = (x, t)
    out["fewer_rows"] = (base(5), base(50))
    return out


@pytest.mark.parametrize("case", list(_degenerate_cases()))
def test_degenerate_least_squares_warns_and_matches_min_norm_reference(case, caplog):
    x, held = _degenerate_cases()[case]
    rng = np.random.default_rng(1)
    y = x @ rng.normal(size=(x.shape[1], 3)) + rng.normal(size=(len(x), 3))
    with caplog.at_level(logging.WARNING, logger="sae_darkmatter.linalg"):
        probe = _streaming(x, y).solve()
    assert probe.regularized and probe.rank < x.shape[1] and probe.cond > 1e10
    assert "least squares is rank deficient: rank" in caplog.text and "cond(XᵀX) = " in caplog.text
    for rows in (x, held):
        want = _min_norm_standardized(x, y, rows)
        got = probe.predict(torch.from_numpy(rows)).numpy()
        # Both are float64 solves of the same truncated system, whose kept part is well
        # conditioned (cond <= ~1e3 here): agreement to ~eps·cond, 1e-9 leaves a wide margin.
        assert np.linalg.norm(got - want) / np.linalg.norm(want - want.mean(0)) < 1e-9, case
    # On the training rows the fit is the (unique) least-squares fit: numpy on raw [x, 1].
    ones = np.hstack([x, np.ones((len(x), 1))])
    w, *_ = np.linalg.lstsq(ones, y, rcond=None)
    got = probe.predict(torch.from_numpy(x)).numpy()
    if case != "near_collinear":  # there numpy keeps the 1e-7 direction we drop
        assert np.linalg.norm(got - ones @ w) / np.linalg.norm(ones @ w - (ones @ w).mean(0)) < 1e-9


def test_degeneracy_message_names_dimensions(caplog):
    cases = _degenerate_cases()
    rng = np.random.default_rng(2)
    for case, fragment in (("duplicate", "rank 7 of 8; cond(XᵀX) = "),
                           ("duplicate", "linearly dependent x dimensions [2, 5]"),
                           ("constant", "constant x dimensions [6]"),
                           ("near_collinear", "linearly dependent x dimensions [3, 4]")):
        x = cases[case][0]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sae_darkmatter.linalg"):
            _streaming(x, rng.normal(size=(len(x), 2))).solve()
        assert fragment in caplog.text, (case, caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sae_darkmatter.linalg"):
        _streaming(cases["dead"][0], rng.normal(size=(600, 2)), bias=False).solve()
    assert "all-zero x dimensions [1]" in caplog.text


def test_well_conditioned_fit_is_not_regularized_and_reports_cond(caplog):
    rng = np.random.default_rng(3)
    x = 40 + rng.normal(size=(2000, 8)) @ np.diag([1, 2, 3, 4, 5, 6, 7, 30.0])
    y = x @ rng.normal(size=(8, 2))
    with caplog.at_level(logging.WARNING, logger="sae_darkmatter.linalg"):
        probe = _streaming(x, y).solve()
    assert not probe.regularized and probe.rank == 8 and caplog.text == ""
    xc = (x - x.mean(0)) / np.sqrt(((x - x.mean(0)) ** 2).sum(0))
    assert probe.cond == pytest.approx(np.linalg.cond(xc.T @ xc), rel=0.05)


def test_nonfinite_lstsq_inputs_name_the_input_and_rows():
    acc = StreamingLstsq(3, 2)
    y = torch.zeros(10, 2)
    y[4, 1] = math.inf
    y[7, 0] = math.nan
    with pytest.raises(
        DarkMatterError, match=r"y holds NaN or inf in 2 of 10 rows \(rows 4, 7 of this chunk\)"
    ):
        acc.update(torch.randn(10, 3), y)
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0, got inf"):
        _streaming(np.ones((5, 2)), np.ones((5, 1))).solve(math.inf)
