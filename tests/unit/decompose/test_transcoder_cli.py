"""``darkmatter decompose --transcoder`` end to end: transcoders written by sae_lens itself
(random weights) on a store of a tiny Llama's ``mlp_in.2`` and ``mlp_out.2``; the ŷ behind the
saved per-token errors is sae_lens's own forward."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sae_darkmatter.cli import app
from sae_darkmatter.config import CorpusConfig, HarvestConfig, ModelConfig
from sae_darkmatter.decompose import load_decompositions
from sae_darkmatter.harvest import harvest

LAYER, D, D_SAE = 2, 64, 96


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    cfg = HarvestConfig(model=ModelConfig(name=str(tiny_model_dir)),
                        corpus=CorpusConfig(n_contexts=48, context_length=32),
                        hooks=(f"mlp_in.{LAYER}", f"mlp_out.{LAYER}"), batch_size=16,
                        contexts_per_shard=16)
    return harvest(cfg, tmp_path_factory.mktemp("tc_store") / "store", progress=False)


def _saelens_folder(path, arch: str, seed: int, hook_in: str = f"blocks.{LAYER}.mlp.hook_in"):
    """A sae_lens transcoder of ``arch`` with random weights, saved by sae_lens to ``path``."""
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = get_sae_class(arch)
    meta = SAEMetadata(model_name="tiny", hook_name=hook_in,
                       hook_name_out=f"blocks.{LAYER}.hook_mlp_out")
    theirs = cls(cfg_cls(d_in=D, d_sae=D_SAE, d_out=D, apply_b_dec_to_input=False, metadata=meta))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    theirs.save_model(path)
    return path


def test_cli_decomposes_saelens_transcoders_with_their_own_forward(store, tmp_path, sae_lens):
    folders = [_saelens_folder(tmp_path / "skip_tc", "skip_transcoder", 1),
               _saelens_folder(tmp_path / "plain_tc", "transcoder", 2)]
    out = tmp_path / "decompose"
    res = CliRunner().invoke(app, ["decompose", "--store", str(store.path), "-o", str(out),
                                   *(a for f in folders for a in ("--transcoder", str(f)))])
    assert res.exit_code == 0, res.output
    assert f"mlp_in.{LAYER} -> mlp_out.{LAYER}" in " ".join(res.output.split())
    assert "skip_tc: its skip term absorbs FVU" in " ".join(res.output.split())
    decs = {d.name: d for d in load_decompositions(out)}
    assert set(decs) == {"skip_tc", "plain_tc"}
    for folder in folders:
        d = decs[folder.name]
        info, m = d.info, d.info["metrics"]
        skip = folder.name == "skip_tc"
        assert info["transcoder"] == {"hook_in": f"mlp_in.{LAYER}",
                                      "hook_out": f"mlp_out.{LAYER}", "skip": skip}
        assert (m["hook"], m["hook_out"], m["d_in"], m["d_out"]) == (
            f"mlp_in.{LAYER}", f"mlp_out.{LAYER}", D, D)
        prov = info["sae"]
        assert (prov["library"], prov["architecture"], prov["skip"]) == (
            "sae_lens", "skip_transcoder" if skip else "transcoder", skip)
        assert (prov["hook_name"], prov["hook_name_out"]) == (f"mlp_in.{LAYER}",
                                                              f"mlp_out.{LAYER}")
        assert ("skip" in m) is skip
        # the error behind the saved per-token values is y - sae_lens's forward(x)
        rows = d.tokens["rows"]
        x, y = store.gather(f"mlp_in.{LAYER}", rows), store.gather(f"mlp_out.{LAYER}", rows)
        with torch.no_grad():
            y_hat = sae_lens.SAE.load_from_disk(folder)(x)
        err_sq = (y - y_hat).double().square().sum(1)
        torch.testing.assert_close(torch.from_numpy(d.tokens["err_sq"]).double(), err_sq,
                                   rtol=1e-4, atol=1e-4)
        y_var = (y.double() - y.double().mean(0)).square().sum()
        assert m["fvu"] == pytest.approx(float(err_sq.sum() / y_var), rel=1e-4)
    # the report takes transcoders' results as they are
    report = CliRunner().invoke(app, ["report", str(out), "-o", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())["saes"]
    assert {s["name"]: "skip" in s for s in saved} == {"skip_tc": True, "plain_tc": False}
    # rerunning reuses every cached result
    again = CliRunner().invoke(app, ["decompose", "--store", str(store.path), "-o", str(out),
                                     "--transcoder", str(folders[0])])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "skip_tc.json").read_text())["group"] == ["skip_tc", "plain_tc"]


def test_cli_names_a_missing_hook_and_how_to_harvest_it(store, tmp_path, sae_lens):
    folder = _saelens_folder(tmp_path / "tc", "skip_transcoder", 3)
    res = CliRunner().invoke(app, ["decompose", "--store", str(store.path), "-o",
                                   str(tmp_path / "out"), "--transcoder", str(folder),
                                   "--hook-in", "mlp_in.1"])
    assert res.exit_code != 0
    text = " ".join(res.output.split())
    assert "lacks 'mlp_in.1'" in text
    assert "darkmatter harvest --hook mlp_in.1 --hook mlp_out.2" in text
    both = CliRunner().invoke(app, ["decompose", "--store", str(store.path), "--sae", "x",
                                    "--transcoder", str(folder)])
    assert both.exit_code != 0 and "not both" in both.output
    as_sae = CliRunner().invoke(app, ["decompose", "--store", str(store.path), "-o",
                                      str(tmp_path / "out"), "--sae", str(folder)])
    assert as_sae.exit_code != 0 and "--transcoder" in as_sae.output


def test_cli_asks_for_an_input_hook_that_matches_none_of_ours(store, tmp_path, sae_lens):
    folder = _saelens_folder(tmp_path / "tc", "transcoder", 4,
                             hook_in=f"blocks.{LAYER}.ln2.hook_normalized")
    args = ["decompose", "--store", str(store.path), "-o", str(tmp_path / "out"),
            "--transcoder", str(folder)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0
    assert (f"its input hook 'blocks.{LAYER}.ln2.hook_normalized' matches no hook here; give "
            "one (--hook-in") in " ".join(res.output.split())
    res = CliRunner().invoke(app, [*args, "--hook-in", f"mlp_in.{LAYER}"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "out" / "tc.json").read_text())
    assert saved["transcoder"]["hook_in"] == f"mlp_in.{LAYER}"
