"""Harvests with and without the per-token loss (off by default) are never confused: their
fingerprints differ, a store without loss is never reused or resumed for a harvest that asks for
it, and the analyses' cache keys tell the two apart."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_darkmatter.analyses import _inputs
from sae_darkmatter.config import CorpusConfig, HarvestConfig, ModelConfig
from sae_darkmatter.contexts import packing_for
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.harvest import harvest, harvest_fingerprint
from sae_darkmatter.models import load_model
from sae_darkmatter.run_dir import RunDir
from sae_darkmatter.store import ActivationStore

HOOK = "resid_post.1"
harvest_module = importlib.import_module("sae_darkmatter.harvest")  # the package's ``harvest``
# attribute is the function


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))


def _cfg(model_dir: Path, *, with_loss: bool) -> HarvestConfig:
    return HarvestConfig(model=ModelConfig(name=str(model_dir)),
                         corpus=CorpusConfig(n_contexts=32, context_length=32), hooks=(HOOK,),
                         batch_size=16, contexts_per_shard=16, with_loss=with_loss)


def test_the_default_harvest_stores_no_loss_and_its_fingerprint_says_so(smollm2_tokenizer):
    default = HarvestConfig()
    assert default.with_loss is False
    packing = packing_for(default.corpus, smollm2_tokenizer)
    with_loss = dataclasses.replace(default, with_loss=True)
    assert harvest_fingerprint(default, packing) != harvest_fingerprint(with_loss, packing)


def test_a_store_without_loss_is_never_reused_for_one_with_it(tmp_path, tiny_model_dir, lm):
    no, yes = _cfg(tiny_model_dir, with_loss=False), _cfg(tiny_model_dir, with_loss=True)
    a = harvest(no, tmp_path / "a" / "store", lm=lm, progress=False)
    assert a.meta["with_loss"] is False and np.isnan(a.column("loss")).all()
    manifest = (a.path / "manifest.json").read_bytes()
    with pytest.raises(DarkMatterError, match=r"harvested without the per-token loss "
                       r"\(harvest\.with_loss = false\) and this run asks for it: rerun with "
                       r"--no-loss to use it"):
        harvest(yes, a.path, lm=lm, progress=False)
    assert (a.path / "manifest.json").read_bytes() == manifest  # untouched

    b = harvest(yes, tmp_path / "b" / "store", lm=lm, progress=False)
    loss = b.column("loss").reshape(32, 32)
    assert np.isfinite(loss[:, :-1]).all() and np.isnan(loss[:, -1]).all()
    rows = np.arange(a.n_rows)  # the same activations: the early stop changes nothing before it
    assert torch.equal(a.gather(HOOK, rows), b.gather(HOOK, rows))
    # a complete store with the loss serves a harvest without it as it is (the loss is extra)
    manifest = (b.path / "manifest.json").read_bytes()
    again = harvest(no, b.path, lm=lm, progress=False)
    assert again.meta["with_loss"] is True
    assert np.array_equal(again.column("loss"), b.column("loss"), equal_nan=True)
    assert (b.path / "manifest.json").read_bytes() == manifest
    # every analysis's cache key (downstream's included) holds the store's own fingerprint
    assert _inputs(RunDir(tmp_path / "a"))[0] == harvest_fingerprint(
        no, packing_for(no.corpus, lm.tokenizer))
    assert _inputs(RunDir(tmp_path / "a"))[0] != _inputs(RunDir(tmp_path / "b"))[0]


def test_an_unfinished_store_is_finished_only_with_its_own_loss_choice(
    tmp_path, tiny_model_dir, lm, monkeypatch
):
    no, yes = _cfg(tiny_model_dir, with_loss=False), _cfg(tiny_model_dir, with_loss=True)
    path = tmp_path / "store"
    check, shards = harvest_module.check_finite_shard, []

    def interrupt_second_shard(*args, **kwargs):  # Ctrl-C while the second shard is in flight
        shards.append(1)
        if len(shards) == 2:
            raise KeyboardInterrupt
        return check(*args, **kwargs)

    monkeypatch.setattr(harvest_module, "check_finite_shard", interrupt_second_shard)
    with pytest.raises(KeyboardInterrupt):
        harvest(yes, path, lm=lm, progress=False)
    monkeypatch.undo()
    assert ActivationStore.open(path).committed_contexts == 16
    with pytest.raises(DarkMatterError, match=r"harvested with the per-token loss .* rerun with "
                       r"--loss to finish it"):
        harvest(no, path, lm=lm, progress=False)
    assert ActivationStore.open(path).committed_contexts == 16
    done = harvest(yes, path, lm=lm, progress=False)
    loss = done.column("loss").reshape(32, 32)
    assert done.committed_contexts == 32 and np.isfinite(loss[:, :-1]).all()
