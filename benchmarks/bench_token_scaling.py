"""Time and peak memory of the decomposition as the token count grows 10x and 100x.

For N = n, 10n, 100n tokens (default n = 20,000), each in its own subprocess (clean peak RSS): write
an activation store of residual-like float32 activations (d = 576, SmolLM2's width; mean offset and
power-law covariance as in ``bench_lstsq.py``), then run ``decompose_many`` for one TopK SAE
(W = 4,096, k = 32, random weights scaled to the data) over the evaluation split: the streaming
probe fit in float64, then every held-out statistic. Reported per N: wall time of the decomposition,
time per token, peak anonymous memory (``RssAnon``, sampled every 10 ms: file pages that reads map
or cache are the kernel's to drop and would make RSS track the store size) above the value before it
started, and both as ratios to the smallest N. The alternative named for comparison is the in-memory
approach (all of X and e as float32 matrices, as the paper's scripts do), whose size 2·N·d·4 bytes
is printed beside ours: ours should stay flat where it grows with N, and our time should grow
linearly.

Run: ``python benchmarks/bench_token_scaling.py [--n 20000] [--factors 1,10,100]``
(100x = 2M tokens writes a 4.6 GB store to a temp folder and takes several minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _memory import PeakAnon

D, WIDTH, K, CONTEXT = 576, 4096, 32, 128


def _residual_like(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and mixing matrix [D, D]: norms ~170, power-law spectrum (see bench_lstsq.py)."""
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    lam = torch.arange(1, D + 1, dtype=torch.float64) ** -1.56
    lam *= 6400.0 / lam.sum()
    mean = torch.randn(D, generator=g, dtype=torch.float64)
    mean *= 150.0 / mean.norm()
    return mean.float(), (q * lam.sqrt()).T.float()


def _child(n: int, folder: Path) -> dict[str, float]:
    from sae_darkmatter.config import DecomposeConfig, SplitConfig, TokenFilter
    from sae_darkmatter.decompose import decompose_many
    from sae_darkmatter.saes import TopKSAE
    from sae_darkmatter.splits import make_splits
    from sae_darkmatter.store import ActivationStore

    g = torch.Generator().manual_seed(0)
    mean, mix = _residual_like(g)
    store = ActivationStore.create_or_resume(folder, hooks={"resid_post.15": D},
                                             context_length=CONTEXT, meta={})
    per_shard = 256  # contexts: 32,768 tokens, 75 MB per shard
    n_ctx = n // CONTEXT
    for start in range(0, n_ctx, per_shard):
        m = min(per_shard, n_ctx - start)
        x = mean + torch.randn(m * CONTEXT, D, generator=g) @ mix
        store.append(context_start=start, acts={"resid_post.15": x.view(m, CONTEXT, D)},
                     tokens=torch.ones(m, CONTEXT, dtype=torch.int64))
    store.finish()
    sae = TopKSAE(D, WIDTH, k=K)
    with torch.no_grad():  # unit decoder rows, encoder = decoder transposed, b_dec = data mean
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(WIDTH, D, generator=g), dim=1))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(mean)
    splits = make_splits(
        store,
        SplitConfig(
            filter=TokenFilter(skip_positions=0, max_norm_ratio=None), sae_train_fraction=0.0
        ),
        special_ids=[],
    )
    with PeakAnon() as mem:
        t = time.perf_counter()
        out = decompose_many(store, {"sae": sae}, splits, DecomposeConfig(), progress=False)
        seconds = time.perf_counter() - t
    return {
        "n": n,
        "seconds": seconds,
        "rss_mb": mem.peak - mem.base,
        "fvu": out["sae"].metrics.fvu,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--factors", default="1,10,100")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(int(args.child[0]), Path(args.child[1]))))
        return
    rows = []
    for f in (int(v) for v in args.factors.split(",")):
        n = args.n * f // CONTEXT * CONTEXT
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(n), str(Path(tmp) / "store")],
                capture_output=True,
                text=True,
                check=True,
            )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"N = {r['n']:>9,}: decompose {r['seconds']:7.1f} s "
            f"({r['seconds'] / r['n'] * 1e6:6.1f} us/token), "
            f"peak anon. memory +{r['rss_mb']:6.0f} MB (in-memory X and e: "
            f"{2 * r['n'] * D * 4 / 2**20:7.0f} MB), "
            f"FVU {r['fvu']:.3f}",
            flush=True,
        )
    first = rows[0]
    for r in rows[1:]:
        print(f"{r['n'] / first['n']:.0f}x tokens: time {r['seconds'] / first['seconds']:.1f}x, "
              f"peak memory {r['rss_mb'] / max(first['rss_mb'], 1):.2f}x "
              f"(in-memory alternative: {r['n'] / first['n']:.0f}x)")


if __name__ == "__main__":
    main()
