"""End to end on a tiny random Llama: the CLI stages, caching, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import PNG_MAGIC, tiny_run_config
from sae_darkmatter import (
    ActivationStore,
    CorpusConfig,
    HarvestConfig,
    RunConfig,
    run,
)
from sae_darkmatter.analyses.claims import VERDICTS
from sae_darkmatter.analyses.paper import CLAIMS
from sae_darkmatter.analyses.registry import get
from sae_darkmatter.analyses.scaling import fit_power_law
from sae_darkmatter.cli import app
from sae_darkmatter.config import DownstreamConfig, ErrorSAEConfig
from sae_darkmatter.saes.formats import open_sae

runner = CliRunner()


def test_run_writes_report_metrics_and_figures(tiny_run):
    out, metrics = tiny_run
    import re

    page = (out / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    # 3 overview + 2 scaling + 2 per-token + 3 norm-prediction + encoder error + cross-layer
    # + error SAEs + 2 downstream + transcoders + 2 transcoder downstream
    assert len(images) == 18
    for src in images:
        assert (out / src).read_bytes()[:8] == PNG_MAGIC, src
    assert "Contexts with the largest nonlinear error" in page
    # each trained SAE says how far it was from its plateau (12 steps: a curve point per step)
    assert page.count("% over the last doubling") == len(metrics["saes"])
    analyses = metrics["analyses"]
    assert set(analyses) == {"paper", "encoder_error", "scaling", "per_token", "norms",
                             "cross_layer", "error_saes", "downstream", "transcoders",
                             "transcoder_downstream"}
    assert not any("skipped" in a for a in analyses.values())
    # every claim is checked on the real run, each with its estimates and a verdict
    claims = analyses["paper"]["claims"]
    assert [c["key"] for c in claims] == [c.key for c in CLAIMS]
    assert all(c["verdict"] in VERDICTS and c["items"] for c in claims), claims
    assert "Against the paper" in page and page.index("Against the paper") < page.index(
        get("scaling").title)
    # the encoder-error band (pursuit on the scaling SAEs) reaches the scaling figure
    enc = analyses["encoder_error"]
    assert [e["width"] for e in enc["per_sae"]] == [64, 128, 256]
    assert analyses["scaling"]["encoder_band"] == enc["fvu_nonlinear_drop_mean"]
    # cross-layer: the target's neighbours were harvested, each got one SAE; the transcoders'
    # input hook came last and got none
    assert list(ActivationStore.open(out / "store").hooks) == [
        "resid_post.2", "resid_post.1", "attn_out.2", "mlp_out.2", "mlp_in.2"]
    for hook in ("resid_post.1", "attn_out.2", "mlp_out.2"):
        assert (out / "saes" / hook / "topk-w256-k8" / "sae_weights.safetensors").is_file()
    assert {p.name for p in (out / "saes").iterdir()} == {
        "topk-w64-k8", "topk-w128-k8", "topk-w256-k8", "resid_post.1", "attn_out.2", "mlp_out.2"}
    _check_transcoders(out, analyses["transcoders"])
    cross = analyses["cross_layer"]
    assert cross["target"] == "resid_post.2" and cross["best"]["predictor"] in cross["predictors"]
    # downstream: the splice's clean CE equals the plain forward's (the default harvest stores no
    # loss); every selected SAE is in the table
    down = analyses["downstream"]
    assert down["check"]["reference"] == "recomputed"
    assert (
        down["check"]["clean_vs_reference_max_abs"] < 1e-3
        and down["check"]["identity_max_kl"] < 1e-6
    )
    assert {t["sae"] for t in down["table"]} == {"topk-w64-k8", "topk-w128-k8", "topk-w256-k8"}
    assert {t["fvu_error"] >= 0 for t in analyses["error_saes"]["table"]} == {True}
    fit = analyses["scaling"]["fit"]
    assert fit["c_ci"][0] <= fit["c"] <= fit["c_ci"][1]
    assert len(analyses["per_token"]["predictability"]["r2"]) == 3
    assert "x (linear)" in analyses["norms"]["baselines"]["baselines"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert [s["d_sae"] for s in on_disk["saes"]] == [64, 128, 256]
    for s in on_disk["saes"]:
        # held-out, the probe could in principle add error; on 4k test tokens with d=64 it helps
        assert 0 < s["fvu_nonlinear"] < s["fvu"]
        assert 0 < s["linear_share"] < 1
        assert s["l0"] <= 8
    data = on_disk["data"]
    assert data["excluded_positions"] == 96  # skip_positions=1, one per context
    assert (
        data["probe_train_tokens"] + data["probe_test_tokens"] + data["sae_train_tokens"]
        == data["tokens_kept"]
    )


def _check_transcoders(out, result):
    """The run's transcoder sweep: 3 widths x (plain, skip), decomposed on the SAEs' tokens;
    the analysis's values are the decompositions' own, and it compares the SAEs of the same k."""
    kinds = {"transcoder": "transcoder", "skip transcoder": "skip-transcoder"}
    names = {f"{kinds[kind]}-batchtopk-w{w}-k8": (kind, w) for kind in kinds
             for w in (64, 128, 256)}
    assert {p.name for p in (out / "transcoders").iterdir()} == set(names)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == set(names) | {"topk-w64-k8", "topk-w128-k8", "topk-w256-k8"}
    assert result["hooks"] == {"in": "mlp_in.2", "out": "mlp_out.2"}
    sae_tokens = json.loads((out / "decompose" / "topk-w64-k8.json").read_text())["data"]
    for name, (kind, width) in names.items():
        record = json.loads((out / "decompose" / "transcoders" / f"{name}.json").read_text())
        assert record["transcoder"] == {"hook_in": "mlp_in.2", "hook_out": "mlp_out.2",
                                        "skip": kind == "skip transcoder"}
        assert record["data"] == sae_tokens  # the same held-out tokens as the SAEs
        row, m = rows[name], record["metrics"]
        assert (row["kind"], row["width"], row["k"]) == (kind, width, 8)
        for metric in ("fvu", "fvu_linear", "fvu_nonlinear"):
            assert row[metric] == pytest.approx(m[metric], rel=1e-6, abs=1e-9)
            assert row[f"{metric}_ci"][0] <= row[metric] <= row[f"{metric}_ci"][1]
        assert ("absorbed_share" in row) is (kind == "skip transcoder")
    assert [(c["kind"], c["widths"]) for c in result["width_changes"]] == [
        (kind, [64, 256]) for kind in ("SAE", "transcoder", "skip transcoder")]
    for change in result["width_changes"]:  # the scaling analysis's law, fit per kind
        group = sorted((r for r in rows.values() if r["kind"] == change["kind"]),
                       key=lambda r: r["width"])
        law = change["power_law"]
        want = fit_power_law([r["width"] for r in group], [r["fvu"] for r in group])
        assert [law["c"], law["a"], law["m"]] == pytest.approx(list(want), rel=1e-6, abs=1e-9)
        assert all(np.isfinite(law[f"{p}_ci"]).all() for p in ("c", "a", "m"))
    effects = result["skip_effects"]
    assert [e["width"] for e in effects] == [64, 128, 256]
    for e in effects:  # the share removed is 1 - linear(skip) / linear(plain), row by row
        plain, skip = rows[e["plain"]], rows[e["skip"]]
        assert e["linear_removed"] == pytest.approx(
            1 - skip["fvu_linear"] / plain["fvu_linear"], rel=1e-9)


def test_saved_sae_loads_in_sae_lens_with_same_reconstructions(tiny_run):
    import torch
    from sae_lens import SAE

    from sae_darkmatter import load_sae

    out, _ = tiny_run
    folder = out / "saes" / "topk-w128-k8"
    theirs = SAE.load_from_disk(str(folder), device="cpu")
    ours = load_sae(folder)
    store = ActivationStore.open(out / "store")
    x = store.gather("resid_post.2", np.arange(1, 200))
    with torch.no_grad():
        np.testing.assert_allclose(theirs(x).numpy(), ours(x).numpy(), rtol=1e-5, atol=1e-5)


def test_rerun_reuses_every_stage(tiny_run, tiny_model_dir):
    out, first = tiny_run
    weights = out / "saes" / "topk-w64-k8" / "sae_weights.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = run(tiny_run_config(tiny_model_dir), out, progress=False)
    assert weights.stat().st_mtime_ns == stamp
    assert [s["fvu"] for s in again["saes"]] == [s["fvu"] for s in first["saes"]]
    assert again["timings_s"]["harvest"] < 5 and again["timings_s"]["train"] < 5
    assert again["timings_s"]["transcoders"] < 5
    # every analysis is reused, not recomputed, and says so
    assert all(a.get("reused") for a in again["analyses"].values())
    assert {k: {kk: vv for kk, vv in a.items() if kk != "reused"}
            for k, a in again["analyses"].items()} == first["analyses"]
    assert again["timings_s"]["analyses"] < 5


def test_stage_commands(tiny_run, tmp_path):
    out, metrics = tiny_run
    sae = out / "saes" / "topk-w64-k8"
    res = runner.invoke(app, ["decompose", "--store", str(out / "store"), "--sae", str(sae),
                              "-o", str(tmp_path / "dec")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "dec" / "topk-w64-k8.json").read_text())
    assert saved["metrics"]["fvu"] == pytest.approx(metrics["saes"][0]["fvu"])
    res = runner.invoke(app, ["report", str(tmp_path / "dec")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report.html").exists() and (
        tmp_path / "figures" / "fvu_vs_width.png"
    ).exists()
    res = runner.invoke(app, ["analyze", str(out), "--only", "scaling"])
    assert res.exit_code == 0, res.output
    assert set(json.loads((out / "analyses.json").read_text())) == {"paper", "encoder_error",
        "scaling", "per_token", "norms", "cross_layer", "error_saes", "downstream", "transcoders",
        "transcoder_downstream"}
    res = runner.invoke(app, ["analyze", str(out), "--only", "scalin"])
    assert res.exit_code == 2 and "scaling" in res.output
    res = runner.invoke(app, ["train", "--store", str(out / "store"), "--architecture", "batchtopk",
                              "--widths", "64,96", "--k", "8", "--train-tokens", "2048",
                              "--batch-size", "512", "--until", "plateau", "-o",
                              str(tmp_path / "saes")])
    assert res.exit_code == 0, res.output
    assert "(cap)" in res.output  # 4 steps: too few held-out scores to call a plateau
    for width in (64, 96):
        info = json.loads((tmp_path / "saes" / f"batchtopk-w{width}-k8" / "training.json"
                           ).read_text())
        assert info["schedule"]["stopped"] == "cap" and len(info["schedule"]["heldout"]) == 3
        cfg = json.loads((tmp_path / "saes" / f"batchtopk-w{width}-k8" / "cfg.json").read_text())
        assert (cfg["architecture"], cfg["d_sae"]) == ("jumprelu", width)  # saved for inference
        prov = open_sae(tmp_path / "saes" / f"batchtopk-w{width}-k8").provenance
        assert (prov["architecture"], prov["loaded_as"], prov["k"]) == ("batchtopk", "jumprelu", 8)
    res = runner.invoke(app, ["train", "--store", str(out / "store"), "--architecture", "gatedd",
                              "-o", str(tmp_path / "saes")])
    assert res.exit_code == 2 and "batchtopk" in res.output
    for cmd in ("run", "harvest", "train", "decompose", "analyze", "report", "info", "synthetic"):
        assert runner.invoke(app, [cmd, "--help"]).exit_code == 0


def test_run_with_our_sae_folder_takes_model_and_hook_from_its_metadata(tiny_run, tmp_path):
    """`darkmatter run --sae FOLDER` with no --model/--hook: both come from the SAE's cfg.json.
    (The analyses that train or splice are off: the registry test below runs them on a
    pretrained SAE.)"""
    out, metrics = tiny_run
    config = tmp_path / "light.toml"
    config.write_text("[pursuit]\nenabled = false\n[error_saes]\nenabled = false\n"
                      "[downstream]\nenabled = false\n")
    res = runner.invoke(app, ["run", "--sae", str(out / "saes" / "topk-w64-k8"), "--config",
                              str(config), "-o", str(tmp_path / "run"), "--n-contexts", "48",
                              "--context-length", "32"])
    assert res.exit_code == 0, res.output
    tmp_path = tmp_path / "run"
    store = ActivationStore.open(tmp_path / "store")
    assert list(store.hooks) == ["resid_post.2"]
    assert store.meta["model_name"] == metrics["model"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    (entry,) = saved["saes"]
    assert entry["name"] == "topk-w64-k8" and entry["d_sae"] == 64
    prov = entry["provenance"]
    assert prov["library"] == "sae_darkmatter" and prov["architecture"] == "topk"
    assert prov["source"] == str((out / "saes" / "topk-w64-k8").resolve())
    assert saved["data"]["sae_train_tokens"] == 0  # no training split for pretrained SAEs
    assert not (tmp_path / "saes").exists()
    assert "sae_darkmatter" in (tmp_path / "report.html").read_text()


def test_run_with_registry_sae_from_local_hub_cache(tiny_model_dir, hub_cache, tmp_path):
    """`saelens:<repo>/<id>` through sae_lens's own loader, offline, from a real hub-cache
    layout."""
    import torch
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    from helpers import cached_hub_repo

    cls, cfg_cls = get_sae_class("jumprelu")
    meta = SAEMetadata(model_name=str(tiny_model_dir), hook_name="blocks.3.hook_resid_pre")
    theirs = cls(cfg_cls(d_in=64, d_sae=96, metadata=meta))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    theirs.save_model(cached_hub_repo(hub_cache, "acme/tiny-llama-saes") / "l3" / "res")

    cfg = RunConfig(
        harvest=HarvestConfig(corpus=CorpusConfig(n_contexts=48, context_length=32),
                              batch_size=16, contexts_per_shard=16),
        saes=("saelens:acme/tiny-llama-saes/l3/res",),
        error_saes=ErrorSAEConfig(enabled=False),  # reopens SAEs as pursuit and downstream do
        downstream=DownstreamConfig(max_contexts=8),  # no rounds after the first 8 contexts
    )
    metrics = run(cfg, tmp_path, progress=False)
    store = ActivationStore.open(tmp_path / "store")
    assert list(store.hooks) == ["resid_post.2"]  # blocks.3.hook_resid_pre == resid_post.2
    assert store.meta["model_name"] == str(Path(tiny_model_dir).resolve())
    (entry,) = metrics["saes"]
    assert entry["name"] == "acme__tiny-llama-saes__l3__res"
    # the analyses reopen the SAE from its registry spec (one SAE: no scaling fit, no pursuit band)
    analyses = metrics["analyses"]
    assert not any("skipped" in analyses[a] for a in ("norms", "downstream")), analyses
    assert (entry["provenance"]["library"], entry["provenance"]["architecture"]) == (
        "sae_lens",
        "jumprelu",
    )
    assert 0 < entry["fvu"] and 0 <= entry["linear_share"] <= 1
    # the decomposition used sae_lens's own reconstruction of the stored activations
    x = store.gather("resid_post.2", np.arange(1, 40))
    from sae_darkmatter.saes.formats import open_sae

    with torch.no_grad():
        ours = open_sae("saelens:acme/tiny-llama-saes/l3/res").sae
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_saes_naming_different_hooks_are_refused(tiny_run, tmp_path):
    import torch

    from sae_darkmatter import TopKSAE, save_sae

    out, _ = tiny_run
    save_sae(TopKSAE(64, 64, 4, generator=torch.Generator().manual_seed(0)), tmp_path / "other",
             metadata={"hook_name": "resid_post.1"})
    res = runner.invoke(app, ["run", "--sae", str(out / "saes" / "topk-w64-k8"), "--sae",
                              str(tmp_path / "other"), "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "resid_post.1" in res.output and "resid_post.2" in res.output


def test_unknown_hook_lists_valid_ones(tiny_model_dir, tmp_path):
    res = runner.invoke(app, ["harvest", "--model", str(tiny_model_dir), "--hook", "resid_pre.1",
                              "--n-contexts", "4", "-o", str(tmp_path / "s")])
    assert res.exit_code == 2
    assert "resid_post" in res.output and "mlp_out" in res.output and "attn_out" in res.output
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_empty_corpus_names_the_source(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = runner.invoke(app, ["harvest", "--model", str(tiny_model_dir), "--corpus", str(empty),
                              "-o", str(tmp_path / "s")])
    assert res.exit_code == 2 and "empty.txt" in res.output


def test_missing_model_offline_says_how_to_pass_a_path(tmp_path):
    res = runner.invoke(
        app, ["harvest", "--model", "no-such-org/no-such-model", "-o", str(tmp_path / "s")]
    )
    assert res.exit_code == 2
    assert "no-such-org/no-such-model" in res.output and "path" in res.output.lower()


def test_decompose_rejects_sae_of_wrong_width(tiny_run, tmp_path):
    import torch

    from sae_darkmatter import TopKSAE, save_sae

    out, _ = tiny_run
    save_sae(
        TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0)),
        tmp_path / "bad",
        metadata={},
    )
    res = runner.invoke(
        app,
        [
            "decompose",
            "--store",
            str(out / "store"),
            "--sae",
            str(tmp_path / "bad"),
            "-o",
            str(tmp_path / "dec"),
        ],
    )
    assert res.exit_code == 2 and "32" in res.output and "64" in res.output


def test_report_section_shows_a_dash_for_l0_outside_a_sweep(tmp_path):
    from sae_darkmatter.report.sections import analyses_html

    row = {"sae": "topk-w64-k8", "width": 64, "sparsity": 8, "l0": 7.5, "fvu_error": 0.5,
           "fvu_linear": None, "fvu_nonlinear": 0.25, "dead_error": 0, "dead_linear": None,
           "dead_nonlinear": 3}
    page = analyses_html({"error_saes": {"table": [row], "bases": [], "figures": {}}}, tmp_path)
    assert "<td>0.500</td><td>–</td><td>0.250</td><td>0</td><td>–</td><td>3</td>" in page
