"""The decomposition's probe fit on real SmolLM2 activations: ``StreamingLstsq`` with float64
and float32 block products against ``torch.linalg.lstsq(driver="gels")``.

Data: layer-15 residual activations (``resid_post.15``) of the embedded SmolLM2-135M, from a
store given with ``--store`` (read only) or harvested into a temp store (``--contexts`` contexts
of 128 tokens, no loss). Rows pass the default token filter (position 0, special tokens and norm
outliers out). ``--saes`` TopK SAEs (width 1024·i, k = 32) are trained briefly on the SAE-train
split; the target is the decomposition's: each SAE's ``[e, ‖e‖²]`` side by side
(``SAEErrors.probe_targets``), so ``--saes 1`` is one SAE's probes (577 columns) and
``--saes 12`` the default run's joint system (6,924 columns). Fits use the first ``--n``
probe-train rows, scores the probe-test rows (up to 50,000).

Methods, each in its own subprocess (clean peak RSS; data loaded from temp .npy files first):
- ``streaming-f64``: ``StreamingLstsq`` with float64 block products (``gemm_dtype="float64"``);
- ``streaming-f32``: the same with float32 products (``gemm_dtype="float32"``, the default);
  both fed the chunks ``decompose_many`` uses (``chunk_size``);
- ``gemm-f32``: plain float32 ``torch.mm`` of the products, ``[1, x]ᵀ[1, x, y]`` per 8,192
  rows (the streaming fit skips XᵀX's blocks below the diagonal, so it can beat this);
- ``lstsq-gels``: ``torch.linalg.lstsq([x, 1], y, driver="gels")`` in float32.

Reported: wall time of the fit, peak RSS above the loaded data, held-out R² (mean over every
target column, and pooled over the error columns), their absolute differences from
``streaming-f64`` and the time and memory ratios against ``lstsq-gels``.

    python benchmarks/bench_fit.py [--store PATH | --contexts 1000] [--n 100000] [--saes 1]
        [--threads 2] [--rounds 3] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_darkmatter.config import (
    CorpusConfig,
    DecomposeConfig,
    HarvestConfig,
    ModelConfig,
    SAETrainConfig,
    SplitConfig,
)
from sae_darkmatter.decompose.core import SAEErrors, chunk_size
from sae_darkmatter.harvest import harvest
from sae_darkmatter.linalg import LinearProbe, R2Accumulator, StreamingLstsq
from sae_darkmatter.saes import train_sae
from sae_darkmatter.splits import make_splits
from sae_darkmatter.store import ActivationStore

HOOK = "resid_post.15"
N_TEST = 50_000
METHODS = ("streaming-f64", "streaming-f32", "gemm-f32", "lstsq-gels")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def prepare(args: argparse.Namespace, folder: Path) -> str:
    """Write x, y (probe-train) and xt, yt (probe-test) to ``folder``; return a summary line."""
    t0 = time.perf_counter()
    if args.store:
        store = ActivationStore.open(args.store)
    else:
        cfg = HarvestConfig(model=ModelConfig(name="smollm2"),
                            corpus=CorpusConfig(n_contexts=args.contexts, context_length=128),
                            hooks=(HOOK,), batch_size=16, contexts_per_shard=128)
        store = harvest(cfg, folder / "store", progress=False)
    harvested = time.perf_counter() - t0
    splits = make_splits(store, SplitConfig(sae_train_fraction=0.1, seed=0), hook=HOOK)
    x_sae = store.gather(HOOK, splits.sae_train[:200_000])
    saes = {
        f"topk-w{1024 * (i + 1)}": train_sae(
            x_sae, width=1024 * (i + 1), k=32, out_dir=folder / f"sae{i}", progress=False,
            cfg=SAETrainConfig(train_tokens=args.sae_tokens, batch_size=1024, device="cpu"))
        for i in range(args.saes)
    }
    del x_sae
    errors = SAEErrors(saes, dict.fromkeys(saes), HOOK, torch.device("cpu"))
    parts = {"x": splits.probe_train[: args.n], "xt": splits.probe_test[:N_TEST]}
    for name, rows in parts.items():
        x = store.gather(HOOK, rows)
        y = torch.cat([errors.probe_targets(b, lambda i: (i, i)) for b in x.split(8192)])
        np.save(folder / f"{name}.npy", x.numpy())
        np.save(folder / f"{name.replace('x', 'y')}.npy", y.numpy())
    return (f"store {store.n_rows:,} tokens ({'given' if args.store else 'harvested'} in "
            f"{harvested:.0f} s); N = {parts['x'].size:,} probe-train rows fitted, "
            f"{parts['xt'].size:,} probe-test rows scored; d_in = {store.d(HOOK)}, "
            f"d_out = {args.saes} x {store.d(HOOK) + 1} ({args.saes} SAE(s)' [e, ‖e‖²])")


def fit(method: str, x: torch.Tensor, y: torch.Tensor, n_saes: int) -> LinearProbe:
    d = x.shape[1]
    if method.startswith("streaming"):
        cfg = DecomposeConfig(gemm_dtype="float32" if method == "streaming-f32" else "float64")
        acc = StreamingLstsq(d, y.shape[1], gemm_dtype=getattr(torch, cfg.gemm_dtype))
        chunk = chunk_size(cfg, n_saes, d)
        for i in range(0, x.shape[0], chunk):
            acc.update(x[i : i + chunk], y[i : i + chunk])
        return acc.solve()
    a = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    w = torch.linalg.lstsq(a, y, driver="gels").solution.double()
    return LinearProbe(weight=w[:-1], bias=w[-1])


def gemms(x: torch.Tensor, y: torch.Tensor) -> None:
    """Only the products: [1, x]ᵀ[1, x, y] in float32, 8,192 rows at a time."""
    d = x.shape[1]
    total = torch.zeros(d + 1, d + 1 + y.shape[1], dtype=torch.float32)
    for i in range(0, x.shape[0], 8192):
        a = torch.cat([torch.ones(len(x[i : i + 8192]), 1), x[i : i + 8192], y[i : i + 8192]], 1)
        total += a[:, : d + 1].T @ a


def child(method: str, folder: Path, n_saes: int, threads: int, repeats: int) -> None:
    """Run one method on the saved data; print a JSON line with time, memory and scores."""
    x = torch.from_numpy(np.load(folder / "x.npy"))
    y = torch.from_numpy(np.load(folder / "y.npy"))
    xt = torch.from_numpy(np.load(folder / "xt.npy"))
    yt = torch.from_numpy(np.load(folder / "yt.npy"))
    torch.set_num_threads(threads)
    base = rss_bytes()
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        probe = gemms(x, y) if method == "gemm-f32" else fit(method, x, y, n_saes)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    times = {"method": method, "seconds": min(walls), "cpu_seconds": min(cpus)}
    if probe is None:
        print(json.dumps(times))
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    d = x.shape[1]
    err_cols = torch.tensor([c for c in range(y.shape[1]) if c % (d + 1) != d])
    pred = probe.predict(xt)
    every, errs = R2Accumulator(y.shape[1]), R2Accumulator(err_cols.numel())
    every.update(yt, pred)
    errs.update(yt[:, err_cols], pred[:, err_cols])
    print(json.dumps({**times, "peak_gb": max(peak - base, 0) / 1e9,
                      "r2_mean_dim": every.r2_mean_dim(), "r2_err_pooled": errs.r2_pooled()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--store", type=Path, help="a store with resid_post.15 (read only)")
    parser.add_argument("--contexts", type=int, default=1000, help="harvested without --store")
    parser.add_argument("--n", type=int, default=100_000, help="probe-train rows fitted")
    parser.add_argument("--saes", type=int, default=1, help="SAEs in the joint target")
    parser.add_argument("--sae-tokens", type=int, default=60_000, help="training tokens per SAE")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=1,
                        help="fits per method; the fastest counts (wall and CPU time apart)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds over all methods (each in a fresh process); fastest counts")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.saes, args.threads, args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(prepare(args, folder))
        print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.rounds} "
              f"round(s) x {args.repeats} fit(s) per method", flush=True)
        by: dict[str, dict] = {}
        for rnd in range(args.rounds):  # rounds interleave the methods: load changes hit all
            for method in METHODS:
                cmd = [sys.executable, __file__, "--child", method, "--folder", str(folder),
                       "--saes", str(args.saes), "--threads", str(args.threads),
                       "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"  round {rnd + 1}, {method}: {r['seconds']:.2f} s", flush=True)
                best = by.setdefault(method, r)
                for key in ("seconds", "cpu_seconds"):
                    best[key] = min(best[key], r[key])
    rows = [by[m] for m in METHODS]
    gels, f64 = by["lstsq-gels"], by["streaming-f64"]
    print(f"\n{'method':<15}{'wall s':>8}{'CPU s':>8}{'peak GB':>9}{'R² mean-dim':>13}"
          f"{'R² err pooled':>15}{'|Δ mean-dim|':>14}{'|Δ pooled|':>12}{'wall/gels':>11}"
          f"{'CPU/gels':>10}{'mem/gels':>10}")
    for r in rows:
        ratios = (f"{r['seconds'] / gels['seconds']:>11.3f}"
                  f"{r['cpu_seconds'] / gels['cpu_seconds']:>10.3f}")
        if r["method"] == "gemm-f32":
            print(f"{r['method']:<15}{r['seconds']:>8.2f}{r['cpu_seconds']:>8.2f}"
                  f"{'(plain float32 mm of the full products)':>63}{ratios}")
            continue
        dm = abs(r["r2_mean_dim"] - f64["r2_mean_dim"])
        dp = abs(r["r2_err_pooled"] - f64["r2_err_pooled"])
        print(f"{r['method']:<15}{r['seconds']:>8.2f}{r['cpu_seconds']:>8.2f}{r['peak_gb']:>9.3f}"
              f"{r['r2_mean_dim']:>13.7f}{r['r2_err_pooled']:>15.7f}{dm:>14.1e}{dp:>12.1e}"
              f"{ratios}{r['peak_gb'] / gels['peak_gb']:>10.3f}")
    f32 = by["streaming-f32"]
    for key, what in (("seconds", "wall"), ("cpu_seconds", "CPU")):
        print(f"{what} time: streaming-f32 is {gels[key] / f32[key]:.2f}x as fast as gels and "
              f"{f64[key] / f32[key]:.2f}x as fast as streaming-f64, at "
              f"{by['gemm-f32'][key] / f32[key]:.2f}x the rate of plain float32 mm of the products")

if __name__ == "__main__":
    main()
