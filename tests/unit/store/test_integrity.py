"""Damaged files are found, named and repaired: store shards (sha256 in the manifest) and SAE
folders (checksums.json), through the Python API and `darkmatter verify [--repair]`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from helpers import PicklePayload
from sae_darkmatter import integrity
from sae_darkmatter.config import (
    CorpusConfig,
    HarvestConfig,
    ModelConfig,
    SAETrainConfig,
)
from sae_darkmatter.errors import CorruptStoreError
from sae_darkmatter.harvest import harvest
from sae_darkmatter.saes.train import train_grid
from sae_darkmatter.store import ActivationStore


def _cfg(model_dir: Path) -> HarvestConfig:
    return HarvestConfig(model=ModelConfig(name=str(model_dir)),
                         corpus=CorpusConfig(n_contexts=64, context_length=32),
                         hooks=("resid_post.1", "mlp_out.2"), batch_size=8, contexts_per_shard=16)


def _verify_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "sae_darkmatter.cli", "verify", *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_damaged_shards_are_named_and_repaired_bit_identically(tiny_model_dir, tmp_path):
    path = tmp_path / "store"
    store = harvest(_cfg(tiny_model_dir), path, progress=False)
    shards = [path / s["file"] for s in store._manifest["shards"]]
    assert len(shards) == 4
    original = {s: s.read_bytes() for s in shards}

    flipped = bytearray(original[shards[1]])
    flipped[-50] ^= 0x01  # one bit of a stored float: the file still parses
    shards[1].write_bytes(bytes(flipped))
    shards[2].write_bytes(original[shards[2]][:1000])  # truncated
    shards[3].unlink()  # lost

    found = integrity.check(path)
    assert [(d.kind, d.path.name) for d in found] == [("shard", s.name) for s in shards[1:]]
    assert "sha256" in found[0].reason and "bytes but the manifest recorded" in found[1].reason
    assert "is missing" in found[2].reason

    reader = ActivationStore.open(path)
    with pytest.raises(
        CorruptStoreError,
        match=rf"shard {shards[1]} is corrupt: sha256 .* `darkmatter verify {path} --repair`",
    ):
        for _ in reader.iter_chunks("resid_post.1"):
            pass
    with pytest.raises(CorruptStoreError, match=r"3 of 4 shards .* are bad"):
        reader.verify()

    checked = _verify_cli(str(path))
    assert checked.returncode == 2
    for s in shards[1:]:
        assert s.name in checked.stdout
    assert "3 damaged item(s)" in checked.stderr and "--repair" in checked.stderr

    fixed = _verify_cli(str(path), "--repair")
    assert fixed.returncode == 0, fixed.stderr
    assert "all store shards and SAE files are intact" in fixed.stdout
    assert "bit-identical to the original" in fixed.stderr
    for s in shards:  # the deterministic CPU harvest rebuilds the very same bytes
        assert s.read_bytes() == original[s], (s, fixed.stderr)
    ActivationStore.open(path).verify()
    assert integrity.check(path) == []


def test_damaged_trained_sae_is_dropped_and_retrained_identically(tmp_path):
    import torch

    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    cfg = SAETrainConfig(widths=(32, 64), ks=(4,), train_tokens=4096, batch_size=512)
    run = tmp_path / "run"
    folders = train_grid(x, cfg, run / "saes", progress=False)
    before = {
        f: {k: t.clone() for k, t in load_file(f / "sae_weights.safetensors").items()}
        for f in folders
    }
    weights = folders[1] / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0x80
    weights.write_bytes(bytes(data))

    (found,) = integrity.check(run)
    assert (found.kind, found.path) == (
        "sae",
        folders[1],
    ) and "sha256 does not match" in found.reason
    repaired, left = integrity.repair(run, progress=False)
    assert repaired == [found] and left == [] and not folders[1].exists() and folders[0].exists()

    again = train_grid(x, cfg, run / "saes", progress=False)  # what rerunning `darkmatter run` does
    assert again == folders
    for f in folders:
        after = load_file(f / "sae_weights.safetensors")
        assert all(torch.equal(after[k], before[f][k]) for k in before[f])
    assert integrity.check(run) == []


def test_foreign_damaged_sae_is_reported_not_deleted(tmp_path):
    from sae_darkmatter.saes import TopKSAE, save_sae

    folder = tmp_path / "run" / "saes" / "copied"
    save_sae(TopKSAE(8, 16, k=2), folder, metadata={})
    (folder / "cfg.json").write_text("{not json")
    repaired, left = integrity.repair(tmp_path / "run", progress=False)
    assert (
        repaired == [] and [d.path for d in left] == [folder] and "not valid JSON" in left[0].reason
    )
    assert folder.exists()
    assert np.array_equal(sorted(p.name for p in folder.iterdir()),
                          ["cfg.json", "checksums.json", "sae_weights.safetensors"])


@pytest.mark.parametrize("damage", ["pickle", "truncated"])
def test_bad_training_checkpoint_is_never_run_and_training_restarts(tmp_path, caplog, damage):
    """A checkpoint.pt holding a code-running pickle, or cut short, is ignored with a warning;
    the SAE trains from the start to exactly the uninterrupted result."""
    import torch

    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(1))
    cfg = SAETrainConfig(widths=(32,), ks=(4,), train_tokens=2048, batch_size=256)
    (ref,) = train_grid(x, cfg, tmp_path / "ref", progress=False)
    folder = tmp_path / "run" / ref.name
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    if damage == "pickle":
        torch.save({"fingerprint": "x", "extra": PicklePayload(marker)}, folder / "checkpoint.pt")
    else:
        torch.save({"model": {"w": torch.zeros(1000)}}, folder / "checkpoint.pt")
        data = (folder / "checkpoint.pt").read_bytes()
        (folder / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    (out,) = train_grid(x, cfg, tmp_path / "run", progress=False)
    assert not marker.exists()
    assert "ignoring unreadable checkpoint" in caplog.text
    a, b = load_file(out / "sae_weights.safetensors"), load_file(ref / "sae_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
