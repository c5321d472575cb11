"""Encoder-error analysis on a run folder: pursuit vs the SAE encoder on the same tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers import direction_sae, sparse_code_store
from sae_darkmatter.analyses.encoder_error import encoder_error_analysis, subsample
from sae_darkmatter.config import (
    DecomposeConfig,
    PursuitConfig,
    SplitConfig,
    TokenFilter,
)
from sae_darkmatter.errors import ConfigError, DarkMatterError
from sae_darkmatter.pipeline import decompose_saes
from sae_darkmatter.saes import save_sae
from sae_darkmatter.saes.pursuit import PursuitSAE
from sae_darkmatter.splits import make_splits
from sae_darkmatter.store import ActivationStore

SPLIT = SplitConfig(
    filter=TokenFilter(skip_positions=1, max_norm_ratio=None), sae_train_fraction=0.0
)
DEC = DecomposeConfig(device="cpu")
HOOK = "resid_post.1"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A store of sparse codes on 48 directions and two crude TopK SAEs on those directions."""
    out = tmp_path_factory.mktemp("run")
    st, dirs = sparse_code_store(out / "store", d=16, n_ctx=160, per_append=40, mean=5.0,
                                 meta={"model_name": "synthetic"})
    folders = []
    for width in (32, 64):
        sae = direction_sae(dirs, width, 4, seed=width, mean=5.0)
        folders.append(out / "saes" / f"topk-w{width}-k4")
        save_sae(sae, folders[-1], metadata={"hook_name": HOOK})
    decompose_saes(st, make_splits(st, SPLIT), folders, DEC, out / "decompose", progress=False)
    return out


def test_pursuit_and_sae_are_scored_on_the_same_tokens(run_dir):
    cfg = PursuitConfig(max_tokens=1200)
    res = encoder_error_analysis(run_dir, cfg, split=SPLIT, decompose_cfg=DEC, progress=False)
    assert [e["width"] for e in res["per_sae"]] == [32, 64]
    assert res["n_probe_train"] == res["n_probe_test"] == 600
    assert (run_dir / res["figures"]["encoder_error"]).read_bytes()[:4] == b"\x89PNG"

    # independent check of the pursuit FVU on the same subsample with plain numpy
    st = ActivationStore.open(run_dir / "store")
    sub = subsample(make_splits(st, SPLIT), cfg.max_tokens, seed=0)
    x = st.gather(HOOK, sub.probe_test)
    for entry in res["per_sae"]:
        from sae_darkmatter.saes import load_sae

        sae = load_sae(run_dir / "saes" / entry["name"])
        with torch.no_grad():
            e_gp = (x - PursuitSAE(sae)(x)).double().numpy()
            e_sae = (x - sae(x)).double().numpy()
        xc = x.double().numpy() - x.double().numpy().mean(0)
        assert entry["pursuit_fvu"] == pytest.approx((e_gp**2).sum() / (xc**2).sum(), rel=1e-4)
        assert entry["sae_fvu"] == pytest.approx((e_sae**2).sum() / (xc**2).sum(), rel=1e-4)
        assert entry["pursuit_l0"] <= entry["sae_l0"] + 1e-9  # "match": never more latents
        assert entry["fvu_drop"] > 0  # these encoders are crude: pursuit fits better
        assert entry["fvu_nonlinear_drop"] == pytest.approx(
            entry["sae_fvu_nonlinear"] - entry["pursuit_fvu_nonlinear"])
    assert res["fvu_nonlinear_drop_mean"] == pytest.approx(
        np.mean([e["fvu_nonlinear_drop"] for e in res["per_sae"]]))


def test_bad_settings_are_refused(run_dir):
    cfg = PursuitConfig(max_tokens=400, method="mp")
    with pytest.raises(DarkMatterError, match="other test tokens"):
        encoder_error_analysis(run_dir, cfg, split=dataclasses.replace(SPLIT, seed=3),
                               decompose_cfg=DEC, progress=False)
    with pytest.raises(ConfigError, match="lasso"):
        encoder_error_analysis(run_dir, PursuitConfig(method="lasso", max_tokens=400),
                               split=SPLIT, decompose_cfg=DEC, progress=False)
    with pytest.raises(DarkMatterError, match="max_tokens"):
        encoder_error_analysis(run_dir, PursuitConfig(max_tokens=2), split=SPLIT,
                               decompose_cfg=DEC, progress=False)
