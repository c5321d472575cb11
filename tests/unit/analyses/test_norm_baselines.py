"""Norm-prediction baselines on a tiny real store with targets of known dependence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import PNG_MAGIC
from sae_darkmatter.analyses.norm_alignment import latent_norm_alignment
from sae_darkmatter.analyses.norm_baselines import (
    BASELINES,
    alignment_figure,
    baseline_figure,
    fit_mask,
    grouped_ols_predict,
    norm_analysis,
    norm_baselines,
    r2_interval,
    r2_score,
    violin_figure,
)
from sae_darkmatter.saes import TopKSAE, load_sae, save_sae
from sae_darkmatter.store import ActivationStore

D, T, N_CTX, VOCAB = 8, 16, 50, 12


def _write_decomposition(
    folder: Path, name: str, sae_path: Path, d_sae: int, rows, err_sq, l0, rng
) -> None:
    n = len(rows)
    tensors = {
        "error_probe.weight": torch.zeros(D, D, dtype=torch.float64),
        "error_probe.bias": torch.zeros(D, dtype=torch.float64),
        "norm_probe.weight": torch.from_numpy(rng.normal(size=(D, 1))),
        "norm_probe.bias": torch.zeros(1, dtype=torch.float64),
        "test.rows": torch.from_numpy(rows.astype(np.int64)),
        "test.err_sq": torch.from_numpy(err_sq.astype(np.float32)),
        "test.linear_sq": torch.from_numpy((0.5 * err_sq).astype(np.float32)),
        "test.nonlinear_sq": torch.from_numpy((0.5 * err_sq).astype(np.float32)),
        "test.err_sq_pred": torch.from_numpy(
            (err_sq * rng.uniform(0.8, 1.2, n)).astype(np.float32)
        ),
        "test.x_centered_sq": torch.ones(n, dtype=torch.float32),
        "test.l0": torch.from_numpy(l0.astype(np.int32)),
    }
    save_file(tensors, folder / f"{name}.safetensors")
    info = {
        "name": name,
        "sae": {"path": str(sae_path), "architecture": "topk", "k": 4},
        "metrics": {"hook": "h", "d_in": D, "d_sae": d_sae},
        "probe_file": f"{name}.safetensors",
    }
    (folder / f"{name}.json").write_text(json.dumps(info))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A store with x ~ N(0, I) independent of tokens/positions, and five fake decompositions.

    ``lin``: ‖e‖² = a·x + 15 + noise; ``tok``: depends on the token id only; ``pos``: on the
    position only; ``mix``: a·x + f(token); ``norm``: ‖x‖²; ``root``: ‖e‖ = a·x + 20 + noise.
    Every target stays positive, as a squared norm does.
    """
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(1)
    store = ActivationStore.create_or_resume(
        root / "store", hooks={"h": D}, context_length=T, meta={}
    )
    x = rng.normal(size=(N_CTX, T, D)).astype(np.float32)
    tokens = rng.integers(0, VOCAB, size=(N_CTX, T))
    store.append(
        context_start=0, acts={"h": torch.from_numpy(x)}, tokens=torch.from_numpy(tokens), loss=None
    )
    store = ActivationStore.open(root / "store")
    rows = np.sort(rng.choice(N_CTX * T, 700, replace=False))
    xr, tok, pos = x.reshape(-1, D)[rows], tokens.reshape(-1)[rows], store.column("position")[rows]
    a = rng.normal(size=D)
    f_tok, g_pos = rng.uniform(1, 10, VOCAB), rng.uniform(1, 10, T)
    noise = lambda s: s * rng.normal(size=len(rows))  # noqa: E731
    targets = {
        "lin": xr @ a + 15 + noise(0.1),
        "tok": f_tok[tok] + noise(0.1),
        "pos": g_pos[pos] + noise(0.1),
        "mix": xr @ a + 10 + f_tok[tok] + noise(0.1),
        "norm": np.square(xr).sum(1) + noise(0.1),
        "root": np.square(xr @ a + 20 + noise(0.1)),
    }
    dec = root / "decompose"
    dec.mkdir()
    for i, (name, y) in enumerate(targets.items()):
        sae_path = root / "saes" / name
        save_sae(
            TopKSAE(D, 16 * (i + 1), 4, generator=torch.Generator().manual_seed(i)),
            sae_path,
            metadata={},
        )
        _write_decomposition(
            dec, name, sae_path, 16 * (i + 1), rows, y, rng.integers(1, 5, len(rows)), rng
        )
    return {
        "root": root,
        "store": store,
        "dec": dec,
        "rows": rows,
        "x": xr,
        "tok": tok,
        "targets": targets,
    }


@pytest.fixture(scope="module")
def result(run):
    return norm_baselines(run["dec"], run["store"], seed=3)


def test_x_baseline_matches_numpy_lstsq(run, result):
    fit = fit_mask(len(run["rows"]), 3)
    design = np.column_stack([run["x"].astype(np.float64), np.ones(len(run["rows"]))])
    for name in ("lin", "tok", "mix"):
        y = run["targets"][name].astype(np.float32).astype(np.float64)  # stored as float32
        w, *_ = np.linalg.lstsq(design[fit], y[fit], rcond=None)
        ref = r2_score(y[~fit], design[~fit] @ w)
        assert result[name]["x (linear)"] == pytest.approx(ref, abs=1e-9)
    assert result["lin"]["x (linear)"] > 0.99
    assert result["baselines"] == list(BASELINES)
    assert result["n_fit"] == 350 and result["n_score"] == 350


def test_the_norm_target_is_fit_on_x_like_the_squared_norm(run, result):
    """"x (linear) → ‖e‖" is the same held-out OLS on sqrt of the stored ‖e‖²; where ‖e‖ (not
    ‖e‖²) is linear in x, only that target reaches R² ≈ 1."""
    fit = fit_mask(len(run["rows"]), 3)
    design = np.column_stack([run["x"].astype(np.float64), np.ones(len(run["rows"]))])
    for name in ("lin", "root", "norm"):
        y = np.sqrt(run["targets"][name].astype(np.float32).astype(np.float64))
        w, *_ = np.linalg.lstsq(design[fit], y[fit], rcond=None)
        ref = r2_score(y[~fit], design[~fit] @ w)
        assert result[name]["x (linear) → ‖e‖"] == pytest.approx(ref, abs=1e-9)
    assert result["root"]["x (linear) → ‖e‖"] > 0.99 > result["root"]["x (linear)"] + 0.001


def test_x_fit_intervals_resample_the_scored_tokens(run, result):
    y = run["targets"]["mix"]
    pred = y + np.random.default_rng(0).normal(size=len(y))
    unresampled = np.ones((3, len(y)))  # every "draw" the sample itself: R² exactly
    assert r2_interval(unresampled, y, pred) == pytest.approx([r2_score(y, pred)] * 2, abs=1e-12)
    for name in ("lin", "mix", "root"):
        for base, (lo, hi) in result[name]["intervals"].items():
            assert lo < result[name][base] < hi and hi - lo < 0.2, (name, base)


def test_known_dependences_are_found(result):
    assert result["tok"]["token identity"] > 0.99
    assert result["tok"]["x (linear)"] < 0.1  # x is independent of the token
    assert result["pos"]["position"] > 0.99
    assert result["pos"]["‖x‖ + L0 + position"] > 0.99
    assert result["pos"]["token identity"] < 0.1
    assert result["lin"]["token identity"] < 0.1
    for name in ("lin", "tok", "pos"):
        assert result[name]["L0"] < 0.05  # L0 is random
    assert (
        result["norm"]["‖x‖"] > 0.99 > 0.1 > result["norm"]["x (linear)"]
    )  # ‖x‖² is not linear in x here
    mix = result["mix"]
    # two-stage fit (x first, then token means of its residual): close to, not exactly, joint OLS
    assert mix["x + token identity"] > 0.95 > max(mix["x (linear)"], mix["token identity"]) + 0.2


def test_token_identity_is_per_id_mean_with_pooled_rare_ids(run, result):
    fit = fit_mask(len(run["rows"]), 3)
    y = run["targets"]["tok"].astype(np.float32).astype(np.float64)
    tok = run["tok"].copy()
    tok[tok == 0] = 100 + np.arange((tok == 0).sum())  # make id-0 tokens unique: all rare
    ids, counts = np.unique(tok[fit], return_counts=True)
    common = set(ids[counts >= 5].tolist())
    rare = fit & ~np.isin(tok, list(common))
    pred = np.array([y[fit & (tok == t)].mean() if t in common else y[rare].mean() for t in tok])
    got = grouped_ols_predict(np.empty((len(y), 0)), y, fit, tok, min_count=5)
    np.testing.assert_allclose(got, pred, rtol=1e-12)
    # with real ids every id is common here, so the baseline is the per-id mean
    assert result["tok"]["token identity"] == pytest.approx(
        r2_score(
            y[~fit],
            grouped_ols_predict(np.empty((len(y), 0)), y, fit, run["tok"], min_count=5)[~fit],
        )
    )


def test_grouped_ols_matches_dense_one_hot_lstsq():
    rng = np.random.default_rng(0)
    n, g = 300, 7
    groups = rng.integers(0, g, n)
    f = rng.normal(size=(n, 2))
    y = f @ [1.0, -2.0] + rng.normal(size=g)[groups] + rng.normal(size=n)
    fit = fit_mask(n, 0)
    design = np.column_stack([f, np.eye(g)[groups]])
    w, *_ = np.linalg.lstsq(design[fit], y[fit], rcond=None)
    np.testing.assert_allclose(grouped_ols_predict(f, y, fit, groups), design @ w, atol=1e-10)


def test_latent_norm_alignment_matches_dense(run):
    sae = load_sae(run["root"] / "saes" / "mix")
    rows = run["rows"]
    rng = np.random.default_rng(5)
    w = torch.from_numpy(rng.normal(size=(D, 1)))
    res = latent_norm_alignment(sae, w, run["store"], rows, hook="h", max_rows=10_000)
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(run["x"])).double()
    count = (z > 0).sum(0)
    keep = count >= 5
    mean = z.sum(0)[keep] / count[keep]
    dirs = sae.W_dec.detach().double()
    proj = (dirs / dirs.norm(dim=1, keepdim=True) @ w.reshape(-1))[keep]
    assert res["latent_index"] == torch.nonzero(keep).reshape(-1).tolist()
    np.testing.assert_allclose(res["mean_activation"], mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(res["projection"], proj.numpy(), rtol=1e-10)
    assert res["pearson"] == pytest.approx(np.corrcoef(mean.numpy(), proj.numpy())[0, 1], abs=1e-6)
    assert res["n_rows"] == len(rows) and res["n_latents"] == int(keep.sum()) > 3
    thinned = latent_norm_alignment(sae, w, run["store"], rows, hook="h", max_rows=100)
    assert thinned["n_rows"] == 100


def test_reconstruction_norm_probe_matches_numpy_lstsq(run):
    from sae_darkmatter.analyses.norm_alignment import reconstruction_norm_probe

    sae = load_sae(run["root"] / "saes" / "mix")
    rows = run["rows"]
    a = reconstruction_norm_probe(sae, run["store"], rows, hook="h")
    with torch.no_grad():
        r = (sae(torch.from_numpy(run["x"])) - sae.b_dec).double().numpy()
    design = np.hstack([r, np.ones((len(r), 1))])
    ref, *_ = np.linalg.lstsq(design, (r**2).sum(1), rcond=None)
    # float32 reconstructions, float64 fit: agreement to ~1e-5 relative of the largest weight
    np.testing.assert_allclose(a.numpy(), ref[:-1], rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_figures_and_analysis(run, result, tmp_path):
    assert baseline_figure(result, tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC
    violin = violin_figure(run["dec"], tmp_path / "v.png", max_points=200)
    assert violin.read_bytes()[:8] == PNG_MAGIC
    summary = norm_analysis(run["dec"], run["store"], tmp_path / "out", seed=3)
    json.dumps(summary)
    assert summary["baselines"]["lin"] == result["lin"]
    assert summary["alignment"]["sae"] == "root"  # the widest
    for name in ("norm_baselines", "norm_violins", "norm_alignment"):
        assert (tmp_path / "out" / "figures" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    align = {
        "mean_activation": [1.0, 2.0],
        "projection": [0.5, 1.0],
        "pearson": None,
        "spearman": None,
        "n_latents": 2,
    }
    assert alignment_figure(align, tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
