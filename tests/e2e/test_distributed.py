"""Many processes with torchrun (gloo on CPU): the results equal a single-process run.

The test launches the real CLI under ``torchrun --nproc-per-node 2`` and once alone, on the tiny
Llama, and compares every output: the store (shard files and hashes), the SAEs (weight hashes),
the decompositions (metrics, probes, per-token values) and the report.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from helpers import BIN, offline_env, run_ok
from sae_darkmatter import distributed
from sae_darkmatter._io import resolve_device
from sae_darkmatter.errors import DarkMatterError

CONFIG = """
[harvest]
hooks = ["resid_post.2"]
batch_size = 8
contexts_per_shard = 16
[harvest.model]
name = "{model}"
[harvest.corpus]
n_contexts = 80
context_length = 32
[train]
widths = [64, 128, 256]
ks = [8]
train_tokens = 4096
batch_size = 512
[decompose]
chunk_rows = 256
[downstream]
max_contexts = 16
"""


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The same `darkmatter run` once alone and once on two torchrun ranks."""
    root = tmp_path_factory.mktemp("dist")
    (root / "run.toml").write_text(CONFIG.format(model=tiny_model_dir))
    args = ["run", "--config", "run.toml"]
    run_ok([str(BIN / "darkmatter"), *args, "-o", "alone"], root, 900)
    run_ok([str(BIN / "torchrun"), "--nproc-per-node", "2", "--no-python",
            str(BIN / "darkmatter"), *args, "-o", "two"], root, 900)
    return root / "alone", root / "two"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_store_is_byte_identical(runs):
    alone, two = runs
    a, b = (json.loads((r / "store" / "manifest.json").read_text()) for r in runs)
    assert len(a["shards"]) == 5  # 80 contexts / 16: both ranks wrote shards
    assert a["shards"] == b["shards"] and a["committed_rows"] == b["committed_rows"]
    for s in a["shards"]:
        assert _sha(alone / "store" / s["file"]) == _sha(two / "store" / s["file"])
    assert not list((two / "store").glob("*.staged.json"))


def test_saes_are_identical(runs):
    alone, two = runs
    weights = sorted((alone / "saes").rglob("sae_weights.safetensors"))
    assert len(weights) >= 3
    for w in weights:
        assert _sha(w) == _sha(two / w.relative_to(alone))


def test_decomposition_equals_single_process(runs):
    alone, two = runs
    results = sorted((alone / "decompose").glob("*.json"))
    assert len(results) == 3
    for path in results:
        a, b = json.loads(path.read_text()), json.loads((two / "decompose" / path.name).read_text())
        assert a["metrics"]["n_probe_train"] == b["metrics"]["n_probe_train"] > 0
        for key, value in a["metrics"].items():
            if isinstance(value, float):
                # Same rows in other chunk sizes: float32 encodes and float64 sums in another
                # order. Differences are ~1e-7 relative; 1e-5 would still catch a lost share.
                assert b["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        pa, pb = (load_file(str(r / "decompose" / a["probe_file"])) for r in runs)
        assert pa.keys() == pb.keys()
        np.testing.assert_array_equal(pa["test.rows"], pb["test.rows"])
        for key in pa:
            np.testing.assert_allclose(pb[key], pa[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert (two / "report.html").is_file() and (two / "metrics.json").is_file()


@pytest.mark.soak
def test_killed_distributed_harvest_resumes_to_the_same_store(tiny_model_dir, tmp_path):
    """SIGKILL every process of a 2-rank harvest mid-way; a rerun (here on 2 ranks again) keeps
    the committed and staged shards and ends byte-identical to the single-process store."""
    out = tmp_path / "killed"
    cmd = [
        str(BIN / "torchrun"),
        "--nproc-per-node",
        "2",
        "--no-python",
        str(BIN / "darkmatter"),
        "harvest",
        "--model",
        str(tiny_model_dir),
        "--hook",
        "resid_post.2",
        "--n-contexts",
        "480",
        "--context-length",
        "32",
        "--batch-size",
        "8",
        "--contexts-per-shard",
        "16",
        "-o",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, env=offline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    t = time.time()
    while len(list(out.glob("shard_*.safetensors"))) < 6:
        assert proc.poll() is None and time.time() - t < 300, "the harvest ended before the kill"
        time.sleep(0.05)
    subprocess.run(["pkill", "-KILL", "-f", str(out)])  # torchrun and both ranks, no cleanup
    proc.wait()
    before = json.loads((out / "manifest.json").read_text())["committed_contexts"]
    assert before < 480
    run_ok(cmd, tmp_path, 900)
    run_ok([str(BIN / "darkmatter"), *cmd[5:-1], str(tmp_path / "ref")], tmp_path, 900)
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (out, tmp_path / "ref"))
    assert a["shards"] == b["shards"] and a["committed_contexts"] == 480
    assert not list(out.glob("*.staged.json")) and not list(out.glob(".*.tmp"))


def test_single_process_helpers_are_identity():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.share(10) == slice(0, 10) and distributed.owns(7)
    assert distributed.gather({"a": 1}) == [{"a": 1}]
    np.testing.assert_array_equal(
        distributed.concatenated([np.arange(3), np.arange(2)]), [0, 1, 2, 0, 1]
    )


def test_missing_gpu_is_a_clear_error():
    with pytest.raises(DarkMatterError, match=r"'cuda:99' was asked for, but torch .* sees"):
        resolve_device("cuda:99")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DarkMatterError, match="sees no GPU; use device 'cpu'"):
            resolve_device("cuda")


def test_library_use_under_torchrun_without_init_warns(monkeypatch, caplog):
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.check_initialized()
    assert "call sae_darkmatter.distributed.init() first" in caplog.text
    caplog.clear()
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.check_initialized()
    assert caplog.text == ""


def test_info_names_devices_and_backends():
    from typer.testing import CliRunner

    from sae_darkmatter.cli import app

    res = CliRunner().invoke(app, ["info"])
    assert res.exit_code == 0, res.output
    expected = "nccl" if torch.cuda.is_available() else "gloo"
    assert f"({expected} would be used here)" in res.output and "default device" in res.output
