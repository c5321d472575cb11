"""SAEs trained on e, ê and e − ê of a tiny run: data provenance, targets, scores, matched L0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_run
from sae_darkmatter import SAETrainConfig, SplitConfig
from sae_darkmatter.analyses.error_saes import (
    TARGETS,
    difference_intervals,
    error_sae_analysis,
    error_targets,
    matched_l0,
    score,
    section,
    split_by_context,
)
from sae_darkmatter.config import ErrorSAEConfig
from sae_darkmatter.decompose import load_decompositions
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.saes import TopKSAE, load_sae
from sae_darkmatter.splits import make_splits
from sae_darkmatter.store import ActivationStore

HOOK = "resid_post.2"
CFG = ErrorSAEConfig(
    train=SAETrainConfig(widths=(32,), ks=(2, 4, 8), train_tokens=2000, batch_size=256)
)


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    return make_run(
        tiny_model_dir, tmp_path_factory.mktemp("run"), HOOK, n_contexts=64, widths=(64,)
    )


@pytest.fixture(scope="module")
def result(run_dir):
    return error_sae_analysis(run_dir, cfg=CFG, progress=False)


def test_error_saes_see_only_probe_test_tokens(run_dir, result):
    store = ActivationStore.open(run_dir / "store")
    splits = make_splits(store, SplitConfig(), hook=HOOK)
    dec = load_decompositions(run_dir / "decompose")[0]
    rows = dec.tokens["rows"]
    assert np.array_equal(rows, splits.probe_test)
    context = store.column("context")
    train, held_out = split_by_context(rows, context[rows], CFG.train_fraction, CFG.seed)
    assert np.array_equal(np.sort(np.concatenate([train, held_out])), rows)
    assert not np.intersect1d(context[train], context[held_out]).size  # split by context
    for other in (splits.probe_train, splits.sae_train):  # never the probe's or the SAE's tokens
        assert not np.intersect1d(train, other).size and not np.intersect1d(held_out, other).size
    base = result["bases"][0]
    assert (base["tokens"]["train"], base["tokens"]["eval"]) == (train.size, held_out.size)


def test_targets_match_the_decomposition(run_dir):
    store = ActivationStore.open(run_dir / "store")
    dec = load_decompositions(run_dir / "decompose")[0]
    sae = load_sae(run_dir / "saes" / dec.name)
    rows = dec.tokens["rows"]
    t = error_targets(store, HOOK, rows, sae, dec)
    # decompose saved ‖e‖², ‖ê‖², ‖e − ê‖² per probe-test token: an independent computation
    for target, key in zip(TARGETS, ("err_sq", "linear_sq", "nonlinear_sq")):
        np.testing.assert_allclose(
            t[target].square().sum(1).numpy(), dec.tokens[key], rtol=2e-4, atol=1e-6
        )
    torch.testing.assert_close(t["linear"] + t["nonlinear"], t["error"])


def test_grid_scores_and_matched_l0(result, run_dir):
    base = result["bases"][0]
    grid = base["grid"]
    assert [(r["target"], r["sparsity"]) for r in grid] == [
        (t, k) for t in TARGETS for k in (2, 4, 8)
    ]
    for r in grid:
        assert 0 < r["fvu"] < 1.5 and r["l0"] <= r["sparsity"] + 1e-9
        assert 0 <= r["dead"] <= 32 and r["dead_fraction"] == pytest.approx(r["dead"] / 32)
        assert r["unexplained_over_error_var"] == pytest.approx(
            r["fvu"] * base["target_variance"][r["target"]] / base["target_variance"]["error"],
            rel=1e-6,
        )
    for t in TARGETS:  # more latents per token reconstruct better (held out)
        fvus = [r["fvu"] for r in grid if r["target"] == t]
        assert fvus[0] > fvus[-1]
    for m, ref in zip(base["matched_l0"], [r for r in grid if r["target"] == "error"]):
        assert m["fvu"]["error"] == pytest.approx(ref["fvu"])  # interpolating at its own L0
    assert (run_dir / result["figures"]["error_saes"]).read_bytes()[:4] == b"\x89PNG"
    # 8 steps each (2000 tokens / 256), all stopped by the fixed budget, gains in the section
    assert {r["tokens_seen"] for r in grid} == {2048}
    assert {r["training"]["stopped"] for r in grid} == {"tokens"}
    page = section(result, run_dir)
    assert "Training: 2,048 tokens each (stopped by: tokens)" in page
    gains = [100 * r["training"]["doubling_gain"] for r in grid if r["target"] == "nonlinear"]
    assert f"nonlinear {min(gains):.1f}–{max(gains):.1f} %" in page


def test_rerun_reuses_trained_saes(run_dir, result):
    weights = sorted((run_dir / "error_saes").rglob("*.safetensors"))
    assert len(weights) == 9
    stamps = [w.stat().st_mtime_ns for w in weights]
    again = error_sae_analysis(run_dir, cfg=CFG, progress=False)
    assert [w.stat().st_mtime_ns for w in weights] == stamps
    assert [r["fvu"] for r in again["bases"][0]["grid"]] == [
        r["fvu"] for r in result["bases"][0]["grid"]
    ]


def test_score_against_numpy():
    torch.manual_seed(0)
    sae = TopKSAE(8, 16, 3, generator=torch.Generator().manual_seed(0))
    y = torch.randn(200, 8) + 2
    out, token_sse = score(sae, y, error_sst=10.0, chunk_rows=64)
    with torch.no_grad():
        y_hat, z = sae(y).numpy(), sae.encode(y).numpy()
    yn = y.numpy().astype(np.float64)
    sse = ((yn - y_hat) ** 2).sum()
    np.testing.assert_allclose(token_sse, ((yn - y_hat) ** 2).sum(1), rtol=1e-5)
    assert out["fvu"] == pytest.approx(sse / ((yn - yn.mean(0)) ** 2).sum(), rel=1e-6)
    assert out["unexplained_over_error_var"] == pytest.approx(sse / 10.0, rel=1e-6)
    assert out["l0"] == pytest.approx((z != 0).sum(1).mean())
    assert out["dead"] == int((~(z != 0).any(0)).sum())


def test_difference_intervals_are_paired_and_only_where_both_l0s_are_exact():
    rng = np.random.default_rng(0)
    n = 3000
    dev = {t: rng.gamma(2.0, size=n) for t in ("error", "linear", "nonlinear")}
    # per token, the nonlinear target's SAE leaves 0.6 of the deviation, the linear one 0.5
    # (plus shared noise: the pairing makes the difference's interval narrow)
    noise = rng.normal(0, 0.05, n)
    sse = [dev["linear"] * (0.5 + noise), dev["nonlinear"] * (0.6 + noise),
           dev["linear"] * 0.4]
    grid = [{"target": "linear", "width": 64, "l0": 8.0},
            {"target": "nonlinear", "width": 64, "l0": 8.0},
            {"target": "linear", "width": 64, "l0": 16.0}]
    matched = [{"width": 64, "l0": 8.0}, {"width": 64, "l0": 16.0}]
    difference_intervals(matched, grid, sse, dev, n_boot=300, seed=1)
    low, high = matched[0]["fvu_nonlinear_minus_linear_ci"]
    fvu = [s @ np.ones(n) / (dev[r["target"]] @ np.ones(n)) for s, r in zip(sse, grid)]
    assert low < fvu[1] - fvu[0] < high and 0.05 < low and high < 0.15
    counts = np.stack([np.bincount(r.integers(0, n, n), minlength=n)
                       for r in [np.random.default_rng([1, 2])] for _ in range(300)])
    draws = (counts @ sse[1]) / (counts @ dev["nonlinear"]) - (counts @ sse[0]) / (
        counts @ dev["linear"])
    assert [low, high] == pytest.approx(np.percentile(draws, [2.5, 97.5]), abs=1e-12)
    assert matched[1]["fvu_nonlinear_minus_linear_ci"] is None  # no nonlinear SAE at L0 16


def test_matched_l0_interpolates_log_log():
    rows = [
        {
            "target": t,
            "width": 64,
            "l0": l0,
            "sparsity": int(l0),
            "dead": i,
            "fvu": scale * l0**-0.5,
        }
        for i, (t, scale) in enumerate((("error", 1.0), ("linear", 0.5), ("nonlinear", 2.0)))
        for l0 in ((4.0, 8.0, 16.0) if t != "error" else (2.0, 8.0, 32.0))
    ]
    out = matched_l0(rows)
    assert [m["l0"] for m in out] == [2.0, 8.0, 32.0]
    assert out[1]["dead"] == {"error": 0, "linear": 1, "nonlinear": 2}  # the SAEs with the same k
    assert out[1]["fvu"]["linear"] == pytest.approx(0.5 * 8 ** -0.5)
    rows = [r for r in rows if r["l0"] != 8.0 or r["target"] == "error"]  # interpolate, not look up
    out = matched_l0(rows)
    assert out[1]["fvu"]["linear"] == pytest.approx(0.5 * 8 ** -0.5)  # exact for a power law
    assert out[1]["fvu"]["nonlinear"] == pytest.approx(2.0 * 8 ** -0.5)
    assert out[1]["dead"] == {"error": 0, "linear": None, "nonlinear": None}  # no k=8 SAE left
    assert (
        out[0]["fvu"]["linear"] is None and out[2]["fvu"]["nonlinear"] is None
    )  # no extrapolation


def test_unknown_base_sae_is_named(run_dir):
    with pytest.raises(DarkMatterError, match="topk-w64-k8"):
        error_sae_analysis(run_dir, cfg=ErrorSAEConfig(saes=("nope",)), progress=False)
