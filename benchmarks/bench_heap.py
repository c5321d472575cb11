"""SAE training steps under glibc's 1 MiB mmap threshold vs its steady state.

``limited_heap_growth`` fixes the threshold at 1 MiB during the decomposition's streaming passes
(so their heap cannot fragment); outside them it restores glibc's steady state (32 MiB). This
measures why it must not stay on: TopK training steps (batch 4,096, d_in 576, auxk on 2 % dead
latents) in fresh processes, each mode in turn, ``--repeats`` times; the median ms per step.

    python benchmarks/bench_heap.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time, torch
from sae_darkmatter import _io
from sae_darkmatter.saes.archs import ARCHITECTURES
from sae_darkmatter.saes.archs.base import total_variance
mode = sys.argv[1]
ctx = _io.limited_heap_growth()
if mode in ("limited", "restored"):
    ctx.__enter__()
if mode == "restored":
    ctx.__exit__(None, None, None)
torch.manual_seed(0)
x = torch.randn(4096, 576)
out = {}
for width, k in ((512, 64), (4096, 32)):
    sae = ARCHITECTURES["topk"].trainer(576, width, k, b_dec=torch.zeros(576), seed=0)
    opt = torch.optim.Adam(sae.param_groups(), lr=1e-3)
    tv, dead = total_variance(x), torch.zeros(width, dtype=torch.bool)
    dead[: width // 50] = True
    def step():
        fw = sae(x)
        loss = sae.loss(fw, tv, dead, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.before_step()
        opt.step()
        sae.after_step(fw)
    step(); step()
    t = time.perf_counter()
    for _ in range(8):
        step()
    out[f"W={width} k={k}"] = (time.perf_counter() - t) / 8 * 1e3
print(json.dumps(out))
"""

MODES = ("restored", "limited", "glibc default")


def main() -> None:
    ap = argparse.ArgumentParser(description="training steps under a 1 MiB mmap threshold")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            res = json.loads(subprocess.run([sys.executable, "-c", CHILD, mode], check=True,
                                            capture_output=True, text=True).stdout)
            for case, ms in res.items():
                times[mode].setdefault(case, []).append(ms)
    print("ms per training step (median of", args.repeats, "fresh processes per mode)")
    for case in times["restored"]:
        med = {m: statistics.median(times[m][case]) for m in MODES}
        print(f"{case:14s} " + "  ".join(f"{m} {med[m]:6.1f}" for m in MODES)
              + f"   limited/restored {med['limited'] / med['restored']:.2f}x")


if __name__ == "__main__":
    main()
