"""Pursuit re-encoding: scikit-learn's OMP, planted codes, monotone residuals, the dense reference,
degenerate steps, and the decomposition of a pursuit SAE on a store and a run folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import direction_sae, sparse_code_store
from sae_darkmatter.config import DecomposeConfig, SplitConfig, TokenFilter
from sae_darkmatter.decompose import decompose_many
from sae_darkmatter.saes import SAE, TopKSAE
from sae_darkmatter.saes.pursuit import (
    PursuitSAE,
    gradient_pursuit,
    gradient_pursuit_dense,
    matching_pursuit,
    orthogonal_matching_pursuit,
    pursue,
)
from sae_darkmatter.splits import make_splits

F64 = torch.float64


def dictionary(n_atoms: int, d: int, seed: int, *, unit: bool = True) -> torch.Tensor:
    w = torch.randn(n_atoms, d, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=1, keepdim=True) if unit else w


def planted(w: torch.Tensor, n: int, k: int, seed: int) -> torch.Tensor:
    """Codes with k active latents per token, values in [1, 2)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(n, w.shape[0], dtype=F64)
    for i in range(n):
        z[i, torch.randperm(w.shape[0], generator=g)[:k]] = 1 + torch.rand(
            k, dtype=F64, generator=g
        )
    return z


def residual(x, code, w, b=None):
    return (x - code.decode(w, b)).norm(dim=1)


# ---------------------------------------------------------------------------- against sklearn


@pytest.mark.parametrize("seed", [0, 1])
def test_omp_matches_sklearn(seed):
    from sklearn.linear_model import (
        OrthogonalMatchingPursuit,  # a dev dependency: never skipped
    )

    w = dictionary(96, 24, seed)
    y = torch.randn(40, 24, dtype=F64, generator=torch.Generator().manual_seed(seed + 10))
    for k in (1, 5, 12):
        ours = orthogonal_matching_pursuit(y, w, None, k, batch_size=16).to_dense(96).numpy()
        ref = OrthogonalMatchingPursuit(n_nonzero_coefs=k, fit_intercept=False).fit(
            w.T.numpy(), y.T.numpy()
        )
        np.testing.assert_allclose(ours, ref.coef_, atol=1e-10)
        assert ((ours != 0).sum(1) == k).all()


def test_omp_per_token_l0_matches_sklearn_per_token():
    from sklearn.linear_model import orthogonal_mp

    w = dictionary(64, 20, 3)
    y = torch.randn(12, 20, dtype=F64, generator=torch.Generator().manual_seed(4))
    l0 = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 3, 1, 9])
    ours = orthogonal_matching_pursuit(y, w, None, l0).to_dense(64).numpy()
    for i, k in enumerate(l0.tolist()):
        ref = (
            np.zeros(64) if k == 0 else orthogonal_mp(w.T.numpy(), y[i].numpy(), n_nonzero_coefs=k)
        )
        np.testing.assert_allclose(ours[i], ref, atol=1e-10)


# ---------------------------------------------------------------------------- planted codes


@pytest.mark.parametrize("method", ["gp", "mp", "omp"])
def test_recovers_planted_support(method):
    w = dictionary(512, 128, 0)
    z = planted(w, 48, 4, 1)
    b = torch.linspace(-1, 1, 128, dtype=F64)
    x = z @ w + b
    code = pursue(x, w, b, 4, method=method, nonnegative=method != "omp")
    got = code.to_dense(512)
    assert torch.equal(got != 0, z != 0)  # the right 4 atoms for every token
    rel = residual(x, code, w, b) / (x - b).norm(dim=1)
    if method == "omp":
        torch.testing.assert_close(got, z, atol=1e-12, rtol=0)  # exact once the support is right
    else:
        assert rel.max() < 0.6 and rel.mean() < 0.2
    if method == "gp":  # more gradient steps than atoms keep converging to the planted code
        assert (residual(x, gradient_pursuit(x, w, b, 12), w, b) / (x - b).norm(dim=1)).max() < 0.01


# ---------------------------------------------------------------------------- invariants


@pytest.mark.parametrize(
    "method,nonneg", [("gp", True), ("gp", False), ("mp", True), ("mp", False), ("omp", False)]
)
def test_residual_never_increases(method, nonneg):
    """The state after t steps is the l0=t code; its residual is non-increasing in t."""
    w = dictionary(200, 30, 5, unit=False)  # uneven row norms too
    x = torch.randn(64, 30, dtype=F64, generator=torch.Generator().manual_seed(6)) * 3
    b = torch.randn(30, dtype=F64, generator=torch.Generator().manual_seed(7))
    norms = torch.stack([residual(x, pursue(x, w, b, t, method=method, nonnegative=nonneg), w, b)
                         for t in range(25)])
    assert (norms[1:] <= norms[:-1] * (1 + 1e-12) + 1e-12).all()
    assert (norms[-1] < norms[0]).all()
    codes = pursue(x, w, b, 24, method=method, nonnegative=nonneg)
    if nonneg:
        assert (codes.values >= 0).all()
    assert (codes.l0 <= 24).all()


@pytest.mark.parametrize("nonneg", [True, False])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 2e-4)])
def test_support_version_equals_dense_reference(nonneg, dtype, tol):
    w = dictionary(300, 40, 8).to(dtype)
    x = (planted(w.double(), 70, 6, 9) @ w.double()).to(dtype) + 0.1 * torch.randn(
        70, 40, generator=torch.Generator().manual_seed(1)
    ).to(dtype)
    b = 0.05 * torch.ones(40, dtype=dtype)
    l0 = torch.randint(0, 15, (70,), generator=torch.Generator().manual_seed(2))
    ours = gradient_pursuit(x, w, b, l0, nonnegative=nonneg, batch_size=16).to_dense(300)
    ref = gradient_pursuit_dense(x, w, b, l0, nonnegative=nonneg)
    assert torch.equal(ours != 0, ref != 0)
    assert (ours - ref).abs().max() < tol * max(1.0, float(ref.abs().max()))


def test_deterministic_and_batch_independent():
    w = dictionary(256, 32, 11)
    x = torch.randn(100, 32, dtype=F64, generator=torch.Generator().manual_seed(12))
    a = gradient_pursuit(x, w, None, 10, batch_size=32)
    b = gradient_pursuit(x, w, None, 10, batch_size=32)
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
    c = gradient_pursuit(x, w, None, 10, batch_size=7)
    torch.testing.assert_close(c.to_dense(256), a.to_dense(256), atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["gp", "mp", "omp"])
def test_nothing_to_add_gives_zeros_not_nan(method):
    nonneg = method != "omp"
    w = dictionary(50, 16, 13).abs()  # nonnegative atoms: pairwise correlations all positive
    w[7] = 0.0  # a zero decoder row is never selected
    b = torch.full((16,), 0.5, dtype=F64)
    x = torch.stack(
        [b, b - w[3], b + w[3], b + 2 * w[3]]
    )  # zero residual; all correlations < 0; 1 atom
    code = pursue(x, w, b, 6, method=method, nonnegative=nonneg)
    assert torch.isfinite(code.values).all()
    assert (code.indices != 7).all() or (code.values[code.indices == 7] == 0).all()
    assert (code.values[0] == 0).all()  # x = b_dec: nothing to explain
    if nonneg:
        assert (code.values[1] == 0).all()  # no atom has a positive correlation
    rec = code.decode(w, b)
    torch.testing.assert_close(rec[2:], x[2:], atol=1e-12, rtol=0)  # one atom fits exactly
    assert (code.l0[2:] == 1).all()  # steps after an exact fit add nothing
    # an l0 of 0 and an l0 above the width are fine too
    assert pursue(x, w, b, 0, method=method, nonnegative=nonneg).values.shape == (4, 0)
    big = pursue(x[:1] + 0.1, w, b, 80, method=method, nonnegative=nonneg)
    assert big.values.shape[1] == 50 and torch.isfinite(big.values).all()


def test_bad_arguments():
    w = dictionary(20, 8, 0)
    x = torch.zeros(3, 8, dtype=F64)
    with pytest.raises(ValueError):
        pursue(x, w, None, 2, method="omp", nonnegative=True)
    with pytest.raises(ValueError):
        pursue(x, w, None, -1)
    with pytest.raises(ValueError):
        PursuitSAE(TopKSAE(8, 20, 2), method="lasso")  # type: ignore[arg-type]
    from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError

    with pytest.raises(ShapeMismatchError):
        pursue(torch.zeros(3, 9, dtype=F64), w, None, 2)
    with pytest.raises(DarkMatterError):
        pursue(torch.full((3, 8), float("nan"), dtype=F64), w, None, 2)


def test_matching_pursuit_first_step_is_projection():
    w = dictionary(30, 10, 2, unit=False)
    x = torch.randn(5, 10, dtype=F64, generator=torch.Generator().manual_seed(3))
    code = matching_pursuit(x, w, None, 1, nonnegative=False)
    corr = (x @ w.T) / w.norm(dim=1)
    j = corr.abs().argmax(dim=1)
    assert torch.equal(code.indices[:, 0], j)
    torch.testing.assert_close(code.values[:, 0], (x * w[j]).sum(1) / w[j].square().sum(1))


# ---------------------------------------------------------------------------- the SAE wrapper


def test_pursuit_sae_protocol_and_matched_l0():
    sae = TopKSAE(16, 64, 5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)) + sae.b_dec
    gp = PursuitSAE(sae)
    assert isinstance(gp, SAE) and (gp.d_in, gp.d_sae) == (16, 64)
    own = (sae.encode(x) != 0).sum(1)
    z = gp.encode(x)
    assert ((z != 0).sum(1) <= own).all() and (z >= 0).all()
    torch.testing.assert_close(gp(x), gp.decode(z), atol=1e-5, rtol=0)
    with torch.no_grad():  # pursuit over the same decoder fits better than the random encoder
        assert (x - gp(x)).square().sum() < (x - sae(x)).square().sum()
    fixed = PursuitSAE(sae, method="omp", l0=3)
    assert ((fixed.encode(x) != 0).sum(1) == 3).all()


def synthetic_store(path, d=16, n_ctx=240, seed=0):
    st, dirs = sparse_code_store(path, d=d, n_ctx=n_ctx, per_append=60, mean=5.0,
                                 meta={"model_name": "synthetic"}, seed=seed)
    return st, direction_sae(dirs, 64, 4, seed=1, mean=5.0)


SPLIT = SplitConfig(filter=TokenFilter(skip_positions=1, max_norm_ratio=None))


def test_decompose_pursuit_sae_matches_numpy(tmp_path):
    st, sae = synthetic_store(tmp_path / "store")
    splits = make_splits(st, SPLIT)
    gp = PursuitSAE(sae)
    out = decompose_many(
        st,
        {"sae": sae, "gp": gp},
        splits,
        DecomposeConfig(chunk_rows=500, device="cpu"),
        progress=False,
    )
    x = st.gather("resid_post.1", np.arange(st.n_rows))
    with torch.no_grad():
        e = (x - gp(x)).double().numpy()
    x = x.double().numpy()
    def ones(a):
        return np.hstack([a, np.ones((len(a), 1))])
    coef, *_ = np.linalg.lstsq(ones(x[splits.probe_train]), e[splits.probe_train], rcond=None)
    te = splits.probe_test
    nl = e[te] - ones(x[te]) @ coef
    sst = ((x[te] - x[te].mean(0)) ** 2).sum()
    m = out["gp"].metrics
    assert m.fvu == pytest.approx((e[te] ** 2).sum() / sst, rel=1e-4)
    assert m.fvu_nonlinear == pytest.approx((nl**2).sum() / sst, rel=1e-4)
    assert m.l0 <= out["sae"].metrics.l0
    assert m.fvu < out["sae"].metrics.fvu  # the encoder error is real for a crude encoder


def test_half_precision_decoder_runs_in_float32():
    w = dictionary(64, 16, 1).to(torch.bfloat16)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(2))
    code = gradient_pursuit(x, w, None, 4)
    assert code.values.dtype == torch.float32
    ref = gradient_pursuit(x, w.float(), None, 4)
    assert torch.equal(code.values, ref.values) and torch.equal(code.indices, ref.indices)
    torch.testing.assert_close(code.decode(w), ref.decode(w.float()))
