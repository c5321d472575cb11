"""RunDir: the run folder's paths come from layout, and each part is opened once."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae_darkmatter import (
    CorpusConfig,
    CrossLayerConfig,
    DownstreamConfig,
    ErrorSAEConfig,
    HarvestConfig,
    ModelConfig,
    PursuitConfig,
    RunConfig,
    SAETrainConfig,
    layout,
    run,
)
from sae_darkmatter.analyses import run_analyses
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.run_dir import RunDir, decompositions_of, store_of
from sae_darkmatter.splits import make_splits


@pytest.fixture(scope="module")
def small_run(tiny_model_dir, tmp_path_factory):
    """A tiny run with the cheap analyses only (scaling, per-token, norms)."""
    cfg = RunConfig(
        harvest=HarvestConfig(
            model=ModelConfig(name=str(tiny_model_dir)),
            corpus=CorpusConfig(n_contexts=64, context_length=32),
            hooks=("resid_post.2",), batch_size=16, contexts_per_shard=32,
        ),
        train=SAETrainConfig(widths=(64, 128, 256), ks=(8,), train_tokens=4000, batch_size=512),
        pursuit=PursuitConfig(enabled=False),
        cross_layer=CrossLayerConfig(enabled=False),
        error_saes=ErrorSAEConfig(enabled=False),
        downstream=DownstreamConfig(enabled=False),
    )
    out = tmp_path_factory.mktemp("run")
    run(cfg, out, progress=False)
    return out, cfg


def test_paths_are_the_layout_the_pipeline_wrote(small_run):
    out, _ = small_run
    r = RunDir(out)
    assert r.store_path == out / layout.STORE and (r.store_path / "manifest.json").is_file()
    assert r.config_path == out / layout.RUN_CONFIG and r.config_path.is_file()
    assert r.analyses_path == out / layout.ANALYSES and r.analyses_path.is_file()
    assert r.metrics_path == out / layout.METRICS and r.metrics_path.is_file()
    assert sorted(p.name for p in r.saes_path.iterdir()) == [
        "topk-w128-k8", "topk-w256-k8", "topk-w64-k8"]
    assert len(list(r.decompose_path.glob("*.json"))) == 3
    assert r.figure("scaling_stacked").is_file()
    assert r.figure_key("scaling_stacked") == "figures/scaling_stacked.png"


def test_each_part_is_read_once_and_equals_a_fresh_read(small_run):
    out, cfg = small_run
    r = RunDir(out)
    assert r.store is r.store
    assert r.decompositions is r.decompositions
    assert [d.name for d in r.decompositions] == [d.name for d in decompositions_of(out)]
    splits = r.splits(cfg.split)
    assert r.splits(cfg.split) is splits
    fresh = make_splits(store_of(r.store_path), cfg.split)
    assert store_of(r) is r.store
    for part in ("sae_train", "probe_train", "probe_test"):
        np.testing.assert_array_equal(getattr(splits, part), getattr(fresh, part))
    # the saved config is the resolved one the run used
    assert r.config.harvest.hooks == ("resid_post.2",)
    assert r.config.train.widths == (64, 128, 256)
    assert r.decomposition("topk-w64-k8").width == 64
    with pytest.raises(DarkMatterError, match="no decomposition 'nope'"):
        r.decomposition("nope")
    sae = r.open_sae(r.decompositions[0])
    assert sae.W_dec.shape[0] == r.decompositions[0].width


def test_lock_keeps_a_second_writer_out(small_run):
    out, _ = small_run
    with RunDir(out).lock():
        with pytest.raises(DarkMatterError, match="another process is running the pipeline"):
            with RunDir(out).lock():
                pass
    with RunDir(out).lock():  # released again
        pass


def test_analyses_on_a_rundir_equal_those_on_a_path(small_run, tmp_path):
    out, cfg = small_run
    before = RunDir(out).analyses_path.read_text()
    by_path = run_analyses(out, only=("scaling",), cfg=cfg, progress=False)
    by_run = run_analyses(RunDir(out), only=("scaling",), cfg=cfg, progress=False)
    # both reuse the pipeline's cached result: same cache key, same numbers, nothing rewritten
    assert by_path["scaling"]["fingerprint"] == by_run["scaling"]["fingerprint"]
    assert by_path["scaling"]["fit"] == by_run["scaling"]["fit"]
    after = json.loads(RunDir(out).analyses_path.read_text())
    assert after["scaling"].pop("reused") is True  # marked as reused, otherwise unchanged
    assert after == json.loads(before)


def test_stale_temps_are_removed_but_not_in_the_store(small_run):
    out, _ = small_run
    r = RunDir(out)
    stale = r.decompose_path / ".x.json.123.tmp"
    stale.write_text("partial")
    kept = r.store_path / ".y.123.tmp"
    kept.write_text("the store cleans its own")
    try:
        assert r.remove_stale_temps() == [stale]
        assert not stale.exists() and kept.exists()
    finally:
        kept.unlink()
