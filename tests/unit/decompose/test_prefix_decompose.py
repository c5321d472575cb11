"""Nested prefixes of one SAE against an independent numpy computation on the same splits: the
prefix's latents recomputed from the weights (top-k by ``argpartition``, truncated to the
prefix), its error probed by ``np.linalg.lstsq``; the full width against ``decompose``; a
ReLU SAE's prefix against the smaller SAE of its first latents; refusals before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import sparse_code_store
from sae_darkmatter.config import DecomposeConfig, SplitConfig, TokenFilter
from sae_darkmatter.decompose import (
    decompose,
    decompose_prefixes,
    default_prefix_widths,
    firing_order,
    plan_prefixes,
)
from sae_darkmatter.errors import ConfigError, NonFiniteError
from sae_darkmatter.saes import ReLUSAE, TopKSAE
from sae_darkmatter.splits import make_splits
from sae_darkmatter.store import ActivationStore

D, WIDTH, K = 16, 64, 6
CFG = DecomposeConfig(chunk_rows=700)  # several chunks per split


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Sparse-code activations with a large mean; a TopK and a ReLU SAE whose encoders read
    noisy data directions (so latents fire unevenly) and whose decoders are fit to the data
    by least squares (so they reconstruct it sensibly)."""
    st, dirs = sparse_code_store(tmp_path_factory.mktemp("p") / "store", d=D, n_ctx=240,
                                 per_append=60, mean=20.0, meta={})
    x = torch.cat([x for _, x in st.iter_chunks("resid_post.1")])
    rows = np.tile(dirs, (2, 1))[:WIDTH] + 0.3 * np.random.default_rng(1).normal(size=(WIDTH, D))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    gen = torch.Generator().manual_seed(3)
    saes = {"topk": TopKSAE(D, WIDTH, K, generator=gen), "relu": ReLUSAE(D, WIDTH, generator=gen)}
    for kind, sae in saes.items():
        with torch.no_grad():
            sae.W_enc.copy_(torch.from_numpy(rows.T).float())
            sae.b_enc.copy_(torch.randn(WIDTH, generator=gen) * 0.5 - (kind == "relu") * 2.0)
            sae.b_dec.copy_(x.mean(0))
            fit = torch.linalg.lstsq(sae.encode(x).double(), (x - x.mean(0)).double())
            sae.W_dec.copy_(fit.solution.float())
    splits = make_splits(st, SplitConfig(filter=TokenFilter(skip_positions=1), seed=0))
    return st, saes, splits


def _x(st: ActivationStore) -> np.ndarray:
    return np.concatenate([x.numpy() for _, x in st.iter_chunks("resid_post.1")]).astype(
        np.float64)


def _numpy_latents(sae, x: np.ndarray) -> np.ndarray:
    """Dense latents from the weights in float64: ReLU, or top-k (argpartition) then ReLU."""
    p = {k: v.detach().double().numpy() for k, v in sae.state_dict().items()}
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if not isinstance(sae, TopKSAE):
        return np.maximum(pre, 0)
    top = np.argpartition(-pre, K - 1, axis=1)[:, :K]
    z = np.zeros_like(pre)
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    return z


def _numpy_metrics(x, e_all, l0, splits):
    """The decomposition of ``e`` by numpy lstsq with a bias column (probe-train -> test)."""
    ones = lambda a: np.hstack([a, np.ones((a.shape[0], 1))])  # noqa: E731
    tr, te = splits.probe_train, splits.probe_test
    w, *_ = np.linalg.lstsq(ones(x[tr]), e_all[tr], rcond=None)
    norm = (e_all**2).sum(1)
    wn, *_ = np.linalg.lstsq(ones(x[tr]), norm[tr], rcond=None)
    e, e_hat, xt = e_all[te], ones(x[te]) @ w, x[te]
    sst = ((xt - xt.mean(0)) ** 2).sum()
    return {
        "fvu": (e**2).sum() / sst,
        "fvu_nonlinear": ((e - e_hat) ** 2).sum() / sst,
        "linear_share": 1 - ((e - e_hat) ** 2).sum() / (e**2).sum(),
        "r2_error_mean_dim": (1 - ((e - e_hat) ** 2).sum(0)
                              / ((e - e.mean(0)) ** 2).sum(0)).mean(),
        "r2_error_norm": 1 - ((norm[te] - ones(xt) @ wn) ** 2).sum()
        / ((norm[te] - norm[te].mean()) ** 2).sum(),
        "l0": l0[te].mean(),
    }


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_prefixes_match_numpy_reference(setup, kind):
    st, saes, splits = setup
    sae = saes[kind]
    widths = (4, 16, 40, WIDTH)
    out = decompose_prefixes(st, sae, splits, CFG, widths=widths, order="frequency",
                             progress=False)
    assert list(out) == list(widths)
    x = _x(st)
    z = _numpy_latents(sae, x)
    # "frequency": firing counts on the probe-train rows, most frequent first, ties by index
    counts = (z[splits.probe_train] != 0).sum(0)
    order = np.array(sorted(range(WIDTH), key=lambda i: (-counts[i], i)))
    np.testing.assert_array_equal(firing_order(st, sae, splits.probe_train, progress=False),
                                  order)
    assert len(set(counts.tolist())) > 3  # the order is not the stored one by accident
    p = {k: v.detach().double().numpy() for k, v in sae.state_dict().items()}
    fvus = []
    for m in widths:
        zm = np.where(np.isin(np.arange(WIDTH), order[:m]), z, 0.0)
        ref = _numpy_metrics(x, x - (zm @ p["W_dec"] + p["b_dec"]), (zm != 0).sum(1), splits)
        got = out[m].metrics
        assert got.d_sae == m
        for key, value in ref.items():
            assert getattr(got, key) == pytest.approx(value, rel=1e-4, abs=1e-6), (m, key)
        fvus.append(got.fvu)
    assert fvus == sorted(fvus, reverse=True) and fvus[0] > fvus[-1] + 0.5  # fewer latents
    # leave more error on this data


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_full_width_prefix_equals_plain_decomposition(setup, kind):
    """The full width decodes the same latents: identical errors and L0 per token, identical
    FVU; the probe metrics agree to the rounding of the joint solve (five probes' targets in
    one XᵀY product instead of one)."""
    st, saes, splits = setup
    sae = saes[kind]
    full = decompose_prefixes(st, sae, splits, CFG, progress=False)[WIDTH]
    plain = decompose(st, sae, splits, CFG, progress=False)
    for key in ("rows", "err_sq", "l0", "x_centered_sq"):
        np.testing.assert_array_equal(full.tokens[key], plain.tokens[key])
    a, b = full.metrics, plain.metrics
    assert (a.fvu, a.l0, a.d_sae, a.n_probe_train, a.n_probe_test) == (
        b.fvu, b.l0, b.d_sae, b.n_probe_train, b.n_probe_test)
    for key in ("fvu_nonlinear", "linear_share", "r2_error_mean_dim", "r2_error_pooled",
                "r2_error_norm"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-6, abs=1e-9), key


def test_relu_prefix_is_the_smaller_sae(setup):
    """A ReLU SAE's prefix in its stored order is the SAE of its first m latents alone."""
    st, saes, splits = setup
    sae, m = saes["relu"], 24
    small = ReLUSAE(D, m)
    small.load_state_dict({"W_enc": sae.W_enc[:, :m], "b_enc": sae.b_enc[:m],
                           "W_dec": sae.W_dec[:m], "b_dec": sae.b_dec})
    prefix = decompose_prefixes(st, sae, splits, CFG, widths=[m], progress=False)[m]
    alone = decompose(st, small, splits, CFG, progress=False)
    np.testing.assert_array_equal(prefix.tokens["l0"], alone.tokens["l0"])
    np.testing.assert_allclose(prefix.tokens["err_sq"], alone.tokens["err_sq"], rtol=1e-5)
    for key in ("fvu", "fvu_nonlinear", "r2_error_mean_dim", "r2_error_norm"):
        assert getattr(prefix.metrics, key) == pytest.approx(getattr(alone.metrics, key),
                                                             rel=1e-5), key


def test_a_given_permutation_orders_the_prefixes(setup):
    """A reversed order's prefix of m latents is the stored order's complement of W − m."""
    st, saes, splits = setup
    sae = saes["relu"]
    reverse = np.arange(WIDTH)[::-1]
    rev = decompose_prefixes(st, sae, splits, CFG, widths=[WIDTH - 24], order=reverse,
                             progress=False)[WIDTH - 24]
    x = _x(st)
    z = _numpy_latents(sae, x)
    p = {k: v.detach().double().numpy() for k, v in sae.state_dict().items()}
    z[:, :24] = 0
    ref = _numpy_metrics(x, x - (z @ p["W_dec"] + p["b_dec"]), (z != 0).sum(1), splits)
    assert rev.metrics.fvu == pytest.approx(ref["fvu"], rel=1e-4)
    assert rev.metrics.l0 == pytest.approx(ref["l0"])


def test_default_prefix_widths():
    assert default_prefix_widths(64) == (4, 8, 16, 32, 64)
    assert default_prefix_widths(20) == (1, 2, 5, 10, 20)
    assert default_prefix_widths(4) == (1, 2, 4)  # W/16 and W/8 are below one latent
    assert default_prefix_widths(1) == (1,)
    assert default_prefix_widths(64, [16, 48]) == (16, 48, 64)  # a Matryoshka SAE's groups
    assert default_prefix_widths(64, [16, 64]) == (16, 64)


def test_plan_prefixes_takes_matryoshka_widths_and_warns(setup, caplog):
    topk, relu = setup[1]["topk"], setup[1]["relu"]
    assert plan_prefixes("mat", relu, [16, 32], None, "stored") == (16, 32, WIDTH)
    assert plan_prefixes("mat", relu, [16, 32], [8], "stored") == (8,)  # given widths win
    assert caplog.text == ""  # a Matryoshka SAE's stored order is its nesting
    assert plan_prefixes("relu", relu, None, None, "frequency") == (4, 8, 16, 32, WIDTH)
    assert caplog.text == ""
    plan_prefixes("relu", relu, None, None, "stored")
    assert "SAE 'relu' records no nested (Matryoshka) widths" in caplog.text
    plan_prefixes("topk", topk, None, None, "frequency")
    assert "SAE 'topk' is a TopK SAE: each prefix keeps those of its k selected" in caplog.text
    with pytest.raises(ConfigError, match=r"SAE 'mat' records Matryoshka widths \[16, 80\] that "
                                          r"do not fit it \(prefix widths \[80\] are outside"):
        plan_prefixes("mat", relu, [16, 80], None, "stored")


@pytest.fixture(scope="module")
def nan_store(tmp_path_factory):
    """A store whose activations hold NaN: any read of them raises NonFiniteError."""
    st = ActivationStore.create_or_resume(tmp_path_factory.mktemp("nan") / "store",
                                          hooks={"resid_post.1": D}, context_length=16, meta={})
    x = np.random.default_rng(0).normal(size=(40, 16, D)).astype(np.float32)
    x[:, 5] = np.nan
    st.append(context_start=0, acts={"resid_post.1": x}, tokens=np.full((40, 16), 7), loss=None)
    return st, make_splits(st, SplitConfig(filter=TokenFilter(max_norm_ratio=None), seed=0))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"widths": [8, WIDTH + 1]}, r"prefix widths \[65\] are outside 1\.\.64"),
    ({"widths": [0, 8]}, r"prefix widths \[0\] are outside 1\.\.64"),
    ({"widths": [-3]}, r"outside 1\.\.64"),
    ({"widths": []}, "none given"),
    ({"widths": [8, 16, 8]}, r"prefix widths \[8\] are given more than once"),
    ({"widths": [8, 2.5]}, r"whole numbers of latents, got \[2\.5\]"),
    ({"widths": [True]}, "whole numbers"),
    ({"order": "alphabetical"}, "latent order 'alphabetical' is not one of stored, frequency"),
    ({"order": np.arange(WIDTH - 1)}, "must list all 64 latents once"),
    ({"order": np.r_[0, np.arange(WIDTH - 1)]}, r"latents \[63\] are missing"),
    ({"order": np.r_[np.arange(WIDTH - 1), WIDTH]}, r"latents \[63\] are missing"),
    ({"order": np.arange(WIDTH, dtype=float)}, "must hold latent indices"),
])
def test_bad_input_is_refused_before_any_work(nan_store, setup, kwargs, message):
    """With "frequency" the first read would raise NonFiniteError on this store: the
    refusal comes first."""
    st, splits = nan_store
    sae = setup[1]["topk"]
    with pytest.raises(ConfigError, match=message):
        decompose_prefixes(st, sae, splits, CFG, **({"order": "frequency"} | kwargs),
                           progress=False)


def test_the_nan_store_fails_once_work_starts(nan_store, setup):
    """The control of the test above: valid input on that store gets as far as reading it."""
    st, splits = nan_store
    with pytest.raises(NonFiniteError):
        decompose_prefixes(st, setup[1]["topk"], splits, CFG, order="frequency", progress=False)
