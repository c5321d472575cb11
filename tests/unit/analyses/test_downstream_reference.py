"""Downstream's reference for the clean loss: the harvest's stored loss, or (for a store
harvested without it, the default) the model's plain forward pass, checked to agree."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from helpers import make_run
from sae_darkmatter import HarvestConfig, ModelConfig
from sae_darkmatter.analyses.downstream import PER_TOKEN_FILE, downstream_analysis
from sae_darkmatter.config import DownstreamConfig, from_dict
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.harvest import harvest
from sae_darkmatter.models import LoadedModel, load_model
from sae_darkmatter.store import ActivationStore


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))


def with_loss_copy(run: Path, out: Path, lm: LoadedModel) -> Path:
    """A copy of run folder ``run`` whose store is harvested again, the same way but with the
    per-token loss (its SAEs and decompositions fit: the activations are the same)."""
    shutil.copytree(run, out)
    shutil.rmtree(out / "store")
    cfg = from_dict(HarvestConfig, ActivationStore.open(run / "store").meta["config"])
    harvest(dataclasses.replace(cfg, with_loss=True), out / "store", lm=lm, progress=False)
    return out


@pytest.fixture(scope="module")
def loss_pair(tiny_model_dir, tmp_path_factory, lm):
    """One run harvested without the loss and its copy harvested with it, each with its
    downstream result and per-token file (same contexts, same SAEs)."""
    cfg = DownstreamConfig(n_contexts=6, batch_size=4, n_boot=200, select="all",
                           target_half_width=None)
    without = make_run(tiny_model_dir, tmp_path_factory.mktemp("no-loss"), "resid_post.2")
    with_loss = with_loss_copy(without, tmp_path_factory.mktemp("loss") / "run", lm)
    return {
        name: (out, downstream_analysis(out, lm=lm, cfg=cfg, progress=False),
               load_file(out / PER_TOKEN_FILE))
        for name, out in (("recomputed", without), ("stored", with_loss))
    }


def test_recomputed_loss_equals_the_stored_loss(loss_pair):
    (a, ra, pa), (b, rb, pb) = loss_pair["recomputed"], loss_pair["stored"]
    sa, sb = ActivationStore.open(a / "store"), ActivationStore.open(b / "store")
    # the harvest without loss stops after the hook, and its activations are those of the full
    # forward bit for bit; only the loss column differs
    rows = np.arange(sa.n_rows)
    assert torch.equal(sa.gather("resid_post.2", rows), sb.gather("resid_post.2", rows))
    assert np.isnan(sa.column("loss")).all() and np.isfinite(sb.column("loss")).any()
    assert sa.meta["harvest_fingerprint"] != sb.meta["harvest_fingerprint"]
    assert (ra["check"]["reference"], rb["check"]["reference"]) == ("recomputed", "stored")
    assert "activations_vs_stored_max_rel" not in rb["check"]
    assert ra["contexts"] == rb["contexts"]
    valid = np.isfinite(pb["reference_loss"])
    assert np.array_equal(valid, np.isfinite(pa["reference_loss"])) and valid[:, :-1].all()
    # the stored loss came from batches of 16 contexts, the recomputed from batches of 4: float32
    # GEMM rounding, ~1e-7 relative on CE ~11 nats of a random model
    np.testing.assert_allclose(pa["reference_loss"][valid], pb["reference_loss"][valid], rtol=0,
                               atol=2e-5)
    # the splices do not depend on where the reference came from
    for key in pb:
        if key != "reference_loss":
            np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)
    for r in (ra, rb):
        assert r["check"]["clean_vs_reference_max_abs"] < 2e-5 < r["check"]["tolerance"]
        assert r["check"]["identity_vs_clean_max_abs"] == 0.0


def test_another_model_is_refused_with_or_without_stored_loss(loss_pair, lm):
    """A model other than the harvested one: the activation check refuses it before any splice
    when the store has no loss, the stored loss refuses it otherwise."""
    torch.manual_seed(1)  # same architecture and tokenizer, other random weights
    other = dataclasses.replace(lm, model=AutoModelForCausalLM.from_config(lm.model.config).eval(),
                                name="other")
    cfg = DownstreamConfig(n_contexts=2, batch_size=2, n_boot=10, saes=("topk-w64-k8",),
                           target_half_width=None)
    with pytest.raises(DarkMatterError, match=r"activations at resid_post\.2 differ"):
        downstream_analysis(loss_pair["recomputed"][0], lm=other, cfg=cfg, progress=False)
    with pytest.raises(DarkMatterError, match="stored loss"):
        downstream_analysis(loss_pair["stored"][0], lm=other, cfg=cfg, progress=False)


@pytest.mark.slow
def test_smollm2_clean_loss_equals_harvest(tmp_path):
    """The embedded SmolLM2 (float32, as harvested): the clean CE recomputed for a store without
    loss equals the loss a harvest with loss stores, and identity is exact."""
    out = make_run(
        Path("smollm2"),
        tmp_path / "run",
        "resid_post.15",
        n_contexts=24,
        length=64,
        widths=(256,),
        ks=(16,),
    )
    lm = load_model(ModelConfig(name="smollm2", device="cpu"))
    stored = with_loss_copy(out, tmp_path / "with-loss", lm)
    cfg = DownstreamConfig(n_contexts=2, n_boot=100, target_half_width=None)
    result = downstream_analysis(out, lm=lm, cfg=cfg, progress=False)
    check = result["check"]
    assert check["reference"] == "recomputed" and check["clean_vs_reference_max_abs"] < 1e-4
    assert check["identity_vs_clean_max_abs"] == 0.0
    assert check["activations_vs_stored_max_rel"] < 1e-4
    again = downstream_analysis(stored, lm=lm, cfg=cfg, progress=False)
    assert again["check"]["reference"] == "stored"
    assert again["check"]["clean_vs_reference_max_abs"] < 1e-4
    pt = load_file(out / PER_TOKEN_FILE)
    valid = np.isfinite(pt["reference_loss"])
    # the harvest's batches of 16 contexts vs the splice's 8: float32 rounding only
    np.testing.assert_allclose(pt["reference_loss"][valid],
                               load_file(stored / PER_TOKEN_FILE)["reference_loss"][valid],
                               rtol=0, atol=1e-4)
    assert 0.5 < float(np.nanmean(pt["reference_loss"])) < 6  # a trained LM, in nats
    s = result["saes"][0]
    # a trained LM: reconstructions cost loss, ablations cost much more, and x̂ + e = x closes all
    assert 0 < s["ce_increase"]["sae"]["mean"] < result["shared"]["mean"]["ce_increase"]["mean"]
    assert (
        result["shared"]["mean"]["ce_increase"]["mean"]
        < result["shared"]["zero"]["ce_increase"]["mean"]
    )
