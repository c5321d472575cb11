"""The harvest CLI on a tiny random Llama, killed (SIGKILL) and interrupted (Ctrl-C) mid-way:
each rerun resumes, and the finished store equals one harvested in a single go."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sae_darkmatter import ActivationStore


def _harvest_cmd(model_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sae_darkmatter.cli",
        "harvest",
        "--model",
        str(model_dir),
        "--n-contexts",
        "1536",
        "--context-length",
        "32",
        "--batch-size",
        "8",
        "--contexts-per-shard",
        "16",
        "--hook",
        "resid_post.1",
        "--hook",
        "mlp_out.2",
        "-o",
        str(out),
    ]


def _wait_for_shards(store: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t = time.time()
    while time.time() - t < timeout:
        manifest = store / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= n:
            return
        assert proc.poll() is None, "harvest finished before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no shard committed in time")


def test_harvest_resumes_after_kill_and_ctrl_c(tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "store"
    proc = subprocess.Popen(_harvest_cmd(tiny_model_dir, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_shards(out, 2, proc)
    proc.kill()  # SIGKILL: no cleanup at all
    proc.wait()
    first = ActivationStore.open(out).committed_contexts
    assert 0 < first < 1536

    # A shell started the suite in the background ignores SIGINT, and children inherit that:
    # restore the default so the harvest gets a KeyboardInterrupt like at a terminal.
    proc = subprocess.Popen(_harvest_cmd(tiny_model_dir, out), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_shards(out, first // 16 + 2, proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rerun" in text
    assert first < ActivationStore.open(out).committed_contexts < 1536

    done = subprocess.run(
        _harvest_cmd(tiny_model_dir, out), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    ref = tmp_path / "ref"
    done = subprocess.run(
        _harvest_cmd(tiny_model_dir, ref), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr

    a, b = ActivationStore.open(out), ActivationStore.open(ref)
    a.verify()
    assert a.n_rows == b.n_rows == 1536 * 32
    for col in ("tokens", "position", "context", "loss"):
        np.testing.assert_array_equal(a.column(col), b.column(col))
    for hook in ("resid_post.1", "mlp_out.2"):
        for (ra, xa), (rb, xb) in zip(a.iter_chunks(hook), b.iter_chunks(hook)):
            np.testing.assert_array_equal(ra, rb)
            assert np.array_equal(xa.numpy(), xb.numpy())
