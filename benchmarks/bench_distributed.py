"""Harvest and decomposition on R torchrun ranks vs one process, same commands and data.

Runs ``darkmatter harvest`` then ``darkmatter decompose`` (one random TopK SAE, d_in of the
model) once as a single process with all cores, and once under
``torchrun --nproc-per-node R`` with the cores split between the ranks (gloo on CPU), and
prints the wall time of each stage, the ratio single/distributed, and checks that the two stores
are byte-identical and the decompositions agree. On a CPU machine the ranks share the same
cores, so the ratio shows what the split costs or gains there; on GPUs each rank has its own.

    python benchmarks/bench_distributed.py [--model smollm2] [--n-contexts 96] [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sae_darkmatter import ModelConfig, TopKSAE, load_model, save_sae
from sae_darkmatter.models import default_hook, hook_dim

BIN = Path(sys.executable).parent


def _timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n-contexts", type=int, default=96)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--width", type=int, default=4096)
    args = ap.parse_args()
    cores = os.cpu_count() or 1

    lm = load_model(ModelConfig(name=args.model))
    hook = default_hook(lm.model)
    d = hook_dim(lm.model, hook)
    del lm
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sae = TopKSAE(d, args.width, 32, generator=torch.Generator().manual_seed(0))
        save_sae(sae, root / "sae", metadata={"hook_name": hook})
        harvest = [
            "harvest",
            "--model",
            args.model,
            "--hook",
            hook,
            "--n-contexts",
            str(args.n_contexts),
            "--context-length",
            str(args.context_length),
            "--batch-size",
            "8",
            "--contexts-per-shard",
            "8",
        ]
        multi = [str(BIN / "torchrun"), "--nproc-per-node", str(args.ranks), "--no-python"]
        times = {}
        for label, prefix, threads in (("1 process", [], cores),
                                       (f"{args.ranks} ranks", multi, max(1, cores // args.ranks))):
            out = root / label.replace(" ", "_")
            times[label] = (
                _timed(
                    [*prefix, str(BIN / "darkmatter"), *harvest, "-o", str(out / "store")], threads
                ),
                _timed(
                    [
                        *prefix,
                        str(BIN / "darkmatter"),
                        "decompose",
                        "--store",
                        str(out / "store"),
                        "--sae",
                        str(root / "sae"),
                        "-o",
                        str(out / "dec"),
                    ],
                    threads,
                ),
            )
        one, many = (root / "1_process", root / f"{args.ranks}_ranks")
        same = (json.loads((one / "store" / "manifest.json").read_text())["shards"]
                == json.loads((many / "store" / "manifest.json").read_text())["shards"])
        fvu = [
            json.loads((r / "dec" / "sae.json").read_text())["metrics"]["fvu_nonlinear"]
            for r in (one, many)
        ]
    tokens = args.n_contexts * args.context_length
    print(
        f"{args.model} {hook}: {tokens:,} tokens, {cores} cores; "
        "times include start-up and model load"
    )
    for label, (h, dcmp) in times.items():
        print(
            f"  {label:>10}: harvest {h:6.1f} s ({tokens / h:,.0f} tok/s), decompose {dcmp:6.1f} s"
        )
    (h1, d1), (hr, dr) = times["1 process"], times[f"{args.ranks} ranks"]
    print(
        f"  ratio 1 process / {args.ranks} ranks: harvest {h1 / hr:.2f}x, decompose {d1 / dr:.2f}x"
    )
    print(f"  stores byte-identical: {same}; fvu_nonlinear {fvu[0]:.8f} vs {fvu[1]:.8f}")


if __name__ == "__main__":
    main()
