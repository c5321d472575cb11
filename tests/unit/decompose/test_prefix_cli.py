"""``darkmatter decompose --prefixes`` end to end on a small synthetic store: a Matryoshka SAE
written by sae_lens itself (its prefix widths read from its cfg.json; each prefix's error
checked against sae_lens's own encode and decode), the scaling law fit on its prefixes, an
ordinary TopK SAE in frequency order (warnings, caching by order), and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import sparse_code_store
from sae_darkmatter.analyses.scaling import fit_power_law, fit_scaling, load_sweep
from sae_darkmatter.cli import app
from sae_darkmatter.decompose import load_decompositions
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.saes import TopKSAE, save_sae

D, WIDTH, GROUPS = 16, 64, [8, 24, 64]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st, _ = sparse_code_store(tmp_path_factory.mktemp("pc") / "store", d=D, n_ctx=160,
                              per_append=40, mean=20.0, meta={"model_name": "tiny"})
    return st


def _x(st) -> torch.Tensor:
    return torch.cat([x for _, x in st.iter_chunks("resid_post.1")])


@pytest.fixture(scope="module")
def matryoshka(store, tmp_path_factory, sae_lens):
    """A sae_lens Matryoshka BatchTopK SAE (groups ``GROUPS``) saved for inference, i.e. as a
    JumpReLU SAE. Its decoder is fit group by group, each group to what the groups before it
    leave, so its prefixes are nested as a trained one's are."""
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D, d_sae=WIDTH, k=6, matryoshka_widths=list(GROUPS),
        rescale_acts_by_decoder_norm=False,
        metadata=SAEMetadata(model_name="tiny", hook_name="blocks.1.hook_resid_post"))
    theirs = MatryoshkaBatchTopKTrainingSAE(cfg)
    x = _x(store)
    gen = torch.Generator().manual_seed(0)
    w_enc = torch.randn(D, WIDTH, generator=gen)
    w_enc /= w_enc.norm(dim=0)
    with torch.no_grad():
        theirs.W_enc.copy_(w_enc)
        theirs.b_enc.copy_(torch.randn(WIDTH, generator=gen) * 0.3)
        theirs.b_dec.copy_(x.mean(0))
        theirs.topk_threshold.fill_(0.5)
        pre = (x - x.mean(0)) @ w_enc + theirs.b_enc
        z = (pre * (pre > 0.5)).double()
        resid = (x - x.mean(0)).double()
        for lo, hi in zip([0, *GROUPS[:-1]], GROUPS, strict=True):
            w = torch.linalg.lstsq(z[:, lo:hi], resid).solution
            theirs.W_dec[lo:hi] = w.float()
            resid = resid - z[:, lo:hi] @ w
    folder = tmp_path_factory.mktemp("saes") / "mat"
    theirs.save_inference_model(folder)
    return folder


def _invoke(*args):
    return CliRunner().invoke(app, ["decompose", *map(str, args)])


def test_matryoshka_prefixes_from_cfg_json_and_their_scaling_law(store, matryoshka, tmp_path,
                                                                 sae_lens, caplog):
    out = tmp_path / "prefixes"
    res = _invoke("--store", store.path, "-o", out, "--sae", matryoshka, "--prefixes", "auto")
    assert res.exit_code == 0, res.output
    assert "records no nested" not in caplog.text  # its stored order is its groups' nesting
    decs = {d.name: d for d in load_decompositions(out)}
    assert set(decs) == {f"mat__prefix{m}" for m in GROUPS}  # the widths of its cfg.json
    theirs = sae_lens.SAE.load_from_disk(matryoshka)
    for m in GROUPS:
        d = decs[f"mat__prefix{m}"]
        assert d.info["prefix"] == {"of": "mat", "width": m, "d_sae": WIDTH, "order": "stored"}
        assert d.info["sae"]["matryoshka_widths"] == GROUPS
        assert (d.width, d.info["metrics"]["d_sae"]) == (m, m)
        # the error behind the saved per-token values: sae_lens's own latents, the first m kept
        x = store.gather("resid_post.1", d.tokens["rows"])
        with torch.no_grad():
            acts = theirs.encode(x)
            acts[:, m:] = 0
            err_sq = (x - theirs.decode(acts)).double().square().sum(1)
        torch.testing.assert_close(torch.from_numpy(d.tokens["err_sq"]).double(), err_sq,
                                   rtol=1e-4, atol=1e-4)
        assert d.info["metrics"]["l0"] == pytest.approx(
            float((acts != 0).sum(1).double().mean()), rel=1e-6)

    points = load_sweep(out, prefixes_of="mat")
    assert [p.width for p in points] == GROUPS
    fvus = [p.fvu for p in points]
    assert fvus == sorted(fvus, reverse=True)  # nested groups: each one lowers the error
    fit = fit_scaling(points, points[-1].l0, of="fvu_nonlinear", n_boot=40, seed=0)
    assert (fit.of, fit.widths) == ("fvu_nonlinear", tuple(GROUPS))
    nonlinear = [decs[f"mat__prefix{m}"].info["metrics"]["fvu_nonlinear"] for m in GROUPS]
    np.testing.assert_allclose(fit.fvu_nonlinear, nonlinear, rtol=1e-5)
    assert (fit.c, fit.a, fit.m) == fit_power_law(GROUPS, fit.fvu_nonlinear)
    assert fit.fvu == pytest.approx(fvus, rel=1e-12)  # the same points, the other FVU fitted
    with pytest.raises(DarkMatterError, match="no prefix results of SAE 'other'"):
        load_sweep(out, prefixes_of="other")


@pytest.fixture(scope="module")
def topk_folder(store, tmp_path_factory):
    """Our own TopK SAE (no nested groups recorded)."""
    x = _x(store)
    sae = TopKSAE(D, WIDTH, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    folder = tmp_path_factory.mktemp("saes") / "plain"
    save_sae(sae, folder, metadata={"model_name": "tiny", "hook_name": "resid_post.1"})
    return folder


def test_frequency_order_warnings_and_cache_by_order(store, topk_folder, tmp_path, caplog):
    out = tmp_path / "p"
    args = ["--store", store.path, "-o", out, "--sae", topk_folder, "--prefixes", "4,16"]
    res = _invoke(*args, "--latent-order", "frequency")
    assert res.exit_code == 0, res.output
    assert "is a TopK SAE: each prefix keeps those of its k selected latents" in caplog.text
    assert "records no nested" not in caplog.text  # that warning is about the stored order
    files = sorted(out.glob("*.json"))
    assert [f.name for f in files] == ["plain__prefix16.json", "plain__prefix4.json"]
    assert json.loads(files[0].read_text())["prefix"]["order"] == "frequency"
    stamps = [f.stat().st_mtime_ns for f in files]
    assert _invoke(*args, "--latent-order", "frequency").exit_code == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps  # cached: same widths and order
    res = _invoke(*args)  # another order: new results under the same names
    assert res.exit_code == 0, res.output
    assert "records no nested (Matryoshka) widths" in caplog.text
    assert json.loads(files[0].read_text())["prefix"]["order"] == "stored"


@pytest.mark.parametrize(("args", "message"), [
    (["--prefixes", "4,80"], "prefix widths [80] are outside 1..64"),
    (["--prefixes", "4,4"], "prefix widths [4] are given more than once"),
    (["--prefixes", "auto", "--latent-order", "random"],
     "--latent-order must be one of stored, frequency, got 'random'"),
    (["--latent-order", "frequency"], "--latent-order orders the latents of --prefixes"),
    (["--prefixes", "4,x"], "--prefixes must be comma-separated integers"),
])
def test_bad_prefix_options_are_refused_before_any_work(store, topk_folder, tmp_path, args,
                                                        message):
    out = tmp_path / "p"
    res = _invoke("--store", store.path, "-o", out, "--sae", topk_folder, *args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert not out.exists()


def test_prefixes_of_transcoders_are_refused(store, topk_folder, tmp_path):
    res = _invoke("--store", store.path, "--transcoder", topk_folder, "--prefixes", "auto")
    assert res.exit_code == 2
    assert "--prefixes applies to --sae only" in " ".join(res.output.split())
