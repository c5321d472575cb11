"""The error decomposition against an independent numpy computation on the same splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import sparse_code_store
from sae_darkmatter.config import DecomposeConfig, SplitConfig, TokenFilter
from sae_darkmatter.decompose import decompose, decompose_many
from sae_darkmatter.errors import ShapeMismatchError
from sae_darkmatter.saes import TopKSAE
from sae_darkmatter.splits import make_splits

D, WIDTH, K = 16, 64, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store of sparse-plus-dense synthetic activations with a large mean, and a random SAE."""
    st, dirs = sparse_code_store(
        tmp_path_factory.mktemp("d") / "store", d=D, n_ctx=400, per_append=50, mean=20.0, meta={}
    )
    sae = TopKSAE(D, WIDTH, K, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a crude but sensible dictionary: decoder rows from data directions
        sae.W_dec.copy_(torch.from_numpy(np.tile(dirs, (2, 1))[:WIDTH] / 3).float())
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.fill_(20.0)
    splits = make_splits(st, SplitConfig(filter=TokenFilter(skip_positions=1), seed=0))
    return st, sae, splits


def _numpy_reference(st, sae, splits):
    x_all = np.concatenate([x.numpy() for _, x in st.iter_chunks("resid_post.1")]).astype(
        np.float64
    )
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x_all).float())
        xhat_all = sae.decode(z).double().numpy()
    e_all = x_all - xhat_all
    tr, te = splits.probe_train, splits.probe_test
    ones = lambda a: np.hstack([a, np.ones((a.shape[0], 1))])  # noqa: E731
    w, *_ = np.linalg.lstsq(ones(x_all[tr]), e_all[tr], rcond=None)
    norm = (e_all**2).sum(1)
    wn, *_ = np.linalg.lstsq(ones(x_all[tr]), norm[tr], rcond=None)
    x, e = x_all[te], e_all[te]
    e_hat = ones(x) @ w
    sst_x = ((x - x.mean(0)) ** 2).sum()
    r2_dim = 1 - ((e - e_hat) ** 2).sum(0) / ((e - e.mean(0)) ** 2).sum(0)
    norm_pred = ones(x) @ wn
    return {
        "fvu": (e**2).sum() / sst_x,
        "fvu_nonlinear": ((e - e_hat) ** 2).sum() / sst_x,
        "linear_share": 1 - ((e - e_hat) ** 2).sum() / (e**2).sum(),
        "r2_error_mean_dim": r2_dim.mean(),
        "r2_error_norm": 1
        - ((norm[te] - norm_pred) ** 2).sum() / ((norm[te] - norm[te].mean()) ** 2).sum(),
        "l0": (z.numpy()[te] != 0).sum(1).mean(),
    }


def test_matches_numpy_reference(setup):
    st, sae, splits = setup
    out = decompose(st, sae, splits, DecomposeConfig(chunk_rows=777), progress=False)
    ref = _numpy_reference(st, sae, splits)
    m = out.metrics
    # float32 activations/SAE, float64 statistics: agreement to ~1e-5 relative is expected
    for key, value in ref.items():
        assert getattr(m, key) == pytest.approx(value, rel=2e-5, abs=1e-6), key
    assert m.fvu_linear == pytest.approx(m.fvu - m.fvu_nonlinear)
    assert m.n_probe_train == splits.probe_train.size and m.n_probe_test == splits.probe_test.size
    # the decomposition is informative on this data: a sizeable linear part exists
    assert 0.05 < m.linear_share < 1.0 and m.fvu_nonlinear < m.fvu


def test_per_token_values_add_up_to_the_metrics(setup, tmp_path):
    st, sae, splits = setup
    out = decompose(st, sae, splits, progress=False)
    t, m = out.tokens, out.metrics
    np.testing.assert_array_equal(t["rows"], splits.probe_test)
    assert all(v.shape == (splits.probe_test.size,) for v in t.values())
    # pooled ratios of the per-token sums reproduce the streamed metrics
    assert t["err_sq"].sum() / t["x_centered_sq"].sum() == pytest.approx(m.fvu, rel=1e-5)
    assert t["nonlinear_sq"].sum() / t["x_centered_sq"].sum() == pytest.approx(
        m.fvu_nonlinear, rel=1e-5
    )
    assert t["l0"].mean() == pytest.approx(m.l0)
    from safetensors.torch import load_file

    out.save(tmp_path / "p.safetensors")
    saved = load_file(tmp_path / "p.safetensors")
    assert saved["error_probe.weight"].shape == (D, D) and saved["norm_probe.bias"].shape == (1,)
    np.testing.assert_array_equal(saved["test.nonlinear_sq"].numpy(), t["nonlinear_sq"])


def test_intervals_cover_the_estimates(setup):
    st, sae, splits = setup
    m = decompose(st, sae, splits, progress=False).metrics
    assert set(m.ci) == {"fvu", "fvu_linear", "fvu_nonlinear", "linear_share", "r2_error_norm",
                         "r2_error_mean_dim"}
    for key, (lo, hi) in m.ci.items():
        assert lo < getattr(m, key) < hi, key
    lo, hi = m.ci["fvu"]
    assert hi - lo < 0.2 * m.fvu  # 1,200 test tokens: a pooled ratio is known to a few %


def test_bootstrap_interval_shrinks_like_one_over_sqrt_n():
    from sae_darkmatter.decompose import bootstrap_intervals

    rng = np.random.default_rng(0)

    def width(n):
        err = rng.exponential(size=n)
        tokens = {
            "err_sq": err,
            "nonlinear_sq": 0.5 * err * rng.uniform(size=n),
            "x_centered_sq": 4 + rng.exponential(size=n),
            "err_sq_pred": err + rng.normal(size=n),
        }
        lo, hi = bootstrap_intervals(tokens)["fvu"]
        return hi - lo

    ratio = width(1_000) / width(16_000)
    assert 2.5 < ratio < 6.5  # sqrt(16) = 4, with bootstrap noise


def test_many_saes_in_one_pass_equal_one_at_a_time(setup):
    st, sae, splits = setup
    other = TopKSAE(D, 32, 2, generator=torch.Generator().manual_seed(5))
    both = decompose_many(
        st, {"a": sae, "b": other}, splits, DecomposeConfig(chunk_rows=500), progress=False
    )
    for name, single in (("a", sae), ("b", other)):
        alone = decompose(st, single, splits, progress=False).metrics
        for key, value in alone.to_dict().items():
            if isinstance(value, float) and key != "ci":
                assert getattr(both[name].metrics, key) == pytest.approx(
                    value, rel=1e-6, abs=1e-9
                ), key


def test_width_mismatch_says_both_sizes(setup):
    st, _, splits = setup
    with pytest.raises(ShapeMismatchError, match=r"32.*16|16.*32"):
        decompose(st, TopKSAE(32, 64, 4), splits, progress=False)


def test_wide_saes_are_encoded_in_row_blocks_with_the_same_results(setup, monkeypatch):
    """Dense latents of a chunk grow with the width (8,192 rows of a 1M-wide SAE: 34 GB), so
    SAEs encode ``latent_rows`` rows at a time; the metrics do not change (float32 row blocks
    of the same products)."""
    from sae_darkmatter.saes import topk

    st, sae, splits = setup
    whole = decompose(st, sae, splits, DecomposeConfig(chunk_rows=777), progress=False).metrics
    monkeypatch.setattr(topk, "LATENT_BLOCK", WIDTH * 50)  # 50 rows per block: 16 per chunk
    assert topk.latent_rows(WIDTH) == 50
    blocked = decompose(st, sae, splits, DecomposeConfig(chunk_rows=777), progress=False).metrics
    for key, value in whole.to_dict().items():
        if isinstance(value, float):
            assert getattr(blocked, key) == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert blocked.l0 == whole.l0
