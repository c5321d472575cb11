"""Peak memory of decomposing a wide SAE: latents encoded ``latent_rows`` rows at a time (ours)
against whole chunks at once (what the decomposition did before; the alternative).

A synthetic store of N tokens at d = 640 (Gemma 3 270M's width) and a random JumpReLU SAE of
width W (default 262,144, Gemma Scope 2's 262k); ``decompose`` with ``chunk_rows`` rows per
chunk. The alternative sets ``LATENT_BLOCK`` so high that a whole chunk is encoded at once,
whose dense latents take chunk_rows x W x 4 bytes (8,192 x 1M: 34 GB). Each case runs in its
own process; printed: time, peak anonymous memory above the start, and the ratio.

    python benchmarks/bench_wide_sae.py [--width 262144] [--tokens 8192] [--chunk-rows 2048]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D = 640


def make_store(path: Path, n_tokens: int) -> None:
    from sae_darkmatter.store import ActivationStore

    rng = np.random.default_rng(0)
    store = ActivationStore.create_or_resume(
        path, hooks={"resid_post.12": D}, context_length=64, meta={}
    )
    n_ctx = n_tokens // 64
    x = rng.normal(size=(n_ctx, 64, D)).astype(np.float32)
    store.append(
        context_start=0,
        acts={"resid_post.12": x},
        tokens=rng.integers(5, 100, (n_ctx, 64)),
        loss=None,
    )
    store.finish()


def child(store_path: str, width: int, chunk_rows: int, whole_chunks: bool) -> None:
    import torch

    from _memory import PeakAnon
    from sae_darkmatter import DecomposeConfig, JumpReLUSAE, SplitConfig, decompose, make_splits
    from sae_darkmatter.saes import topk
    from sae_darkmatter.store import ActivationStore

    if whole_chunks:
        topk.LATENT_BLOCK = 1 << 62
    store = ActivationStore.open(store_path)
    splits = make_splits(store, SplitConfig(sae_train_fraction=0.0))
    sae = JumpReLUSAE(D, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.threshold.fill_(2.0)  # ~2 % of the latents fire on unit-variance inputs
    t = time.perf_counter()
    with PeakAnon() as peak:
        out = decompose(store, sae, splits, DecomposeConfig(chunk_rows=chunk_rows), progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": peak.peak - peak.base,
                      "fvu": out.metrics.fvu, "l0": out.metrics.l0}))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--width", type=int, default=1 << 18)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk-rows", type=int, default=2048)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.width, args.chunk_rows, args.child[1] == "whole")
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_store(Path(tmp) / "store", args.tokens)
        results = {}
        for case in ("blocks", "whole"):
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--width",
                    str(args.width),
                    "--chunk-rows",
                    str(args.chunk_rows),
                    "--child",
                    str(Path(tmp) / "store"),
                    case,
                ],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                check=False,
            )
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    dense_mb = args.chunk_rows * args.width * 4 / 2**20
    print(
        f"decompose, W = {args.width:,}, d = {D}, {args.tokens:,} tokens, "
        f"chunks of {args.chunk_rows:,} rows (dense latents of a chunk: {dense_mb:,.0f} MB)"
    )
    for case, label in (
        ("blocks", "ours: latent_rows at a time"),
        ("whole", "whole chunks at once"),
    ):
        r = results[case]
        print(f"  {label:28s} {r['seconds']:7.1f} s   peak +{r['peak_mb']:7,.0f} MB   "
              f"FVU {r['fvu']:.6f}  L0 {r['l0']:.1f}")
    b, w = results["blocks"], results["whole"]
    print(f"  ours / whole chunks: time {b['seconds'] / w['seconds']:.2f}x, peak memory "
          f"{b['peak_mb'] / w['peak_mb']:.2f}x; same FVU: {abs(b['fvu'] - w['fvu']) < 1e-6}")


if __name__ == "__main__":
    main()
