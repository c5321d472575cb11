"""Synthetic activation models: known-answer checks of the linear / nonlinear error estimates."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from helpers import PNG_MAGIC
from sae_darkmatter.config import from_dict, to_dict
from sae_darkmatter.errors import ConfigValueError, DarkMatterError
from sae_darkmatter.saes import TopKSAE, save_sae
from sae_darkmatter.synthetic import (
    SyntheticConfig,
    evaluate,
    evaluate_fits,
    feature_probabilities,
    generate,
    known_features,
    run_grid,
    run_synthetic,
    trained_sae_check,
)

SMALL = SyntheticConfig(d=32, n_features=128, n_tokens=4000, l0=4.0, seed=1,
                        ablations=(0.0, 0.5), noise_levels=(0.0, 0.5, 1.0),
                        line_configs=((0.5, 0.3),))
ALL_FITS = ("in_sample", "held_out", "debiased")


@pytest.fixture(scope="module")
def small_data():
    return generate(SMALL)


def test_generation_matches_its_specification(small_data):
    data = small_data
    assert data.x.dtype == torch.float32 and data.x.shape == (4000, 32)
    assert torch.allclose(data.dictionary.norm(dim=1), torch.ones(128), atol=1e-6)
    # x is exactly codes @ D
    assert torch.allclose(data.x, data.dense_codes() @ data.dictionary, atol=1e-5)
    p = feature_probabilities(SMALL, 128)
    assert float(p.sum()) == pytest.approx(4.0, rel=1e-9) and float(p.max()) <= 1.0
    assert bool((p[:-1] >= p[1:]).all())  # zipf: decreasing in rank
    active = (data.values > 0).sum(1).double().mean()
    assert float(active) == pytest.approx(4.0, rel=0.05)  # sd of the mean ≈ 0.03 (Bernoulli sums)
    # a head that would exceed 1 is clipped and its mass moved to the tail, keeping Σp = l0
    dense = feature_probabilities(replace(SMALL, l0=40.0, zipf_exponent=2.0), 128)
    assert float(dense.max()) == 1.0 and float(dense.sum()) == pytest.approx(40.0, rel=1e-9)
    uniform = feature_probabilities(replace(SMALL, frequency="uniform"), 128)
    assert torch.allclose(uniform, torch.full((128,), 4.0 / 128, dtype=torch.float64))


def test_ablation_removes_the_least_active_features(small_data):
    keep = known_features(small_data, 0.25)
    assert int((~keep).sum()) == 32
    assert float(small_data.feature_mean[~keep].max()) <= float(small_data.feature_mean[keep].min())
    # without noise the whole error is the absent features, and FVU_recon is their share of TV
    res = evaluate(small_data, 0.25, 0.0, 0.0, fit="in_sample")
    assert res["truth"]["absent_features"] > 0.01
    absent = small_data.x.double() - small_data.decode(keep).double()
    assert res["fvu_recon"] == pytest.approx(float(absent.square().sum()) / float(
        (small_data.x.double() - small_data.x.double().mean(0)).square().sum()), rel=1e-6)


@pytest.mark.parametrize("fit", ALL_FITS)
def test_zero_noise_no_ablation_gives_zero_error(small_data, fit):
    res = evaluate(small_data, 0.0, 0.0, 0.0, fit=fit)
    assert res["fvu_recon"] < 1e-10
    assert abs(res["est_linear"]) < 1e-10 and abs(res["est_nonlinear"]) < 1e-10
    assert res["truth"] == {
        "absent_features": 0.0,
        "activation_noise": 0.0,
        "reconstruction_noise": 0.0,
    }


def test_noise_types_move_their_own_estimate(small_data):
    res = run_grid(SMALL, fits=ALL_FITS, data=small_data)
    assert len(res["grid"]) == 9 and len(res["lines"][0]["points"]) == 2
    for fit in ALL_FITS:
        t = res["table1"][fit]
        assert t["act_noise"]["est_linear"] > 0.8, (fit, t)
        assert t["rec_noise"]["est_nonlinear"] > 0.8, (fit, t)
        assert (
            abs(t["rec_noise"]["est_linear"]) < 0.5 and abs(t["act_noise"]["est_nonlinear"]) < 0.5
        )
    # estimates add up to FVU_recon by construction; lines grow with ablation
    for g in res["grid"]:
        for f in g["fits"].values():
            assert f["est_linear"] + f["est_nonlinear"] == pytest.approx(f["fvu_recon"], abs=1e-12)
    pts = res["lines"][0]["points"]
    assert pts[1]["fits"]["in_sample"]["fvu_recon"] > pts[0]["fits"]["in_sample"]["fvu_recon"]
    json.dumps(res)  # JSON-able


def test_in_sample_fit_is_biased_low_by_d_over_n():
    """Pure reconstruction noise, d=64, N=600: OLS in-sample removes ≈ (d+1)/N ≈ 11 % of it."""
    cfg = SyntheticConfig(d=64, n_features=256, n_tokens=600, l0=4.0, seed=3)
    data = generate(cfg)
    for seed in range(2):
        r = evaluate_fits(data, 0.0, 0.0, 1.0, fits=ALL_FITS, seed=seed)
        truth, f = r["truth"]["reconstruction_noise"], r["fits"]
        ins, deb, ho = (f[m]["est_nonlinear"] for m in ("in_sample", "debiased", "held_out"))
        assert ins < deb < ho
        # The residual of OLS on noise independent of the regressors is a projection onto an
        # (N − d − 1)-dim complement: mean (1 − (d+1)/N)·SS, relative sd ≈ sqrt(2/((N−d)·d)) ≈ 0.8%.
        assert ins / truth == pytest.approx(1 - 65 / 600, abs=0.01)
        assert deb / truth == pytest.approx(1.0, abs=0.01)
        # Held-out: a probe fit on N/2 = 300 rows adds its estimation noise; ≥ the Gaussian
        # prediction 65/234 = 0.28 (sparse activations make it larger: 0.36-0.48 measured).
        assert ho / deb > 1.2


def test_debiased_matches_held_out_when_n_is_large():
    """d=32, N=8000: held-out inflation (d+1)/(N/2−d−2) ≈ 0.8 %, scoring-half sampling ≈ 0.4 %."""
    data = generate(SyntheticConfig(d=32, n_features=128, n_tokens=8000, l0=4.0, seed=3))
    for seed in range(2):
        r = evaluate_fits(data, 0.0, 0.0, 1.0, fits=ALL_FITS, seed=seed)
        f = r["fits"]
        assert f["held_out"]["est_nonlinear"] == pytest.approx(
            f["debiased"]["est_nonlinear"], rel=0.03
        )
        # only reconstruction noise: the nonlinear estimate is its true share, the linear one ≈ 0
        assert f["debiased"]["est_nonlinear"] == pytest.approx(
            r["truth"]["reconstruction_noise"], rel=0.005
        )
        assert abs(f["debiased"]["est_linear"]) < 0.005


def test_seeded_runs_are_reproducible():
    a = evaluate_fits(generate(SMALL), 0.5, 0.5, 0.3, fits=ALL_FITS, seed=7)
    b = evaluate_fits(generate(SMALL), 0.5, 0.5, 0.3, fits=ALL_FITS, seed=7)
    assert a == b
    c = evaluate_fits(generate(replace(SMALL, seed=2)), 0.5, 0.5, 0.3, fits=ALL_FITS, seed=7)
    assert c["fits"]["in_sample"]["fvu_recon"] != a["fits"]["in_sample"]["fvu_recon"]


def test_dictionary_from_an_sae_folder(tmp_path):
    sae = TopKSAE(24, 96, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 96)[:, None])  # rows of varied norm
    save_sae(sae, tmp_path / "sae", metadata={"model_name": "x", "hook_name": "y"})
    data = generate(replace(SMALL, dictionary=str(tmp_path / "sae"), n_tokens=500))
    assert (data.cfg.d, data.cfg.n_features) == (24, 96) and data.x.shape == (500, 24)
    expected = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    assert torch.allclose(data.dictionary, expected, atol=1e-6)
    with pytest.raises(DarkMatterError, match="exceed"):
        generate(replace(SMALL, dictionary=str(tmp_path / "sae"), l0=97.0))
    with pytest.raises(DarkMatterError):
        generate(replace(SMALL, dictionary=str(tmp_path / "missing")))


@pytest.mark.parametrize("change", [
    {"ablations": (1.0,)}, {"ablations": (-0.1,)}, {"frequency": "pareto"},
    {"magnitude": "gamma"}, {"l0": 129.0}, {"noise_levels": (-1.0,)},
])
def test_bad_inputs_raise(change):
    with pytest.raises(DarkMatterError):
        generate(replace(SMALL, **change))


def test_config_is_checked_when_built_and_reads_from_a_dict():
    with pytest.raises(ConfigValueError, match=r"synthetic\.ablations must be shares in \[0, 1\)"):
        SyntheticConfig(ablations=(0.1, 1.0))
    with pytest.raises(ConfigValueError, match=r"line_configs must be a list of lists of 2"):
        SyntheticConfig(line_configs=((0.5,),))
    cfg = from_dict(SyntheticConfig, {"line_configs": [[0.1, 0.2]], "ablations": [0.0, 0.5]})
    assert cfg.line_configs == ((0.1, 0.2),) and cfg.ablations == (0.0, 0.5)
    assert to_dict(cfg)["line_configs"] == [[0.1, 0.2]]


def test_bad_evaluate_arguments_raise(small_data):
    with pytest.raises(DarkMatterError, match="ablation"):
        evaluate(small_data, 1.0, 0.0, 0.0)
    with pytest.raises(DarkMatterError, match="fit"):
        evaluate(small_data, 0.0, 0.0, 0.0, fit="cross_validated")


@pytest.mark.parametrize("magnitude", ["lognormal", "constant"])
def test_magnitudes_have_mean_one(magnitude):
    data = generate(replace(SMALL, magnitude=magnitude, frequency="uniform"))
    active = data.values[data.values > 0]
    assert float(active.mean()) == pytest.approx(1.0, abs=0.03)


def test_trained_sae_check_recovers_features(tmp_path):
    cfg = SyntheticConfig(d=32, n_features=128, n_tokens=8000, l0=4.0, seed=0)
    rows = trained_sae_check(
        cfg, act_noise_levels=(0.0, 1.0), train_tokens=120_000, out_dir=tmp_path
    )
    clean, noisy = rows
    assert clean["features_recovered"] > 0.5  # the SAE learns most true directions without noise
    assert noisy["true_activation_noise_share"] == pytest.approx(0.5, abs=0.02)
    assert noisy["est_linear"] > clean["est_linear"]  # activation noise shows up as linear error
    for r in rows:
        assert r["est_linear"] + r["est_nonlinear"] == pytest.approx(r["fvu_recon"], abs=1e-12)
    assert (tmp_path / "act_noise_0" / "cfg.json").is_file()


def test_run_synthetic_writes_the_report(tmp_path):
    res = run_synthetic(SMALL, tmp_path, train_check=False, progress=False)
    saved = json.loads((tmp_path / "synthetic.json").read_text())
    assert saved["table1"] == json.loads(json.dumps(res["table1"]))
    html = (tmp_path / "synthetic.html").read_text()
    assert html.count("<h3>Table 1") == 2 and "figures/synthetic_lines.png" in html
    assert [c["key"] for c in saved["paper"]["claims"]] == ["synthetic_diagonal",
                                                            "synthetic_off_diagonal"]
    assert "Against the paper" in html and "Table 1 diagonal" in html
    for name in ("synthetic_lines", "synthetic_heatmaps_in_sample", "synthetic_heatmaps_held_out",
                 "synthetic_fit_modes"):
        png = tmp_path / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC


def test_cli_synthetic_writes_its_report(tmp_path):
    from typer.testing import CliRunner

    from sae_darkmatter.cli import app

    res = CliRunner().invoke(
        app,
        [
            "synthetic",
            "-o",
            str(tmp_path),
            "--d",
            "32",
            "--n-features",
            "128",
            "--n-tokens",
            "2000",
            "--l0",
            "4",
            "--no-train-check",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Table 1" in res.output and (tmp_path / "synthetic.json").exists()
    res = CliRunner().invoke(app, ["synthetic", "-o", str(tmp_path), "--frequency", "powerlaw"])
    assert res.exit_code == 2 and "powerlaw" in res.output
