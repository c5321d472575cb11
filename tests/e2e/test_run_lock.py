"""The run folder's lock and temp-file sweep, which make a killed run safe to rerun: a live
holder refuses a second run, SIGKILL frees the lock, and a killed run's temps are removed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sae_darkmatter import HarvestConfig, ModelConfig, RunConfig, layout, run
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.run_dir import RunDir


def test_second_run_in_a_folder_is_refused_until_the_first_dies(tmp_path):
    """The run lock: held by a live process it refuses a second run; SIGKILL frees it."""
    hold = ("import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
            "lock.acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / layout.RUN_LOCK)],
                              stdout=subprocess.PIPE, text=True)
    # were the lock not honoured, this run would stop at once on its missing model
    cfg = RunConfig(harvest=HarvestConfig(model=ModelConfig(name=str(tmp_path / "no-model"))))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DarkMatterError, match="another process is running the pipeline"):
            run(cfg, tmp_path, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == [layout.RUN_LOCK]  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    with RunDir(tmp_path).lock():  # the kernel dropped the dead holder's lock
        pass


def test_stale_temps_are_removed_outside_the_store(tmp_path):
    stale = [tmp_path / ".metrics.json.ab12cd.tmp", tmp_path / "figures" / ".x.png.q1w2e3.tmp",
             tmp_path / "saes" / "topk-w64-k8" / ".checkpoint.pt.zz.tmp"]
    kept = [tmp_path / "metrics.json", tmp_path / "figures" / "x.png", tmp_path / "notes.tmp",
            tmp_path / "store" / ".shard_000001.safetensors.abc.tmp"]  # the store's own business
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    half_saved_sae = tmp_path / "saes" / ".topk-w96-k8.4242.0badf00d.tmp"
    half_saved_sae.mkdir()
    (half_saved_sae / "sae_weights.safetensors").write_text("partial")
    removed = RunDir(tmp_path).remove_stale_temps()
    assert sorted(removed) == sorted(stale + [half_saved_sae])
    assert all(p.exists() for p in kept) and not any(p.exists() for p in removed)
