"""Transcoders' error decomposition against an independent numpy computation on the same
splits: a store of ``x`` at ``mlp_in.1`` and ``y`` = a known linear plus nonlinear function of
``x`` at ``mlp_out.1``, transcoders of known weights, and the skip term's accounting on a case
whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_darkmatter.config import DecomposeConfig, SplitConfig, TokenFilter
from sae_darkmatter.decompose import decompose_transcoders
from sae_darkmatter.errors import HookError, NonFiniteError, ShapeMismatchError
from sae_darkmatter.saes import ReLUSAE
from sae_darkmatter.saes.transcoder import Transcoder
from sae_darkmatter.splits import make_splits
from sae_darkmatter.store import ActivationStore

D_IN, D_OUT, WIDTH, T = 12, 8, 40, 16  # d_out != d_in: a transposed map cannot fit
HOOKS = {"hook_in": "mlp_in.1", "hook_out": "mlp_out.1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """x: skewed, correlated inputs; y = x·A + b + a nonlinear function of x + small noise."""
    rng = np.random.default_rng(0)
    mix, a = rng.normal(size=(D_IN, D_IN)), rng.normal(size=(D_IN, D_OUT))
    b, c = rng.normal(size=D_OUT) * 3, rng.normal(size=(D_IN, D_OUT))
    st = ActivationStore.create_or_resume(tmp_path_factory.mktemp("tc") / "store",
                                          hooks={"mlp_in.1": D_IN, "mlp_out.1": D_OUT},
                                          context_length=T, meta={})
    for start in range(0, 300, 50):
        x = rng.exponential(size=(50 * T, D_IN)) @ mix
        y = x @ a + b + np.abs(x) @ c + 0.1 * rng.normal(size=(50 * T, D_OUT))
        st.append(context_start=start, acts={
            "mlp_in.1": x.reshape(50, T, D_IN).astype(np.float32),
            "mlp_out.1": y.reshape(50, T, D_OUT).astype(np.float32)},
            tokens=rng.integers(5, 100, size=(50, T)), loss=None)
    splits = make_splits(st, SplitConfig(filter=TokenFilter(skip_positions=1), seed=0),
                         hook="mlp_in.1")
    return st, splits


def _transcoder(seed: int, skip: bool, d_out: int = D_OUT) -> Transcoder:
    gen = torch.Generator().manual_seed(seed)
    sparse = ReLUSAE(D_IN, WIDTH, d_out=d_out, apply_b_dec_to_input=False, generator=gen)
    with torch.no_grad():
        sparse.b_enc.copy_(torch.randn(WIDTH, generator=gen))
        sparse.b_dec.copy_(torch.randn(d_out, generator=gen))
        sparse.W_dec.mul_(0.1)
    return Transcoder(sparse, torch.randn(d_out, D_IN, generator=gen) * 0.1 if skip else None)


def _rows(st, hook):
    return np.concatenate([v.numpy() for _, v in st.iter_chunks(hook)]).astype(np.float64)


def _ones(a):
    return np.hstack([a, np.ones((a.shape[0], 1))])


def _numpy_metrics(x, y, y_hat, splits):
    """The decomposition of ``e = y − y_hat`` by numpy lstsq with a bias column."""
    e_all = y - y_hat
    tr, te = splits.probe_train, splits.probe_test
    w, *_ = np.linalg.lstsq(_ones(x[tr]), e_all[tr], rcond=None)
    norm = (e_all**2).sum(1)
    wn, *_ = np.linalg.lstsq(_ones(x[tr]), norm[tr], rcond=None)
    e, e_hat, yt = e_all[te], _ones(x[te]) @ w, y[te]
    sst = ((yt - yt.mean(0)) ** 2).sum()  # y's variance: the target's, not x's
    norm_pred = _ones(x[te]) @ wn
    fvu, fvu_nl = (e**2).sum() / sst, ((e - e_hat) ** 2).sum() / sst
    return {
        "fvu": fvu, "fvu_nonlinear": fvu_nl, "fvu_linear": fvu - fvu_nl,
        "linear_share": 1 - ((e - e_hat) ** 2).sum() / (e**2).sum(),
        "r2_error_mean_dim": (1 - ((e - e_hat) ** 2).sum(0) / ((e - e.mean(0)) ** 2).sum(0)).mean(),
        "r2_error_norm": 1 - ((norm[te] - norm_pred) ** 2).sum()
        / ((norm[te] - norm[te].mean()) ** 2).sum(),
    }


def _numpy_parts(tc: Transcoder, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sparse part, skip term, L0) of a ReLU transcoder from its weights, in float64."""
    p = {k: v.detach().double().numpy() for k, v in tc.state_dict().items()}
    z = np.maximum(x @ p["sparse.W_enc"] + p["sparse.b_enc"], 0)
    skip = x @ p["W_skip"].T if "W_skip" in p else 0.0
    return z @ p["sparse.W_dec"] + p["sparse.b_dec"], skip, (z > 0).sum(1)


def _close(m, ref, rel=1e-4, abs_=1e-6):
    for key, value in ref.items():
        assert getattr(m, key) == pytest.approx(value, rel=rel, abs=abs_), key


@pytest.mark.parametrize("skip", [False, True])
def test_matches_numpy_reference(setup, skip):
    st, splits = setup
    tc = _transcoder(1, skip)
    out = decompose_transcoders(st, {"tc": tc}, splits, DecomposeConfig(chunk_rows=700),
                                progress=False, **HOOKS)["tc"]
    x, y = _rows(st, "mlp_in.1"), _rows(st, "mlp_out.1")
    sparse, skip_term, l0 = _numpy_parts(tc, x)
    m = out.metrics
    _close(m, _numpy_metrics(x, y, sparse + skip_term, splits))
    assert m.l0 == pytest.approx(l0[splits.probe_test].mean())
    assert (m.hook, m.hook_out, m.d_in, m.d_out, m.d_sae) == ("mlp_in.1", "mlp_out.1", D_IN,
                                                              D_OUT, WIDTH)
    assert (m.n_probe_train, m.n_probe_test) == (splits.probe_train.size, splits.probe_test.size)
    assert 0.05 < m.linear_share < 0.99  # both parts are present on this data
    assert out.error_probe.weight.shape == (D_IN, D_OUT)
    assert set(m.ci) == {"fvu", "fvu_linear", "fvu_nonlinear", "linear_share", "r2_error_norm",
                         "r2_error_mean_dim"}
    t = out.tokens  # per-token values add up to the metrics, relative to y's variance
    assert t["err_sq"].sum() / t["x_centered_sq"].sum() == pytest.approx(m.fvu, rel=1e-5)
    if not skip:
        assert m.skip is None and "skip" not in m.to_dict()
        return
    without = m.skip.without_skip  # the same transcoder with its skip term left out of y_hat
    _close(without, _numpy_metrics(x, y, sparse, splits))
    assert m.skip.fvu_absorbed == pytest.approx(without.fvu_linear - m.fvu_linear)
    assert m.skip.absorbed_share == pytest.approx(m.skip.fvu_absorbed / without.fvu_linear)
    # the skip term is linear in x: only the linear part changes
    assert without.fvu_nonlinear == pytest.approx(m.fvu_nonlinear, rel=1e-4)
    lo, hi = m.skip.ci["fvu_absorbed"]
    assert lo < m.skip.fvu_absorbed < hi
    saved = m.to_dict()["skip"]
    assert saved["without_skip"]["fvu"] == without.fvu and "skip" not in saved["without_skip"]


def test_a_skip_that_is_the_best_linear_map_leaves_no_linear_dark_matter(setup):
    """Sparse part zero, ``b_dec`` and ``W_skip`` the least-squares fit of ``y`` on the
    probe-train tokens: ``e`` is that fit's residual, so its linear part vanishes; without the
    skip term the error is ``y − b``, whose linear part the skip term absorbs entirely. The
    nonlinear part is the fit's held-out residual both ways."""
    st, splits = setup
    x, y = _rows(st, "mlp_in.1"), _rows(st, "mlp_out.1")
    tr, te = splits.probe_train, splits.probe_test
    w, *_ = np.linalg.lstsq(_ones(x[tr]), y[tr], rcond=None)
    tc = _transcoder(2, skip=True)
    with torch.no_grad():
        tc.sparse.W_dec.zero_()
        tc.sparse.b_dec.copy_(torch.from_numpy(w[-1]))
        assert tc.W_skip is not None
        tc.W_skip.copy_(torch.from_numpy(w[:-1].T))
    m = decompose_transcoders(st, {"tc": tc}, splits, progress=False, **HOOKS)["tc"].metrics
    resid = y[te] - _ones(x[te]) @ w
    sst = ((y[te] - y[te].mean(0)) ** 2).sum()
    assert m.fvu_linear == pytest.approx(0, abs=2e-5)
    assert m.fvu == m.fvu_nonlinear + m.fvu_linear
    assert m.fvu_nonlinear == pytest.approx((resid**2).sum() / sst, rel=1e-4)
    without = m.skip.without_skip
    assert without.fvu_nonlinear == pytest.approx(m.fvu_nonlinear, rel=1e-4)
    assert m.skip.absorbed_share == pytest.approx(1, abs=1e-4)
    assert m.skip.fvu_absorbed == pytest.approx(without.fvu - m.fvu, rel=1e-4)
    assert m.skip.fvu_absorbed > 0.5  # the linear map is most of y here


def test_a_skip_transcoder_of_one_hook_predicts_its_input(setup):
    """Input hook = output hook (sparsify's skip SAEs): ``y`` is ``x``, read once."""
    st, splits = setup
    tc = _transcoder(6, skip=True, d_out=D_IN)
    m = decompose_transcoders(st, {"tc": tc}, splits, progress=False, hook_in="mlp_in.1",
                              hook_out="mlp_in.1")["tc"].metrics
    x = _rows(st, "mlp_in.1")
    sparse, skip_term, _ = _numpy_parts(tc, x)
    _close(m, _numpy_metrics(x, x, sparse + skip_term, splits))
    assert m.skip is not None
    _close(m.skip.without_skip, _numpy_metrics(x, x, sparse, splits))
    assert (m.hook, m.hook_out, m.d_out) == ("mlp_in.1", "mlp_in.1", D_IN)


def test_many_transcoders_in_one_pass_equal_one_at_a_time(setup):
    st, splits = setup
    tcs = {"a": _transcoder(3, skip=True), "b": _transcoder(4, skip=False)}
    both = decompose_transcoders(st, tcs, splits, progress=False, **HOOKS)
    for name, tc in tcs.items():
        alone = decompose_transcoders(st, {name: tc}, splits, progress=False, **HOOKS)[name]
        for key, value in alone.metrics.to_dict().items():
            if isinstance(value, float):
                assert getattr(both[name].metrics, key) == pytest.approx(
                    value, rel=1e-6, abs=1e-9), key


def test_missing_hooks_wrong_widths_and_non_finite_outputs_are_refused(setup):
    st, splits = setup
    tc = _transcoder(5, skip=False)
    with pytest.raises(HookError, match=r"lacks 'mlp_in\.2'.*darkmatter harvest --hook mlp_in\.2 "
                                        r"--hook mlp_out\.1"):
        decompose_transcoders(st, {"tc": tc}, splits, hook_in="mlp_in.2", hook_out="mlp_out.1")
    with pytest.raises(ShapeMismatchError, match="d_out 8 but the store's 'mlp_in.1'"):
        decompose_transcoders(st, {"tc": tc}, splits, hook_in="mlp_in.1", hook_out="mlp_in.1")
    broken = _transcoder(6, skip=True)
    with torch.no_grad():
        assert broken.W_skip is not None
        broken.W_skip[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"transcoder 'tc' outputs at 'mlp_out\.1'.*context"):
        decompose_transcoders(st, {"tc": broken}, splits, progress=False, **HOOKS)
