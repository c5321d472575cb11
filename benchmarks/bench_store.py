"""Read throughput of ActivationStore against a plain ``np.load`` of the same data from one .npy.

Builds a ~200 MB float32 store (d=576, shards of 16 contexts x 128 tokens, as a harvest writes
them) in a temp folder, plus the same matrix as an .npy, then times (page cache warm):

- ``np.load``: the whole .npy into RAM (the baseline the ratios refer to);
- ``iter_chunks``: a full pass, first in this process (sha256 of every shard) and again (cached);
- ``iter_chunks(rows=...)``: a random half of the rows (a probe split);
- ``gather``: random 4096-row batches (SAE training) and a random half (loading a split),
  against fancy indexing of the .npy (memory-mapped and loaded).

Each read touches every shard, so small shards cost per-shard overhead: compare
``--shard-contexts 16`` (4.7 MB shards) with ``--shard-contexts 128`` (38 MB).

Run:
``python benchmarks/bench_store.py [--mb 200] [--dtype float32|bfloat16] [--shard-contexts 16]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sae_darkmatter.store import ActivationStore
from sae_darkmatter.store import verify as store_verify

D, T = 576, 128


def timed(fn: Callable[[], object], repeat: int = 5) -> float:
    """Best wall time of ``repeat`` calls (the machines are shared and noisy)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def build(folder: Path, mb: float, dtype: str, b: int) -> tuple[ActivationStore, Path]:
    n_batches = max(1, round(mb * 1e6 / (b * T * D * 4)))
    store = ActivationStore.create_or_resume(
        folder / "store", hooks={"h": D}, context_length=T, meta={}, dtype=dtype
    )
    parts = []
    for i in range(n_batches):
        x = np.random.default_rng(i).standard_normal((b, T, D), dtype=np.float32)
        store.append(context_start=i * b, acts={"h": x}, tokens=np.zeros((b, T), np.int64))
        parts.append(x.reshape(-1, D))
    npy = folder / "x.npy"
    np.save(npy, np.concatenate(parts))
    return store, npy


def drain(it) -> None:
    for _ in it:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--mb", type=float, default=200.0, help="store size in MB of float32 activations"
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--shard-contexts", type=int, default=16, help="contexts of 128 tokens per append/shard"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _, npy = build(Path(tmp), args.mb, args.dtype, args.shard_contexts)
        print(f"built store in {time.perf_counter() - t0:.1f} s")
        store = ActivationStore.open(Path(tmp) / "store")
        n = store.n_rows
        nbytes = n * D * 4  # float32 bytes delivered, whatever the store dtype
        rng = np.random.default_rng(0)
        shuffled = rng.choice(n, n // 2, replace=False)
        half = np.sort(shuffled)
        batches = [rng.integers(0, n, 4096) for _ in range(20)]
        print(
            f"{n:,} rows x {D} ({nbytes / 1e6:.0f} MB as float32), "
            f"{len(list(store.path.glob('shard_*')))} shards, dtype {args.dtype}"
        )

        base = timed(lambda: np.load(npy))
        store_verify._VERIFIED.clear()  # forget the writer's hashes: time a reader's first pass
        t_first = timed(lambda: drain(store.iter_chunks("h")), repeat=1)
        rows_per_s = {
            "np.load (whole .npy)": (n, base),
            "iter_chunks, 1st pass (sha256)": (n, t_first),
            "iter_chunks, later passes": (n, timed(lambda: drain(store.iter_chunks("h")))),
            "verify() (sha256 only)": (n, timed(store.verify, repeat=1)),
            "iter_chunks(rows=random half)": (
                len(half),
                timed(lambda: drain(store.iter_chunks("h", rows=half))),
            ),
            "gather(random half, sorted)": (len(half), timed(lambda: store.gather("h", half))),
            "gather(random half, shuffled)": (
                len(half),
                timed(lambda: store.gather("h", shuffled)),
            ),
            "np.load + x[random half, shuffled]": (
                len(half),
                timed(lambda: np.load(npy)[shuffled]),
            ),
            "gather(20 x 4096 random)": (
                20 * 4096,
                timed(lambda: [store.gather("h", b) for b in batches]),
            ),
            "npy mmap x[20 x 4096 random]": (
                20 * 4096,
                timed(lambda: [np.load(npy, mmap_mode="r")[b] for b in batches]),
            ),
        }
        base = min(base, timed(lambda: np.load(npy)))  # best of both ends: the machine is shared
        rows_per_s["np.load (whole .npy)"] = (n, base)
        print(f"{'operation':34s} {'rows/s':>12s} {'MB/s':>9s} {'vs np.load':>10s}")
        for name, (rows, sec) in rows_per_s.items():
            rate = rows / sec
            print(f"{name:34s} {rate:12,.0f} {rate * D * 4 / 1e6:9,.0f} {rate / (n / base):9.2f}x")


if __name__ == "__main__":
    main()
