"""``darkmatter sweep`` end to end on the tiny random Llama: one run per value, the comparative
report, a rerun that recomputes nothing, and bad input refused before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import PNG_MAGIC
from sae_darkmatter import ActivationStore
from sae_darkmatter.analyses.claims import NOT_RUN, VERDICTS
from sae_darkmatter.analyses.paper import CLAIMS
from sae_darkmatter.cli import app

runner = CliRunner()

TOML = """
[harvest]
hooks = ["resid_post.2"]
batch_size = 16
contexts_per_shard = 16
[harvest.model]
name = "{model}"
[harvest.corpus]
n_contexts = 48
context_length = 32
[train]
widths = [64]
ks = [8]
train_tokens = 2048
batch_size = 256
[pursuit]
enabled = false
[downstream]
enabled = false
[error_saes]
enabled = false
"""


def write_toml(path: Path, model_dir: Path, extra: str = "") -> Path:
    path.write_text(TOML.format(model=model_dir) + extra)
    return path


@pytest.fixture(scope="module")
def layer_sweep(tiny_model_dir, tmp_path_factory):
    """``--over layer=1,2`` on the 4-layer model (cross-layer sources on: they follow L)."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = write_toml(tmp / "run.toml", tiny_model_dir)
    out = tmp / "sweep_out"
    res = runner.invoke(app, ["sweep", "--over", "layer=1,2", "--config", str(config),
                              "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out, tmp, res.output


def test_sweep_runs_each_value_and_compares_them(layer_sweep):
    out, _, output = layer_sweep
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["over"] == "layer" and summary["values"] == [1, 2]
    points = summary["points"]
    assert [p["folder"] for p in points] == ["layer=1", "layer=2"]
    assert [p["hook"] for p in points] == ["resid_post.1", "resid_post.2"]
    for layer, p in zip((1, 2), points):
        run = out / p["folder"]
        # the run derived the cross-layer sources from the swept layer
        assert list(ActivationStore.open(run / "store").hooks) == [
            f"resid_post.{layer}", f"resid_post.{layer - 1}", f"attn_out.{layer}",
            f"mlp_out.{layer}"]
        assert (run / "report.html").is_file() and p["report"] == f"layer={layer}/report.html"
        # the sweep's numbers are the run's own
        own = json.loads((run / "metrics.json").read_text())
        (sae,) = p["saes"]
        assert sae["fvu"] == own["saes"][0]["fvu"] and 0 < sae["fvu_nonlinear"] < sae["fvu"]
        lo, hi = sae["ci"]["fvu_nonlinear"]
        assert lo <= sae["fvu_nonlinear"] <= hi
        assert [c["key"] for c in p["claims"]] == [c.key for c in CLAIMS]
        assert {c["verdict"] for c in p["claims"]} <= {*VERDICTS, NOT_RUN}
        assert p["claims"] == [{k: c[k] for k in ("key", "claim", "verdict", "detail", "items")}
                               for c in own["analyses"]["paper"]["claims"]]
    # the two layers are different runs, not one run reported twice
    assert points[0]["saes"][0]["fvu"] != points[1]["saes"][0]["fvu"]
    page = (out / "report.html").read_text()
    assert 'href="layer=1/report.html"' in page and 'href="layer=2/report.html"' in page
    assert "Against the paper, by layer" in page and CLAIMS[0].claim in page
    (img,) = re.findall(r'<img src="([^"]+)"', page)
    assert (out / img).read_bytes()[:8] == PNG_MAGIC
    assert "resid_post.1" in output and "sweep report" in output


def test_rerun_from_the_toml_sweep_table_recomputes_nothing(layer_sweep, tiny_model_dir):
    out, tmp, _ = layer_sweep
    watched = [out / f"layer={n}" / name for n in (1, 2) for name in (
        "store/manifest.json", "saes/topk-w64-k8/sae_weights.safetensors",
        f"saes/mlp_out.{n}/topk-w64-k8/sae_weights.safetensors", "decompose/topk-w64-k8.json")]
    stamps = [p.stat().st_mtime_ns for p in watched]
    before = json.loads((out / "sweep.json").read_text())
    config = write_toml(tmp / "sweep.toml", tiny_model_dir,
                        '[sweep]\nover = "layer"\nvalues = [1, 2]\n')
    res = runner.invoke(app, ["sweep", "--config", str(config), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert [p.stat().st_mtime_ns for p in watched] == stamps
    after = json.loads((out / "sweep.json").read_text())
    assert [p["saes"] for p in after["points"]] == [p["saes"] for p in before["points"]]
    for p in after["points"]:
        assert p["timings_s"]["train"] < 5 and p["timings_s"]["decompose"] < 5
        analyses = json.loads((out / p["folder"] / "metrics.json").read_text())["analyses"]
        # every analysis is reused; only the scaling fit (one width: skipped) is tried again
        assert {n for n, a in analyses.items() if a.get("reused")} == {
            "paper", "per_token", "norms", "cross_layer"}
        assert set(analyses) == {"paper", "per_token", "norms", "cross_layer", "scaling"}


def test_train_tokens_sweep_trains_each_length(tiny_model_dir, tmp_path):
    config = write_toml(tmp_path / "run.toml", tiny_model_dir,
                        '[cross_layer]\nenabled = false\n')
    out = tmp_path / "out"
    res = runner.invoke(app, ["sweep", "--over", "train_tokens=1024,2048", "--config",
                              str(config), "-o", str(out)])
    assert res.exit_code == 0, res.output
    seen = [json.loads((out / f"train_tokens={n}" / "saes" / "topk-w64-k8" / "training.json")
                       .read_text())["tokens_seen"] for n in (1024, 2048)]
    assert seen == [1024, 2048]
    assert json.loads((out / "sweep.json").read_text())["values"] == [1024, 2048]


@pytest.mark.parametrize(("over", "message"), [
    ("layr=1,2", "did you mean 'layer'"),
    ("layer=1,x", "must be an integer, got 'x'"),
    ("layer=1,01", "distinct"),
    ("layer=", "non-empty"),
    ("layer=1,9", "has 4 layers (0..3)"),
    ("context_length=32,512", "exceeds the 256 positions"),
    ("train_tokens=0,100", "train.train_tokens must be >= 1"),
    ("train.widths=64,128", "a sweep sets one number"),
    ("protocol=default,papr", "protocols from"),
])
def test_bad_sweeps_are_refused_before_any_work(tiny_model_dir, tmp_path, over, message):
    config = write_toml(tmp_path / "run.toml", tiny_model_dir)
    out = tmp_path / "out"
    res = runner.invoke(app, ["sweep", "--over", over, "--config", str(config), "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()), res.output
    assert not out.exists()  # nothing was harvested, trained or written


def test_bad_sweep_table_names_the_file_and_key(tiny_model_dir, tmp_path):
    config = write_toml(tmp_path / "run.toml", tiny_model_dir,
                        '[sweep]\nover = "layer"\nvalues = []\n')
    res = runner.invoke(app, ["sweep", "--config", str(config), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "run.toml: sweep.values must be a non-empty list" in " ".join(res.output.split())
    res = runner.invoke(app, ["sweep", "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "nothing to sweep" in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--over", "protocol=default,paper", "--quick"], "--quick cannot be combined"),
    (["--over", "protocol=default,paper", "--protocol", "paper"], "cannot be combined"),
    (["--over", "layer=1,2", "--sae", "some/sae"], "changes nothing for pretrained SAEs"),
])
def test_conflicting_options_are_refused(tmp_path, args, message):
    res = runner.invoke(app, ["sweep", *args, "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "out").exists()
