"""Slow: the whole pipeline on the embedded SmolLM2-135M and the standard-library corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae_darkmatter import (
    ActivationStore,
    CorpusConfig,
    DownstreamConfig,
    HarvestConfig,
    RunConfig,
    SAETrainConfig,
    SplitConfig,
    TranscoderConfig,
    load_sae,
    make_splits,
    run,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol")
    cfg = RunConfig(
        harvest=HarvestConfig(corpus=CorpusConfig(n_contexts=48, context_length=128)),
        train=SAETrainConfig(
            widths=(256, 512, 1024), ks=(16,), train_tokens=60_000, batch_size=1024
        ),
        downstream=DownstreamConfig(max_contexts=8),  # the first 8 only (CI time)
        transcoders=TranscoderConfig(enabled=True, train=SAETrainConfig(
            architecture="batchtopk", widths=(256, 1024), ks=(16,), train_tokens=60_000,
            batch_size=1024)),
    )
    return out, run(cfg, out, progress=False)


def test_store_holds_real_layer15_activations(smol_run):
    out, _ = smol_run
    store = ActivationStore.open(out / "store")
    # the target first, then its neighbours for cross-layer prediction
    assert store.hooks == {"resid_post.15": 576, "resid_post.14": 576, "attn_out.15": 576,
                           "mlp_out.15": 576, "mlp_in.15": 576}
    assert store.n_rows == 48 * 128
    position = store.column("position")
    norms = np.concatenate([x.norm(dim=1).numpy() for _, x in store.iter_chunks("resid_post.15")])
    median = np.median(norms[position > 0])
    assert 50 < median < 1000  # measurements.md: ~171 at layer 15
    assert norms[position == 0].min() > 20 * median  # the attention sink the filter removes
    assert np.isnan(store.column("loss")).all()  # the default harvest stores no loss
    kept = make_splits(store, SplitConfig()).selection.rows
    assert norms[kept].max() < 10 * median  # no sink left in the statistics


def test_dark_matter_metrics_are_plausible(smol_run):
    out, metrics = smol_run
    saes = metrics["saes"]
    assert [s["d_sae"] for s in saes] == [256, 512, 1024]
    for s in saes:
        assert 0.0 < s["fvu"] < 0.9
        assert 0.0 < s["fvu_nonlinear"] < s["fvu"]
        assert s["r2_error_norm"] > 0.3  # the paper: >90% on Gemma; far from 0 here too
        assert s["l0"] <= 16
    assert saes[-1]["fvu"] < saes[0]["fvu"]  # wider SAEs reconstruct better
    analyses = metrics["analyses"]
    assert not any("skipped" in a for a in analyses.values())
    r2 = analyses["per_token"]["predictability"]["r2"]
    assert r2[0][2] > 0.5  # the narrowest SAE's per-token ‖e‖ predicts the widest's (paper: yes)
    baselines = analyses["norms"]["baselines"]
    norms = baselines["topk-w1024-k16"]
    assert all(np.isfinite(norms[b]) for b in baselines["baselines"])
    lo, hi = norms["intervals"]["x (linear) → ‖e‖"]  # token bootstrap of the ‖e‖ target's fit
    assert np.isfinite([lo, hi]).all() and lo < hi
    # ~600 fitting tokens: the 577-parameter x baseline overfits (negative held-out R²), while
    # the two-parameter ‖x‖ baseline must still generalise
    assert norms["‖x‖"] > 0.05
    assert json.loads((out / "metrics.json").read_text())["model"].endswith(".gguf")


def test_analyses_ii_on_smollm2(smol_run):
    """Pursuit, cross-layer prediction, error SAEs and the downstream splice on the real model."""
    _, metrics = smol_run
    a = metrics["analyses"]
    for entry in a["encoder_error"]["per_sae"]:
        assert entry["pursuit_fvu"] < entry["sae_fvu"]  # pursuit over the same decoder fits better
        assert entry["pursuit_l0"] <= entry["sae_l0"] + 1e-9
    cross = a["cross_layer"]
    assert cross["sources"] == ["resid_post.15", "resid_post.14", "attn_out.15", "mlp_out.15"]
    assert (
        cross["predictors"]["x"]["linear"]["r2_pooled"] > 0.999
    )  # ê is linear in x by construction
    down = a["downstream"]
    # no stored loss: the splice's clean CE equals the plain forward's, whose activations at the
    # hook are the harvest's
    assert down["check"]["reference"] == "recomputed"
    assert down["check"]["clean_vs_reference_max_abs"] < 1e-3
    assert down["check"]["activations_vs_stored_max_rel"] < 1e-4
    assert down["check"]["identity_max_kl"] < 1e-6
    clean, zero = down["shared"]["clean"]["ce"]["mean"], down["shared"]["zero"]["ce"]["mean"]
    assert 0.5 < clean < 6  # a trained LM on English and Python, in nats
    assert zero > clean + 1  # zero-ablating the middle residual stream wrecks the model
    for row in down["table"]:
        assert 0 < row["ce_increase_sae"] < zero - clean
    # the cap is the first round (the stopping rule's rounds: test_downstream_stopping); the
    # target record says whether every SAE met ±0.05 there
    assert [s["contexts"] for s in down["saes"]] == [8] * len(down["saes"])
    assert down["target"]["met"] == all(
        max(s["half_width"].values()) <= 0.05 for s in down["saes"])
    assert {t["sae"] for t in a["error_saes"]["table"]} == {"topk-w1024-k16"}


def test_saved_sae_matches_sae_lens_on_real_activations(smol_run):
    import torch
    from sae_lens import SAE

    out, _ = smol_run
    folder = out / "saes" / "topk-w512-k16"
    store = ActivationStore.open(out / "store")
    x = store.gather("resid_post.15", np.arange(1, 500))
    with torch.no_grad():
        ours = load_sae(folder)(x)
        theirs = SAE.load_from_disk(str(folder), device="cpu")(x)
    # norms ~170: float32 reconstructions agree to ~1e-5 relative
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-3)


def test_prefixes_of_a_smollm2_sae_are_a_width_sweep(smol_run, tmp_path):
    """The run's widest SAE cut to W/16 ... W in frequency order (the run's fixture is shared,
    so this costs one decomposition): the error falls with every doubling, the full width is
    the run's own decomposition of that SAE, and the scaling law fits the prefixes."""
    from sae_darkmatter import DecomposeConfig, decompose_sae_prefixes
    from sae_darkmatter.analyses.scaling import fit_scaling, load_sweep

    out, metrics = smol_run
    store = ActivationStore.open(out / "store")
    results = decompose_sae_prefixes(store, make_splits(store, SplitConfig()),
                                     out / "saes" / "topk-w1024-k16", DecomposeConfig(),
                                     tmp_path / "prefixes", order="frequency", progress=False)
    got = [r["metrics"] for r in results]
    assert [m["d_sae"] for m in got] == [64, 128, 256, 512, 1024]
    assert all(a["fvu"] > b["fvu"] and a["l0"] < b["l0"] for a, b in zip(got, got[1:]))
    whole = next(s for s in metrics["saes"] if s["name"] == "topk-w1024-k16")
    assert got[-1]["fvu"] == pytest.approx(whole["fvu"], rel=1e-9)  # the same x̂, bit for bit
    for key in ("fvu_nonlinear", "linear_share", "r2_error_norm"):  # the joint solve's rounding
        assert got[-1][key] == pytest.approx(whole[key], rel=1e-5), key
    points = load_sweep(tmp_path / "prefixes", prefixes_of="topk-w1024-k16")
    for of in ("fvu", "fvu_nonlinear"):
        fit = fit_scaling(points, whole["l0"], n_boot=20, of=of)
        assert fit.widths == (64, 128, 256, 512, 1024)
        assert np.isfinite([fit.c, fit.a, fit.m]).all() and fit.c >= 0
    assert fit_scaling(points, whole["l0"], n_boot=2).m > 0  # FVU falls with the prefix width


def test_transcoders_of_the_layer15_mlp(smol_run):
    """Transcoders and skip transcoders of SmolLM2's layer-15 MLP, trained and decomposed in the
    run: sae_lens reproduces their outputs on the real MLP inputs, their errors are split on
    the SAEs' tokens, and the skip term takes linear dark matter out."""
    import torch
    from sae_lens import SAE

    from sae_darkmatter import open_transcoder

    out, metrics = smol_run
    result = metrics["analyses"]["transcoders"]
    assert result["hooks"] == {"in": "mlp_in.15", "out": "mlp_out.15"}
    store = ActivationStore.open(out / "store")
    x, y = (store.gather(h, np.arange(1, 400)) for h in ("mlp_in.15", "mlp_out.15"))
    rows = {r["name"]: r for r in result["rows"]}
    for kind in ("transcoder", "skip-transcoder"):
        for width in (256, 1024):
            folder = out / "transcoders" / f"{kind}-batchtopk-w{width}-k16"
            with torch.no_grad():
                ours = open_transcoder(folder).transcoder(x)
                theirs = SAE.load_from_disk(str(folder), device="cpu")(x)
            torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-3)
            row = rows[folder.name]
            # ~2,400 probe-train tokens for a 577 x 576 probe: it overfits, so FVU nonlinear
            # may exceed FVU here (study 4 has the real numbers)
            assert 0 < row["fvu"] < 1 and 0 < row["fvu_nonlinear"]
            assert float((y - ours).pow(2).sum() / (y - y.mean(0)).pow(2).sum()) < 1
            if kind == "skip-transcoder":  # leaving its skip term out adds error back
                assert row["fvu_absorbed"] > 0, row
    assert [c["kind"] for c in result["width_changes"]] == ["SAE", "transcoder",
                                                            "skip transcoder"]


def test_matryoshka_sae_trained_on_smollm2(smol_run, tmp_path):
    """``darkmatter train --architecture matryoshka_batchtopk`` on the run's store, then its
    nested prefixes decomposed from its own metadata (``--prefixes auto``): each prefix
    reconstructs layer 15 better than as many of the run's TopK SAE's most frequent latents,
    and sae_lens loads the folder."""
    import torch
    from sae_lens import SAE
    from typer.testing import CliRunner

    from sae_darkmatter.cli import app

    out, _ = smol_run
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--store", str(out / "store"), "--architecture",
                              "matryoshka_batchtopk", "--widths", "1024", "--k", "16",
                              "--train-tokens", "60000", "--batch-size", "1024", "-o",
                              str(tmp_path / "saes")])
    assert res.exit_code == 0, res.output
    folder = tmp_path / "saes" / "matryoshka_batchtopk-w1024-k16"
    fvu = {}
    for sae, order in ((folder, "stored"), (out / "saes" / "topk-w1024-k16", "frequency")):
        res = runner.invoke(app, ["decompose", "--store", str(out / "store"), "--sae", str(sae),
                                  "--prefixes", "auto", "--latent-order", order, "-o",
                                  str(tmp_path / order)])
        assert res.exit_code == 0, res.output
        results = [json.loads(p.read_text()) for p in (tmp_path / order).glob("*.json")]
        fvu[order] = {r["metrics"]["d_sae"]: (r["metrics"]["fvu"], r["metrics"]["fvu_nonlinear"])
                      for r in results}
    assert sorted(fvu["stored"]) == sorted(fvu["frequency"]) == [64, 128, 256, 512, 1024]
    # measured: FVU 0.56 / 0.46 / 0.40 / 0.36 against 0.78 / 0.68 / 0.57 / 0.43 at 64..512
    # latents (the prefixes' L0 is not matched: 7.6 against 3.3 at 64); 0.334 / 0.332 whole
    for m in (64, 128, 256, 512):
        assert fvu["stored"][m][0] < fvu["frequency"][m][0] - 0.04, (m, fvu)
    assert fvu["stored"][1024][0] == pytest.approx(fvu["frequency"][1024][0], abs=0.03)
    store = ActivationStore.open(out / "store")
    x = store.gather("resid_post.15", np.arange(1, 400))
    with torch.no_grad():
        torch.testing.assert_close(SAE.load_from_disk(str(folder), device="cpu")(x),
                                   load_sae(folder)(x), rtol=1e-4, atol=1e-3)


@pytest.mark.soak
def test_synthetic_model_on_a_smollm2_sae_dictionary(smol_run, tmp_path):
    """The ground-truth grid with the decoder of an SAE trained on SmolLM2 as the dictionary."""
    from sae_darkmatter import SyntheticConfig, run_synthetic

    out, _ = smol_run
    cfg = SyntheticConfig(
        dictionary=str(out / "saes" / "topk-w1024-k16"), n_tokens=12_000, l0=16,
        ablations=(0.0, 0.5), noise_levels=(0.0, 0.5, 1.0), line_configs=((0.5, 0.3),),
    )
    res = run_synthetic(cfg, tmp_path, train_check=False, progress=False)
    assert res["config"]["d"] == 576 and res["config"]["n_features"] == 1024
    t = res["table1"]["held_out"]
    assert t["act_noise"]["est_linear"] > 0.8 and t["rec_noise"]["est_nonlinear"] > 0.8
    assert (tmp_path / "synthetic.html").exists()


def test_damaged_smollm2_run_is_repaired_bit_identically(smol_run, tmp_path):
    """On a copy of the real run: a flipped byte in a shard and in an SAE are found and named;
    repair re-harvests the shard with SmolLM2 to the same bytes and drops the damaged SAE."""
    import shutil

    from sae_darkmatter import integrity

    out, _ = smol_run
    run_dir = tmp_path / "run"
    shutil.copytree(out / "store", run_dir / "store")
    shutil.copytree(out / "saes", run_dir / "saes")
    shard = sorted((run_dir / "store").glob("shard_*.safetensors"))[0]
    sae = sorted((run_dir / "saes").glob("topk-*"))[0]
    original = shard.read_bytes()
    for path in (shard, sae / "sae_weights.safetensors"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    assert {(d.kind, d.path) for d in integrity.check(run_dir)} == {("shard", shard), ("sae", sae)}
    repaired, left = integrity.repair(run_dir, progress=False)
    assert len(repaired) == 2 and left == []
    assert shard.read_bytes() == original and not sae.exists()
    assert integrity.check(run_dir) == []
