"""Scaling analysis (paper Fig. 1) on a fake sweep with a known power law FVU(W) = 0.1 + 2·W^-0.5.

The fake ``decompose/`` folder follows the format contract (notes/ANALYSES.md): one JSON and one
safetensors file per SAE, all sharing the same test rows. Per token, ‖x − x̄‖² ~ Gamma(8, 1) and
err_sq = FVU(W)·‖x − x̄‖²·noise (noise: mean-1 Gamma), so Σerr_sq/Σ‖x − x̄‖² → FVU(W).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy.optimize import curve_fit

from helpers import PNG_MAGIC
from sae_darkmatter.analyses.scaling import (
    PowerLawFit,
    SweepPoint,
    contour_figure,
    fit_power_law,
    fit_scaling,
    grid_table,
    load_sweep,
    scaling_analysis,
    select_at_l0,
    stacked_figure,
)
from sae_darkmatter.errors import DarkMatterError

WIDTHS = (256, 512, 1024, 2048, 4096, 8192)
KS = (16, 32, 64)
C, A, M = 0.1, 2.0, 0.5
NONLINEAR = 0.05


def true_fvu(width: float, k: int) -> float:
    """The known law at k=32; other k shift the amplitude (so the L0 choice matters)."""
    return C + A * width**-M * (32 / k) ** 0.3


def l0_of(k: int, i: int) -> float:
    return k * (1 + 0.02 * ((i % 3) - 1))


def make_sweep(path: Path, n_tokens: int, seed: int = 0, widths=WIDTHS, ks=KS) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    rows = np.sort(rng.choice(10 * n_tokens, n_tokens, replace=False)).astype(np.int64)
    xc = rng.gamma(8.0, 1.0, n_tokens)
    d = 4
    for k in ks:
        for i, w in enumerate(widths):
            f = true_fvu(w, k)
            nl = NONLINEAR * xc * rng.gamma(4.0, 0.25, n_tokens)
            lin = (f - NONLINEAR) * xc * rng.gamma(4.0, 0.25, n_tokens)
            err = nl + lin
            name = f"w{w}_k{k}"
            metrics = {"hook": "blocks.1.hook_resid_post", "d_in": d, "d_sae": w, "l0": l0_of(k, i),
                       "fvu": f, "fvu_linear": f - NONLINEAR, "fvu_nonlinear": NONLINEAR,
                       "linear_share": 1 - NONLINEAR / f, "r2_error_mean_dim": 0.5 - 0.01 * i,
                       "r2_error_pooled": 0.5, "r2_error_norm": 0.9 - 0.001 * k}
            meta = {"name": name, "sae": {"path": f"saes/{name}", "architecture": "topk", "k": k},
                    "model": "tiny", "data": {"n_test": n_tokens}, "metrics": metrics,
                    "probe_file": f"{name}.safetensors"}
            (path / f"{name}.json").write_text(json.dumps(meta))
            save_file(
                {
                    "error_probe.weight": np.zeros((d, d)),
                    "error_probe.bias": np.zeros(d),
                    "norm_probe.weight": np.zeros((d, 1)),
                    "norm_probe.bias": np.zeros(1),
                    "test.rows": rows,
                    "test.err_sq": err.astype(np.float32),
                    "test.linear_sq": lin.astype(np.float32),
                    "test.nonlinear_sq": nl.astype(np.float32),
                    "test.err_sq_pred": err.astype(np.float32),
                    "test.x_centered_sq": xc.astype(np.float32),
                    "test.l0": np.full(n_tokens, k, np.int32),
                },
                str(path / f"{name}.safetensors"),
            )
    return path


@pytest.fixture(scope="module")
def big_sweep(tmp_path_factory) -> Path:
    return make_sweep(tmp_path_factory.mktemp("big") / "decompose", 20_000)


@pytest.fixture(scope="module")
def big_fit(big_sweep) -> PowerLawFit:
    return fit_scaling(load_sweep(big_sweep), 32, n_boot=100, seed=0)


def test_load_sweep_and_grid(big_sweep):
    points = load_sweep(big_sweep)
    assert len(points) == len(WIDTHS) * len(KS)
    p = next(p for p in points if p.name == "w1024_k32")
    assert (p.width, p.k, p.l0) == (1024, 32, pytest.approx(l0_of(32, 2)))
    assert p.err_sq.shape == p.nonlinear_sq.shape == p.x_centered_sq.shape == (20_000,)
    # FVU from the per-token arrays agrees with the known truth (sampling error ~0.5 %).
    assert p.fvu == pytest.approx(true_fvu(1024, 32), rel=0.02)
    assert p.fvu_nonlinear == pytest.approx(NONLINEAR, rel=0.02)
    grid = grid_table(points)
    assert [(r["k"], r["width"]) for r in grid] == [(k, w) for k in KS for w in WIDTHS]
    assert grid[0]["fvu"] == pytest.approx(true_fvu(256, 16))
    assert set(grid[0]) >= {
        "width",
        "k",
        "l0",
        "fvu",
        "fvu_linear",
        "fvu_nonlinear",
        "linear_share",
        "r2_error_mean_dim",
        "r2_error_norm",
    }


def test_select_at_l0_picks_nearest(big_sweep):
    points = load_sweep(big_sweep)
    sel = select_at_l0(points, 40.0)  # nearest is k=32 (|32-40| < |64-40|)
    assert [p.width for p, _ in sel] == list(WIDTHS)
    for i, (p, dist) in enumerate(sel):
        assert p.k == 32
        assert dist == pytest.approx(abs(l0_of(32, i) - 40.0) / 40.0)
    sel = select_at_l0(points, 60.0)
    assert all(p.k == 64 for p, _ in sel)
    with pytest.raises(DarkMatterError):
        select_at_l0(points, 0.0)


def test_fit_power_law_matches_curve_fit_on_noiseless_data():
    w = np.array(WIDTHS, dtype=float)
    for c, a, m in [(C, A, M), (0.03, 5.0, 0.3), (0.2, 0.8, 0.9)]:
        y = c + a * w**-m
        ours = fit_power_law(w, y)
        ref, _ = curve_fit(
            lambda x, c_, a_, m_: c_ + a_ * x**-m_,
            w,
            y,
            p0=(c * 0.9, a * 1.1, m * 1.1),
            bounds=(0, np.inf),
            xtol=1e-14,
            ftol=1e-14,
            gtol=1e-14,
            max_nfev=20_000,
        )
        np.testing.assert_allclose(ours, (c, a, m), rtol=1e-5)
        np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_fit_power_law_needs_three_widths():
    with pytest.raises(DarkMatterError, match="3 distinct widths"):
        fit_power_law([256, 512, 512], [0.2, 0.15, 0.15])
    with pytest.raises(DarkMatterError):
        fit_power_law([256, 512, 1024], [0.2, np.nan, 0.1])


def test_fit_scaling_needs_three_widths(tmp_path):
    d = make_sweep(tmp_path / "decompose", 500, widths=(256, 512), ks=(32,))
    with pytest.raises(DarkMatterError, match="at least 3 widths"):
        fit_scaling(load_sweep(d), 32, n_boot=5)


def test_fit_recovers_known_law(big_fit):
    # Tolerances: with 20k tokens the bootstrap SE is ~0.0013 for c, ~0.013 for m and ~6 % for a,
    # so these bounds are about 4 SE (observed across data seeds 0-2: |Δc| <= 0.0023,
    # |Δm| <= 0.019).
    fit = big_fit
    assert abs(fit.c - C) < 0.005
    assert abs(fit.m - M) < 0.05
    assert fit.a == pytest.approx(A, rel=0.2)
    for est, (lo, hi), truth in [(fit.c, fit.c_ci, C), (fit.a, fit.a_ci, A), (fit.m, fit.m_ci, M),
                                 (fit.fvu_nonlinear_mean, fit.fvu_nonlinear_mean_ci, NONLINEAR)]:
        assert lo <= est <= hi
        assert lo <= truth <= hi
    assert fit.widths == WIDTHS
    for w, f, (lo, hi) in zip(fit.widths, fit.fvu, fit.fvu_ci):
        assert lo < f < hi
        assert lo <= true_fvu(w, 32) <= hi
    np.testing.assert_allclose(fit.predict(np.array(WIDTHS)), fit.fvu, rtol=0.02)


def test_cis_shrink_with_more_tokens(tmp_path, big_fit):
    small = fit_scaling(
        load_sweep(make_sweep(tmp_path / "decompose", 2_000)), 32, n_boot=100, seed=0
    )
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    # 10x the tokens: CI widths should shrink by about sqrt(10) = 3.2.
    for s, b in zip(small.fvu_ci, big_fit.fvu_ci):
        assert width(s) > 2 * width(b)
    assert width(small.c_ci) > 1.5 * width(big_fit.c_ci)
    assert width(small.m_ci) > 1.5 * width(big_fit.m_ci)
    assert width(small.fvu_nonlinear_mean_ci) > 2 * width(big_fit.fvu_nonlinear_mean_ci)


def test_bootstrap_reproducible_with_seed(tmp_path):
    points = load_sweep(make_sweep(tmp_path / "decompose", 1_000))
    a = fit_scaling(points, 32, n_boot=30, seed=7)
    b = fit_scaling(points, 32, n_boot=30, seed=7)
    c = fit_scaling(points, 32, n_boot=30, seed=8)
    assert a == b
    assert (a.c, a.a, a.m) == (c.c, c.a, c.m)  # point estimates do not depend on the seed
    assert a.c_ci != c.c_ci and a.fvu_ci != c.fvu_ci


def test_fit_of_fvu_nonlinear_recovers_a_known_law():
    """Points whose FVU_nonlinear is exactly 0.02 + 0.5·W^-0.3 (per token a fixed share of
    ‖x − x̄‖²) and whose FVU is flat: ``of="fvu_nonlinear"`` recovers the law, and every
    bootstrap resample has the same ratios, so the intervals collapse onto it."""
    rng = np.random.default_rng(0)
    xc, rows = rng.gamma(8.0, 1.0, 500), np.arange(500)
    law = lambda w: 0.02 + 0.5 * w**-0.3  # noqa: E731
    points = [SweepPoint(f"sae__prefix{w}", w, 32, 32.0 * w / 4096, {}, rows, 0.6 * xc,
                         law(w) * xc, xc, prefix_of="sae") for w in WIDTHS]
    fit = fit_scaling(points, 32, n_boot=20, of="fvu_nonlinear")
    assert fit.of == "fvu_nonlinear"
    assert (fit.c, fit.a, fit.m) == pytest.approx((0.02, 0.5, 0.3), rel=1e-6)
    assert fit.m_ci == pytest.approx((0.3, 0.3), rel=1e-6)
    np.testing.assert_allclose(fit.fvu_nonlinear, [law(w) for w in WIDTHS], rtol=1e-12)
    assert fit.fvu == pytest.approx([0.6] * len(WIDTHS))
    flat = fit_scaling(points, 32, n_boot=2)  # the FVU of the same points has no width trend
    assert flat.of == "fvu" and flat.a * 256**-flat.m == pytest.approx(0, abs=1e-6)
    with pytest.raises(DarkMatterError, match="fits 'fvu' or 'fvu_nonlinear'"):
        fit_scaling(points, 32, of="l0")  # type: ignore[arg-type]


def test_mismatched_test_rows_rejected(tmp_path):
    d = make_sweep(tmp_path / "decompose", 300, widths=(256, 512, 1024), ks=(32,))
    probe = d / "w512_k32.safetensors"
    tensors = load_file(str(probe))
    tensors["test.rows"] = tensors["test.rows"] + 1
    save_file(tensors, str(probe))
    with pytest.raises(DarkMatterError, match="different test tokens"):
        fit_scaling(load_sweep(d), 32, n_boot=2)


def test_figures_are_pngs(tmp_path, big_sweep, big_fit):
    points = load_sweep(big_sweep)
    selected = select_at_l0(points, 32)
    for pursuit in (None, 0.03):
        out = stacked_figure(
            big_fit, selected, tmp_path / f"stacked_{pursuit}.png", pursuit_nonlinear=pursuit
        )
        assert out.read_bytes()[:8] == PNG_MAGIC
    out = contour_figure(points, tmp_path / "contours.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    # Too few widths to interpolate: falls back to an annotated scatter.
    few = [p for p in points if p.width in (256, 512)]
    out = contour_figure(few, tmp_path / "contours_few.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(DarkMatterError):
        stacked_figure(big_fit, selected[:2], tmp_path / "bad.png")


def test_scaling_analysis_summary(tmp_path):
    d = make_sweep(tmp_path / "decompose", 2_000)
    out = tmp_path / "analysis"
    summary = scaling_analysis(d, out, n_boot=20, seed=0)
    json.dumps(summary)  # JSON-able
    # Every k has all 6 widths; the tie goes to the smallest k, whose median L0 is 16.
    assert summary["target_l0"] == pytest.approx(16.0)
    assert [s["k"] for s in summary["selected"]] == [16] * len(WIDTHS)
    assert len(summary["grid"]) == len(WIDTHS) * len(KS)
    assert len(summary["per_width"]) == len(WIDTHS)
    fit = summary["fit"]
    assert fit["c_ci"][0] <= fit["c"] <= fit["c_ci"][1]
    assert summary["fvu_nonlinear_mean"] == pytest.approx(NONLINEAR, rel=0.05)
    assert summary["figures"] == {"stacked": "figures/scaling_stacked.png",
                                  "contours": "figures/scaling_contours.png"}
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(summary["figures"].values())
    for rel in written:
        assert (out / rel).read_bytes()[:8] == PNG_MAGIC
    given = scaling_analysis(d, tmp_path / "a2", target_l0=64, n_boot=5)
    assert given["target_l0"] == 64 and all(s["k"] == 64 for s in given["selected"])
