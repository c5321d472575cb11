"""scripts/gpu_check.sh with the CPU as the device under test: its logic end to end.

No GPU here, so ``--device cpu`` runs the "device" side on the CPU as well: every step the GPU
machine runs (device run, CPU reference subprocess, same-SAE decomposition and analyses, bf16,
torchrun in a gloo process group, a small timing run) runs for real on one family. A tolerance
scale of 0 demands exact equality, which the bfloat16 LM cannot meet against float32: the
check must then fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import offline_env

ROOT = Path(__file__).resolve().parents[2]


def gpu_check(out: Path, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    env = {**offline_env(), "PYTHON": sys.executable, "GPU_CHECK_LIMIT_S": str(int(timeout))}
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--no-install", "--device", "cpu",
           "--families", "llama", "--n-contexts", "96", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout + 60, check=False)


def rows_of(out: Path) -> dict[str, dict]:
    return {r["check"]: r for r in json.loads((out / "summary.json").read_text())}


@pytest.mark.slow
@pytest.mark.soak
def test_every_step_passes_on_cpu_and_prints_the_table(tmp_path):
    out = tmp_path / "out"
    done = gpu_check(out, "--checks", "families,bf16,torchrun,timing", "--n-contexts", "64",
                     "--timing-contexts", "32")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    rows = rows_of(out)
    expected = ["environment", "install", "llama run", "llama harvest", "llama train",
                "llama decompose", "llama analyses", "llama bf16 vs float32",
                "timing harvest", "timing train", "timing fit", "torchrun 1 GPU (gloo)"]
    assert list(rows) == expected
    assert rows["install"]["status"] == "SKIP"  # --no-install
    assert all(rows[c]["status"] == "PASS" for c in expected if c != "install"), rows
    # the table, with the counts line under it
    header = next(line for line in done.stdout.splitlines() if "status" in line)
    assert all(col in header for col in ("check", "result", "device s", "CPU s"))
    assert "gpu_check: 11 PASS, 0 FAIL, 1 SKIP" in done.stdout
    # Same device on both sides: the same SAEs decompose identically and the torchrun harvest
    # equals the single-process one; bfloat16 really differs from float32 (and within bounds).
    assert rows["llama decompose"]["result"].startswith("max |Δ| 0 ")
    assert rows["llama harvest"]["result"].startswith("max rel Δ 0 ")
    bf16 = rows["llama bf16 vs float32"]["result"]
    assert not bf16.startswith("max |Δ| 0 ") and "× tol" in bf16
    assert rows["llama run"]["cpu_s"] > 0 and rows["llama run"]["device_s"] > 0
    assert "4,096 tokens with loss" in rows["timing harvest"]["result"]  # 32 x 128
    group = json.loads((out / "llama" / "torchrun_group.json").read_text())
    assert group["backend"] == "gloo" and group["world_size"] == 1
    for run in ("cpu", "device", "device_bf16", "torchrun"):
        assert (out / "llama" / run / "report.html").is_file(), run


@pytest.mark.slow
@pytest.mark.soak
def test_an_impossible_tolerance_fails_the_check(tmp_path):
    out = tmp_path / "out"
    done = gpu_check(out, "--checks", "bf16", "--tolerance-scale", "0", "--n-contexts", "32")
    assert done.returncode == 1, done.stdout[-5000:] + done.stderr[-3000:]
    rows = rows_of(out)
    assert rows["llama run"]["status"] == "PASS"
    assert rows["llama bf16 vs float32"]["status"] == "FAIL"
    assert "FAIL" in done.stdout and "1 FAIL" in done.stdout


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--families", "llama,bert",
         "--out", str(tmp_path / "out")],
        env=offline_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2 and "--families: unknown ['bert']" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_without_a_gpu_cuda_fails_at_once_with_the_reason(tmp_path):
    out = tmp_path / "out"
    env = {**offline_env(), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--no-install",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 1
    rows = rows_of(out)
    env_row = rows["environment"]
    assert env_row["status"] == "FAIL" and "sees no GPU" in env_row["result"]
    assert not (out / "llama").exists()  # nothing ran
