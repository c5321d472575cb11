"""Gradient pursuit throughput: the support-based batched version against the dense reference.

For each width, re-encodes the same tokens with ``gradient_pursuit`` (selection by one dense
correlation product per step; coefficients, step sizes and reconstructions on the support via
``embedding_bag``; finished tokens leave the batch) and with ``gradient_pursuit_dense`` (the
straightforward version: dense ``[b, d_sae]`` weights and three dense products per step, as the
paper's code), checks they give the same codes (max |diff|, support agreement) and prints
tokens/s and the speed ratio. Matching pursuit and OMP (support-based) are timed too.

Data: random unit decoder rows and tokens built from 32 of them plus noise (``d_in`` 576, like
SmolLM2), or, with ``--run DIR``, activations of a run folder's store (probe-test rows of its
first hook) with the decoders of the SAEs in ``DIR/saes`` (l0 = 32 still fixed unless given).

Run: ``python benchmarks/bench_pursuit.py [--tokens 512] [--widths 4096 8192 16384] [--run out]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sae_darkmatter.saes.pursuit import gradient_pursuit, gradient_pursuit_dense, pursue

D_IN = 576


def synthetic(
    width: int, n: int, l0: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [n, D_IN], W_dec [width, D_IN] unit rows, b_dec): each token mixes l0 atoms plus noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(width, D_IN, generator=g)
    w /= w.norm(dim=1, keepdim=True)
    idx = torch.randint(0, width, (n, l0), generator=g)
    vals = torch.rand(n, l0, generator=g) * 3
    b = torch.randn(D_IN, generator=g)
    x = torch.nn.functional.embedding_bag(idx, w, per_sample_weights=vals, mode="sum")
    return x + b + 0.3 * torch.randn(n, D_IN, generator=g), w, b


def from_run(run: Path, n: int) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, x, W_dec, b_dec) for every SAE of a run folder, on its store's probe-test tokens."""
    from sae_darkmatter.config import SplitConfig
    from sae_darkmatter.saes import load_sae
    from sae_darkmatter.splits import make_splits
    from sae_darkmatter.store import ActivationStore

    store = ActivationStore.open(run / "store")
    hook = next(iter(store.hooks))
    x = store.gather(hook, make_splits(store, SplitConfig(), hook=hook).probe_test[:n])
    out = []
    for folder in sorted(p for p in (run / "saes").glob("*") if (p / "cfg.json").is_file()):
        sae = load_sae(folder)
        out.append((folder.name, x, sae.W_dec.detach(), sae.b_dec.detach()))
    return sorted(out, key=lambda t: t[2].shape[0])


def timed(repeats: int, fn, *args, **kwargs) -> tuple[float, object]:
    """Best wall time of ``fn(*args, **kwargs)`` over ``repeats`` calls, and its result."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        sync()
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--widths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--l0", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--run", type=Path, default=None, help="a run folder (store + saes/)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    cases = (from_run(args.run, args.tokens) if args.run is not None else
             [(f"random-w{w}", *synthetic(w, args.tokens, args.l0)) for w in args.widths])
    print(f"device={dev}, threads={torch.get_num_threads()}, tokens={args.tokens}, l0={args.l0}, "
          f"d_in={cases[0][1].shape[1]}")
    print(f"{'case':>16} {'width':>6} | {'GP ours tok/s':>13} {'GP dense tok/s':>14} {'ratio':>6} "
          f"{'max|diff|':>9} {'same supp':>9} | {'MP tok/s':>9} {'OMP tok/s':>9}")
    for name, x, w, b in cases:
        x, w, b = x.to(dev), w.to(dev), b.to(dev)
        gradient_pursuit(x[:8], w, b, 2)  # warm-up (allocations, kernels)

        inputs = (x, w, b, args.l0)
        t_ours, ours = timed(args.repeats, gradient_pursuit, *inputs)
        t_dense, dense = timed(args.repeats, gradient_pursuit_dense, *inputs)
        t_mp, _ = timed(args.repeats, pursue, *inputs, method="mp")
        t_omp, _ = timed(args.repeats, pursue, *inputs, method="omp", nonnegative=False)
        ours = ours.to_dense(w.shape[0])
        diff = float((ours - dense).abs().max())
        same = float(((ours != 0) == (dense != 0)).all(dim=1).float().mean())
        n = x.shape[0]
        print(
            f"{name:>16} {w.shape[0]:>6} | {n / t_ours:>13,.0f} {n / t_dense:>14,.0f} "
            f"{t_dense / t_ours:>5.2f}x {diff:>9.2e} {same:>9.3f} | {n / t_mp:>9,.0f} "
            f"{n / t_omp:>9,.0f}"
        )


if __name__ == "__main__":
    main()
