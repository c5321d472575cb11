"""A full disk, for real: a size-limited tmpfs mounted for the test (the machine runs tests as root
with CAP_SYS_ADMIN, as CI does). Harvest and SAE training stop with a clear error, keep every
committed piece intact, and resume to the same result once space is freed (tmpfs remount)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_darkmatter.config import (
    CorpusConfig,
    HarvestConfig,
    ModelConfig,
    SAETrainConfig,
)
from sae_darkmatter.errors import DiskFullError
from sae_darkmatter.harvest import harvest
from sae_darkmatter.saes.train import train_grid
from sae_darkmatter.store import ActivationStore


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs; ``grow(size)`` remounts it bigger (what freeing space amounts to)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {done.stderr}"

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    yield mnt, grow
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _harvest(model_dir: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sae_darkmatter.cli", "harvest", "--model", str(model_dir),
           "--n-contexts", "128", "--context-length", "32", "--batch-size", "8",
           "--contexts-per-shard", "16", "--hook", "resid_post.1", "--hook", "mlp_out.2",
           "-o", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _tmp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_harvest_on_a_full_disk_stops_cleanly_and_resumes(tiny_model_dir, tmp_path, small_fs):
    mnt, grow = small_fs
    store_dir = mnt / "store"  # 8 shards of ~270 kB: about 3 fit in 1 MiB
    full = _harvest(tiny_model_dir, store_dir)
    assert full.returncode == 2, full.stderr
    text = " ".join(full.stderr.split())
    assert "no space left to write" in text and "rerun the same command to resume" in text
    assert "Traceback" not in full.stderr

    store = ActivationStore.open(store_dir)
    assert 0 < store.committed_contexts < 128
    store.verify()  # every committed shard is whole
    assert _tmp_files(store_dir) == []

    grow("8m")
    done = _harvest(tiny_model_dir, store_dir)
    assert done.returncode == 0, done.stderr
    ref = harvest(
        HarvestConfig(
            model=ModelConfig(name=str(tiny_model_dir)),
            corpus=CorpusConfig(n_contexts=128, context_length=32),
            hooks=("resid_post.1", "mlp_out.2"),
            batch_size=8,
            contexts_per_shard=16,
        ),
        tmp_path / "ref",
        progress=False,
    )
    resumed = ActivationStore.open(store_dir)
    assert resumed.committed_contexts == 128
    assert [s["sha256"] for s in resumed._manifest["shards"]] == [
        s["sha256"] for s in ref._manifest["shards"]
    ]
    assert _tmp_files(store_dir) == []


def test_training_on_a_full_disk_stops_cleanly_and_resumes(tmp_path, small_fs):
    mnt, grow = small_fs
    x = torch.randn(8192, 128, generator=torch.Generator().manual_seed(0))
    # Each SAE folder holds ~0.5-1 MB of weights (plus a checkpoint with Adam state in training).
    cfg = SAETrainConfig(widths=(512, 1024), ks=(8,), train_tokens=8192, batch_size=1024)
    with pytest.raises(DiskFullError, match=r"no space left to write .*small/saes"):
        train_grid(x, cfg, mnt / "saes", progress=False)
    assert _tmp_files(mnt) == []

    grow("16m")
    folders = train_grid(x, cfg, mnt / "saes", progress=False)
    ref = train_grid(x, cfg, tmp_path / "ref", progress=False)
    for a, b in zip(folders, ref):
        wa, wb = load_file(a / "sae_weights.safetensors"), load_file(b / "sae_weights.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
