"""Plain helpers shared by the tests: paths, processes, run and store builders, small SAEs,
autointerp examples, damaged files, metrics.

Fixtures live in ``conftest.py``; this module is importable as ``helpers`` because pytest puts
the folder of the top-level ``conftest.py`` on ``sys.path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from sae_darkmatter import (
    CorpusConfig,
    HarvestConfig,
    ModelConfig,
    RunConfig,
    SAETrainConfig,
    SplitConfig,
)
from sae_darkmatter._io import write_json
from sae_darkmatter.config import DecomposeConfig, DownstreamConfig, TranscoderConfig
from sae_darkmatter.decompose import decompose_many
from sae_darkmatter.harvest import harvest
from sae_darkmatter.saes import TopKSAE, train_sae
from sae_darkmatter.saes.archs import ARCHITECTURES
from sae_darkmatter.splits import make_splits
from sae_darkmatter.store import ActivationStore

SRC = Path(__file__).resolve().parents[1] / "src"
BIN = Path(sys.executable).parent  # the environment's console scripts (darkmatter, torchrun)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------- processes


def offline_env() -> dict[str, str]:
    """This process's environment, offline (no Hugging Face Hub) and with one OpenMP thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_ok(cmd: list[str], cwd: Path, timeout: float) -> str:
    """Run ``cmd`` in ``offline_env()``; assert it succeeds and return its stdout + stderr."""
    done = subprocess.run(
        cmd, cwd=cwd, env=offline_env(), capture_output=True, text=True, timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


# --------------------------------------------------------------------------- hub cache


def cached_hub_repo(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` at ``main`` in the hub cache layout."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


# --------------------------------------------------------------------------- runs and stores


def tiny_run_config(model_dir: Path) -> RunConfig:
    """The whole pipeline on a tiny model: 96 contexts of 32 tokens, three TopK SAEs, the same
    widths of transcoders and skip transcoders of layer 2's MLP; one extra round of downstream
    contexts at most (the stopping rule has its own tests)."""
    return RunConfig(
        harvest=HarvestConfig(
            model=ModelConfig(name=str(model_dir)),
            corpus=CorpusConfig(n_contexts=96, context_length=32),
            hooks=("resid_post.2",), batch_size=16, contexts_per_shard=32,
        ),
        train=SAETrainConfig(widths=(64, 128, 256), ks=(8,), train_tokens=6000, batch_size=512),
        downstream=DownstreamConfig(max_contexts=16),
        transcoders=TranscoderConfig(enabled=True, train=SAETrainConfig(
            architecture="batchtopk", widths=(64, 128, 256), ks=(8,), train_tokens=6000,
            batch_size=512)),
    )


def make_run(model_dir: Path, out: Path, hook: str, *, n_contexts: int = 48, length: int = 32,
             widths: tuple[int, ...] = (64, 128), ks: tuple[int, ...] = (8,)) -> Path:
    """A tiny run folder as the pipeline lays it out: store (no per-token loss,
    as by default), SAEs, decompositions."""
    store = harvest(HarvestConfig(model=ModelConfig(name=str(model_dir)),
                                  corpus=CorpusConfig(n_contexts=n_contexts, context_length=length),
                                  hooks=(hook,), batch_size=16, contexts_per_shard=16),
                    out / "store", progress=False)
    splits = make_splits(store, SplitConfig(), hook=hook)
    x = store.gather(hook, splits.sae_train)
    train_cfg = SAETrainConfig(widths=widths, ks=ks, train_tokens=3000, batch_size=256)
    saes = {}
    for k in ks:
        for width in widths:
            name = f"topk-w{width}-k{k}"
            saes[name] = train_sae(x, width=width, k=k, cfg=train_cfg, out_dir=out / "saes" / name,
                                   progress=False)
    outputs = decompose_many(store, saes, splits, DecomposeConfig(), hook=hook, progress=False)
    for name, res in outputs.items():
        res.save(out / "decompose" / f"{name}.safetensors")
        write_json(
            out / "decompose" / f"{name}.json",
            {
                "name": name,
                "sae": {
                    "path": str(out / "saes" / name),
                    "architecture": "topk",
                    "k": saes[name].k,
                },
                "data": splits.summary(),
                "metrics": res.metrics.to_dict(),
                "probe_file": f"{name}.safetensors",
            },
        )
    return out


def sparse_code_store(
    path: Path, *, d: int, n_ctx: int, per_append: int, mean: float, meta: dict, seed: int = 0
) -> tuple[ActivationStore, np.ndarray]:
    """A ``resid_post.1`` store of 16-token contexts: ``mean`` + sparse non-negative codes on 48
    random directions + noise, appended ``per_append`` contexts at a time; and the directions."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(48, d))
    st = ActivationStore.create_or_resume(
        path, hooks={"resid_post.1": d}, context_length=16, meta=meta
    )
    for start in range(0, n_ctx, per_append):
        n = per_append * 16
        codes = rng.exponential(size=(n, 48)) * (rng.random((n, 48)) < 0.1)
        x = mean + codes @ dirs + 0.3 * rng.normal(size=(n, d))
        st.append(
            context_start=start,
            acts={"resid_post.1": x.reshape(per_append, 16, d).astype(np.float32)},
            tokens=rng.integers(5, 100, size=(per_append, 16)),
            loss=None,
        )
    return st, dirs


# --------------------------------------------------------------------------- small SAEs


def direction_sae(dirs: np.ndarray, width: int, k: int, seed: int, mean: float) -> TopKSAE:
    """A TopK SAE whose decoder rows are ``dirs`` (tiled, unit norm), encoder the same, and
    decoder bias ``mean``: a crude but sensible dictionary for a ``sparse_code_store``."""
    sae = TopKSAE(dirs.shape[1], width, k, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(np.tile(dirs, (2, 1))[:width]).float())
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.fill_(mean)
    return sae


def training_sae(
    arch: str, d_in: int = 20, width: int = 50, sparsity: float = 5, seed: int = 0
):
    """A training SAE of ``arch`` with seeded random biases (and JumpReLU thresholds)."""
    gen = torch.Generator().manual_seed(seed + 1)
    sae = ARCHITECTURES[arch].trainer(d_in, width, sparsity,
                                      b_dec=torch.randn(d_in, generator=gen), seed=seed)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(width, generator=gen) * 0.3)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(width, generator=gen) * 0.5)
    return sae


# --------------------------------------------------------------------------- autointerp

AUTOINTERP_HOOK = "resid_post.2"  # the hook of the autointerp tests' tiny run


def collect_examples_of(
    hook: str, run_dir: Path, cfg, tokenizer, spec: str = "topk-w64-k8", sae=None
):
    """Autointerp examples of one SAE of ``run_dir`` (``sae`` replaces the loaded one): the
    examples, the windows they come from, and the SAE."""
    from sae_darkmatter.autointerp import collect_examples, resolve_sae
    from sae_darkmatter.autointerp.choose import RunData
    from sae_darkmatter.run_dir import RunDir
    from sae_darkmatter.saes import load_sae

    data = RunData(RunDir(run_dir), cfg, tokenizer)
    choice = resolve_sae(run_dir, spec)
    sae = sae if sae is not None else load_sae(choice.spec).eval()
    windows = data.windows(data.hook_of(choice, hook))
    found = collect_examples(
        [(sae, choice.input)], data.parts(hook, choice.base), windows, cfg, tokenizer
    )
    return found[0], windows, sae


# --------------------------------------------------------------------------- damage


def flip_byte(path: Path, offset_from_end: int, *, later_mtime: bool = False) -> None:
    """Invert one byte of ``path``; ``later_mtime``: also move its mtime one second on (damage
    that happens after the write)."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))
    if later_mtime:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


class PicklePayload:
    """Unpickling this calls open(marker, "w"): code execution, if a loader allows it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --------------------------------------------------------------------------- metrics


def float64_fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² in float64 (x̄ the per-dimension mean)."""
    x64, e = x.double(), (x - x_hat).double()
    return float(e.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())
