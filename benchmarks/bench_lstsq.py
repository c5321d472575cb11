"""Streaming least squares (``StreamingLstsq``) against ``torch.linalg.lstsq`` on the full matrix.

Fits Y ≈ [X, 1] W with N = 300,000 training rows, d_in = d_out = 576 (SmolLM2's width), float32
data shaped like residual activations: per-dimension mean offset (norm ~150 plus one "massive"
dimension), anisotropic covariance (power-law spectrum, cond of the centred covariance ~2e4, as
measured on real activations), and a target that is a linear function of the *whitened*
activations plus noise (so low-variance directions matter, as they do for SAE errors).

Methods, each in its own subprocess (clean peak RSS; data loaded from a temp .npy first):
- ``streaming-f64``: ``StreamingLstsq`` (default float64 block GEMMs), chunks of 65,536 rows;
- ``streaming-f32``: the same with ``gemm_dtype=torch.float32``;
- ``lstsq-gels``: ``torch.linalg.lstsq(A, Y, driver="gels")`` in float32 with a ones column;
- ``lstsq-default``: ``torch.linalg.lstsq(A, Y)`` in float32, CPU default driver ``gelsy``,
  whose default rcond = eps·max(m, n) (~0.036 here) silently truncates the solution
  (measurements.md, "Least squares": held-out R² 0.011 instead of 0.345 on real activations).

Achievable rate: ``gemm-f64`` / ``gemm-f32`` time only the products a streaming fit cannot avoid
(XᵀX and XᵀY of the same chunks, ones column included, in float64 / float32, plain ``torch.mm``),
i.e. this machine's GEMM limit for this work; ``streaming-*`` time over it says how close the
fit (conversion, centring, the solve, bookkeeping) comes to that limit. GFLOP/s counts
2·N·(d+1)·(2d+1) multiply-adds for every method.

Reported: wall time of the fit, peak RSS above the loaded data (ru_maxrss minus RSS before the
fit), held-out pooled R² and mean per-dimension R² on 50,000 rows, and ratios against
``lstsq-gels``. Run: ``python benchmarks/bench_lstsq.py [--n 300000] [--skip-default]``.
The same comparison on real SmolLM2 activations and the decomposition's own targets (the
errors of trained SAEs): ``bench_fit.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_darkmatter.linalg import LinearProbe, R2Accumulator, StreamingLstsq

D = 576
N_TEST = 50_000
METHODS = ("streaming-f64", "streaming-f32", "gemm-f64", "gemm-f32", "lstsq-gels", "lstsq-default")
CHUNK = 65536


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Residual-like float32 X [n, D] and target Y [n, D], generated in row blocks."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    lam = torch.arange(1, D + 1, dtype=torch.float64) ** -1.56
    lam *= 6400.0 / lam.sum()  # total variance 6400: norms ~170 with the mean below
    mean = torch.randn(D, generator=g, dtype=torch.float64)
    mean *= 150.0 / mean.norm()
    mean[0] += 60.0
    mix = (q * lam.sqrt()).T.float()
    head = (torch.randn(D, D, generator=g) / math.sqrt(D)).float()
    x, y = np.empty((n, D), np.float32), np.empty((n, D), np.float32)
    for i in range(0, n, 32768):
        m = min(32768, n - i)
        z = torch.randn(m, D, generator=g)
        x[i : i + m] = (mean.float() + z @ mix).numpy()
        y[i : i + m] = (z @ head + 0.3 + 1.2 * torch.randn(m, D, generator=g)).numpy()
    return x, y


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def fit(method: str, x: torch.Tensor, y: torch.Tensor) -> LinearProbe:
    if method.startswith("streaming"):
        dtype = torch.float32 if method == "streaming-f32" else torch.float64
        acc = StreamingLstsq(D, D, gemm_dtype=dtype)
        for i in range(0, x.shape[0], CHUNK):
            acc.update(x[i : i + CHUNK], y[i : i + CHUNK])
        return acc.solve()
    a = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    driver = "gels" if method == "lstsq-gels" else None
    w = torch.linalg.lstsq(a, y, driver=driver).solution.double()
    return LinearProbe(weight=w[:-1], bias=w[-1])


def gemms(dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor) -> None:
    """Only the Gram products of a streaming fit: [x, 1]ᵀ[x, 1] and [x, 1]ᵀy, chunk by chunk."""
    gram = torch.zeros(D + 1, D + 1, dtype=dtype)
    cross = torch.zeros(D + 1, D, dtype=dtype)
    for i in range(0, x.shape[0], CHUNK):
        a = torch.cat([x[i : i + CHUNK], torch.ones(len(x[i : i + CHUNK]), 1)], dim=1).to(dtype)
        gram += a.T @ a
        cross += a.T @ y[i : i + CHUNK].to(dtype)


def child(method: str, folder: Path) -> None:
    """Run one method on the saved data; print a JSON line with time, memory and scores."""
    x = torch.from_numpy(np.load(folder / "x.npy"))
    y = torch.from_numpy(np.load(folder / "y.npy"))
    flops = 2 * x.shape[0] * (D + 1) * (2 * D + 1)
    if method.startswith("gemm"):
        t0 = time.perf_counter()
        gemms(torch.float32 if method == "gemm-f32" else torch.float64, x, y)
        seconds = time.perf_counter() - t0
        print(json.dumps({"method": method, "seconds": seconds, "gflops": flops / seconds / 1e9}))
        return
    xt = torch.from_numpy(np.load(folder / "xt.npy"))
    yt = torch.from_numpy(np.load(folder / "yt.npy"))
    base = rss_bytes()
    t0 = time.perf_counter()
    probe = fit(method, x, y)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    acc = R2Accumulator(D)
    acc.update(yt, probe.predict(xt))
    print(json.dumps({
        "method": method, "seconds": seconds, "peak_above_data_gb": max(peak - base, 0) / 1e9,
        "gflops": flops / seconds / 1e9,
        "r2_pooled": acc.r2_pooled(), "r2_mean_dim": acc.r2_mean_dim(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300_000)
    parser.add_argument("--skip-default", action="store_true", help="skip the slow gelsy run")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder)
        return
    methods = [m for m in METHODS if not (args.skip_default and m == "lstsq-default")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        x, y = make_data(args.n + N_TEST)
        for name, arr in (
            ("x", x[: args.n]),
            ("y", y[: args.n]),
            ("xt", x[args.n :]),
            ("yt", y[args.n :]),
        ):
            np.save(folder / f"{name}.npy", arr)
        data_gb = (x.nbytes + y.nbytes) * args.n / len(x) / 1e9
        del x, y
        print(f"N={args.n:,} train + {N_TEST:,} held-out rows, d_in=d_out={D} (+bias), float32; "
              f"train data {data_gb:.2f} GB; generated in {time.perf_counter() - t0:.1f} s; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        rows = []
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, "--folder", str(folder)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  done {method}: {rows[-1]['seconds']:.1f} s", flush=True)
    ref = next((r for r in rows if r["method"] == "lstsq-gels"), None)
    print(
        f"\n{'method':<15}{'time s':>9}{'GFLOP/s':>9}{'peak GB':>9}"
        f"{'R² pooled':>11}{'R² mean-dim':>13}"
        f"{'time/gels':>11}{'mem/gels':>10}"
    )
    for r in rows:
        if r["method"].startswith("gemm"):
            print(
                f"{r['method']:<15}{r['seconds']:>9.1f}{r['gflops']:>9.1f}"
                "   (GEMMs only: the achievable limit)"
            )
            continue
        ratios = ("", "")
        if ref:
            mem = r["peak_above_data_gb"] / ref["peak_above_data_gb"]
            ratios = (f"{r['seconds'] / ref['seconds']:.2f}", f"{mem:.3f}")
        print(f"{r['method']:<15}{r['seconds']:>9.1f}{r['gflops']:>9.1f}{r['peak_above_data_gb']:>9.2f}"
              f"{r['r2_pooled']:>11.6f}{r['r2_mean_dim']:>13.6f}{ratios[0]:>11}{ratios[1]:>10}")
    by = {r["method"]: r for r in rows}
    for bits in ("64", "32"):
        ours, limit = by.get(f"streaming-f{bits}"), by.get(f"gemm-f{bits}")
        if ours and limit:
            print(
                f"streaming-f{bits} runs at {limit['seconds'] / ours['seconds']:.2f} of this "
                f"machine's float{bits} GEMM rate for the same products "
                f"({ours['gflops']:.1f} of {limit['gflops']:.1f} GFLOP/s)"
            )


if __name__ == "__main__":
    main()
