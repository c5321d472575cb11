"""Cross-layer analysis: one Gram pass with sliced sub-systems (ours) against the former three
passes (the probe, then one least-squares system per predictor set, then scoring), same data.

The former algorithm is the module as of commit 5edc0cd (``git show``, imported from a temp
file), so it is the code that ran before, not a re-implementation. Both call ``cross_layer``
on a run folder's store, splits, SAEs (``find_hook_saes``) and settings, each in its own
process (clean peak memory; the store's pages are warm after a first read). Printed: time,
peak anonymous memory above the start, the time ratio, and the largest difference between the
two results' numbers (every R², FVU and share).

    python benchmarks/bench_cross_layer.py RUN [--repeat 1] [--rows N] [--ref 5edc0cd]

RUN: a run folder with a multi-hook store and SAEs for its hooks (e.g. a default
``darkmatter run``); it is only read.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODULE = "src/sae_darkmatter/analyses/cross_layer.py"


def child(run_path: str, module: str | None, rows: int | None) -> None:
    """Run ``cross_layer`` (the given old module's, or the installed one) and print JSON."""
    import dataclasses
    import importlib.util

    from _memory import PeakAnon
    from sae_darkmatter.analyses import cross_layer as new
    from sae_darkmatter.run_dir import RunDir
    from sae_darkmatter.saes import load_sae

    impl: Any = new
    if module is not None:
        spec = importlib.util.spec_from_file_location("cross_layer_old", module)
        assert spec is not None and spec.loader is not None
        impl = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(impl)
    run = RunDir(run_path)
    cfg = run.config
    store = run.store
    target = next(iter(store.hooks))
    dirs = new.find_hook_saes(run.saes_path, list(store.hooks), target)
    saes = {h: load_sae(p) for h, p in dirs.items()}
    splits = run.splits(cfg.split, hook=target)
    if rows is not None:  # the first (sorted) rows of each probe split
        splits = dataclasses.replace(
            splits, probe_train=splits.probe_train[:rows], probe_test=splits.probe_test[:rows]
        )
    for h in dirs:  # warm the page cache for the rows both passes read
        for _ in store.iter_chunks(h, splits.probe_train, 65536):
            pass
        for _ in store.iter_chunks(h, splits.probe_test, 65536):
            pass
    with PeakAnon() as mem:
        t = time.perf_counter()
        result = impl.cross_layer(store, saes, target, splits, cfg.cross_layer, progress=False)
        seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "peak_mb": mem.peak - mem.base, "result": result,
                      "saes": {h: Path(p).name for h, p in dirs.items()},
                      "n_train": int(splits.probe_train.size)}))


def numbers(tree: Any, path: str = "") -> dict[str, float]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in numbers(sub, f"{path}/{key}").items()}
    return {path: float(tree)} if isinstance(tree, int | float) else {}


def measure(run: str, module: str | None, rows: int | None) -> dict[str, Any]:
    here = Path(__file__).parent
    cmd = [sys.executable, __file__, "--child", run] + (["--module", module] if module else [])
    cmd += ["--rows", str(rows)] if rows else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=here).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--repeat", type=int, default=1, help="old/new pairs, run alternately")
    ap.add_argument("--rows", type=int, help="use the first ROWS probe-train and probe-test rows")
    ap.add_argument("--ref", default="5edc0cd", help="the commit of the former module")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--module", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.run, args.module, args.rows)
        return
    root = Path(__file__).resolve().parent.parent
    old_src = subprocess.run(["git", "show", f"{args.ref}:{MODULE}"], cwd=root, check=True,
                             capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        old_path = Path(tmp) / "cross_layer_old.py"
        old_path.write_text(old_src)
        runs: dict[str, list[dict[str, Any]]] = {"three passes (old)": [], "one Gram (new)": []}
        for _ in range(args.repeat):
            runs["three passes (old)"].append(measure(args.run, str(old_path), args.rows))
            runs["one Gram (new)"].append(measure(args.run, None, args.rows))
    first = runs["one Gram (new)"][0]
    print(f"run {args.run}: SAEs {first['saes']}, {first['n_train']:,} probe-train / "
          f"{first['result']['n_probe_test']:,} probe-test tokens, "
          f"{len(first['result']['predictors'])} predictor sets")
    best = {}
    for name, rs in runs.items():
        best[name] = min(r["seconds"] for r in rs)
        times = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        peak = max(r["peak_mb"] for r in rs)
        print(f"{name:>20}: {best[name]:6.1f} s (runs: {times}), peak +{peak:,.0f} MB")
    pairs = ", ".join(f"{o['seconds'] / n['seconds']:.2f}x" for o, n in
                      zip(runs["three passes (old)"], runs["one Gram (new)"]))
    print(f"time ratio old / new: {best['three passes (old)'] / best['one Gram (new)']:.2f}x "
          f"(fastest of each; per pair: {pairs})")
    old, new = numbers(runs["three passes (old)"][0]["result"]), numbers(first["result"])
    diffs = {k: abs(new[k] - v) / max(abs(v), 1e-12) for k, v in old.items() if math.isfinite(v)}
    worst = max(diffs, key=lambda k: diffs[k])
    print(f"results: {len(diffs)} numbers, largest relative difference {diffs[worst]:.1e} "
          f"({worst}: {old[worst]:.9g} vs {new[worst]:.9g})")


if __name__ == "__main__":
    main()
