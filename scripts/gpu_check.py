"""Whole-pipeline check on one GPU, unattended, against the CPU: ``scripts/gpu_check.sh``.

For tiny random models of every supported family (Llama, Gemma 2, Gemma 3 text, Qwen2, Qwen3,
Mistral, Phi-3, GPT-2, GPT-NeoX: 3 layers, d = 64, a byte-level tokenizer, all built here from
``transformers`` configs; nothing is downloaded) it runs

- the whole pipeline (harvest with loss, a TopK grid, cross-layer SAEs, decomposition, every
  analysis, report) on the device, as ``darkmatter run --device cuda`` configures it, and the
  same ``darkmatter run --device cpu`` in CPU subprocesses alongside;
- harvest: token ids equal, activations at every hook and the per-token loss within float32
  rounding of the CPU's;
- train: SAEs trained on each device from the same data and seed agree in training and
  held-out FVU and L0 within what two seeds give (not bit-equal: TopK amplifies rounding);
- decompose and analyses: the CPU run's own SAEs and store, decomposed and analysed on the
  device (the downstream splices with the LM on the device), give the CPU's metrics, per-token
  errors and every number of every analysis within float32 rounding. This proves more than
  comparing separately trained SAEs: a device fault anywhere in decomposition or analyses moves
  a number far beyond rounding, while separately trained SAEs differ by more than any such
  tolerance could allow.

and then the LM in bfloat16 (Gemma 3's whole pipeline against float32 on the device), the pipeline
under ``torchrun --nproc-per-node 1`` in an NCCL process group (``gpu_check_dist.py``; the
library itself joins no group for one rank), and harvest / training / fit times of a larger
Llama (d = 512, 8 layers, 131k tokens). TF32 is off throughout. Tolerances and why are in
``gpu_check_steps.Tolerances``. It prints one table (PASS / FAIL / SKIP per check, the worst
deviation, device and CPU seconds) and exits 1 on any FAIL.

    python3 scripts/gpu_check.py                        # on CUDA (gpu_check.sh installs first)
    python3 scripts/gpu_check.py --device cpu --families llama --checks families
    python3 scripts/gpu_check.py --tolerance-scale 0    # demand equality: bf16 must FAIL

``--device cpu`` runs the device side on the CPU too, which proves the logic end to end
(tests/e2e/test_gpu_check.py). Results stay in ``--out`` (default: a fresh temp folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import gpu_check_extra as extra
import gpu_check_steps as steps
from gpu_check_models import FAMILIES, RUN_TOML, build_model, build_timing_model
from gpu_check_steps import Family, Row, Tolerances

CHECKS = ("families", "bf16", "torchrun", "timing", "smollm2")
T0 = time.monotonic()
# Each process computes on one CPU thread: a family's worker and its CPU reference run side by
# side, several families at once, and OpenMP threads beyond the cores stall each other (on a
# busy 2-core machine a tiny run's training took 194 s next to another run, each with 2
# threads, and 4 s alone on one thread).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "HF_HUB_OFFLINE": "1"}


class TimeUp(BaseException):
    """The time budget is spent (SIGALRM) or ``timeout`` stopped us (SIGTERM)."""


def _stop(signum: int, _frame: Any) -> None:
    raise TimeUp(signal.Signals(signum).name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="device under test: cuda, cuda:i or cpu")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help=f"comma-separated, from {','.join(FAMILIES)}")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"from {','.join(CHECKS)}")
    p.add_argument("--out", type=Path, help="output folder (default: a fresh temp folder)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="stop and report after this many seconds (checks not run FAIL)")
    p.add_argument("--tolerance-scale", type=float, default=1.0,
                   help="multiply every tolerance (0: demand exact equality)")
    p.add_argument("--n-contexts", type=int, default=192, help="contexts per family run")
    p.add_argument("--corpus", default="stdlib", help="the runs' corpus (default stdlib)")
    p.add_argument("--timing-contexts", type=int, default=1024,
                   help="128-token contexts of the timing run (SAE trained on ~5 epochs)")
    p.add_argument("--jobs", type=int, default=0,
                   help="families checked at once (default: (CPU cores - 2) / 2)")
    p.add_argument("--install", default="", help="(gpu_check.sh) how the install went")
    p.add_argument("--bf16-family", default="gemma3",
                   help="the family of the bf16 check (default gemma3, else the first family)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # one family, in a subprocess
    p.add_argument("--also", default="", help=argparse.SUPPRESS)  # the worker's bf16 / torchrun
    args = p.parse_args(argv)
    for name, allowed in (("families", FAMILIES), ("checks", CHECKS)):
        chosen = [x for x in getattr(args, name).split(",") if x]
        bad = sorted(set(chosen) - set(allowed))
        if bad or not chosen:
            p.error(f"--{name}: unknown {bad or 'empty'}; choose from {','.join(allowed)}")
        setattr(args, name, chosen)
    if args.tolerance_scale < 0:
        p.error("--tolerance-scale must be >= 0")
    if args.bf16_family not in FAMILIES:
        p.error(f"--bf16-family: unknown {args.bf16_family!r}; choose from {','.join(FAMILIES)}")
    return args


# --------------------------------------------------------------------------- one family


class Rows(list[Row]):
    """Rows that are saved to ``path`` as each one is added (a killed worker keeps its rows)."""

    def __init__(self, path: Path | None = None) -> None:
        super().__init__()
        self.path = path

    def append(self, row: Row) -> None:
        super().append(row)
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps([dataclasses.asdict(r) for r in self], indent=1))

    def extend(self, rows: Any) -> None:
        for r in rows:
            self.append(r)


def family_worker(args: argparse.Namespace, out: Path, rows: Rows) -> None:
    """Every check of one family (``--worker``): the device run and, alongside, the CPU
    reference subprocess; then the comparisons (and bf16 / torchrun where ``--also`` says)."""
    extra.exact_float32()
    name = args.worker
    root = out / name
    model = build_model(name, root / "model")
    config = root / "run.toml"
    config.write_text(RUN_TOML.format(model=model, corpus=args.corpus, n_contexts=args.n_contexts))
    f = Family(name, model, config, root)
    cpu = start_cpu_reference(f) if "families" in args.checks else None
    try:
        family_checks(args, f, rows, cpu)
    finally:
        if cpu is not None and cpu[0].poll() is None:
            cpu[0].kill()


def family_checks(args: argparse.Namespace, f: Family, rows: Rows,
                  cpu: tuple[subprocess.Popen[bytes], float] | None) -> None:
    name, dev = f.name, args.device
    tol = Tolerances().scaled(args.tolerance_scale)
    seconds = _step(rows, f"{name} run", lambda: _device_run(f, dev))
    if seconds is None:
        return
    run_row = steps.check_run(f"{name} run", f.device, seconds, None)
    rows.append(run_row)
    if "bf16" in args.also.split(","):
        _step(rows, f"{name} bf16 vs float32", lambda: [steps.check_bf16(f, dev, tol)])
    if "torchrun" in args.also.split(","):
        left = args.budget_s - (time.monotonic() - T0) - 15
        _step(rows, "torchrun 1 GPU", lambda: [extra.check_torchrun(f, dev, tol, left)])
    if cpu is None:
        return
    code, cpu_s = finish_cpu_reference(cpu, args.budget_s - (time.monotonic() - T0) - 10)
    problems = steps.run_problems(f.cpu) if code == 0 else [
        f"darkmatter run --device cpu: exit {code} (log {f.root / 'cpu.log'})"]
    if problems:
        rows.append(Row(f"{name} cpu reference", "FAIL", "; ".join(problems[:3]), cpu_s=cpu_s))
        return
    # the stages' own times on both sides (the CPU process's start-up left out)
    run_row.device_s = sum(steps.timings(f.device).values())
    run_row.cpu_s = sum(steps.timings(f.cpu).values())
    rows.save()
    _step(rows, f"{name} harvest", lambda: [steps.check_harvest(f, tol)])
    _step(rows, f"{name} train", lambda: [steps.check_train(f, tol)])
    _step(rows, f"{name} decompose", lambda: [steps.check_same_saes_decompose(f, dev, tol)[0]])
    _step(rows, f"{name} analyses", lambda: [steps.check_same_saes_analyses(f, dev, tol)])


def start_cpu_reference(f: Family) -> tuple[subprocess.Popen[bytes], float]:
    """``darkmatter run --device cpu`` of the same config, one thread, no GPU visible."""
    cmd = [sys.executable, "-m", "sae_darkmatter.cli", "run", "--config", str(f.config),
           "--device", "cpu", "-o", str(f.cpu)]
    env = {**os.environ, **ONE_THREAD, "CUDA_VISIBLE_DEVICES": ""}
    log = (f.root / "cpu.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, time.perf_counter()


def finish_cpu_reference(cpu: tuple[subprocess.Popen[bytes], float],
                         timeout: float) -> tuple[int, float]:
    proc, t = cpu
    try:
        code = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        code = -9
    return code, time.perf_counter() - t


def _device_run(f: Family, device: str) -> float:
    _, seconds = steps.device_run(steps.config_for(f, device), f.device)
    return seconds


def _step(rows: list[Row], label: str, fn: Any) -> Any:
    """Run one step; an exception becomes a FAIL row naming it (the other steps go on)."""
    try:
        result = fn()
    except TimeUp:
        raise
    except Exception as err:  # any failure of the pipeline on the device is a finding
        logging.getLogger("gpu_check").exception("%s failed", label)
        rows.append(Row(label, "FAIL", f"{type(err).__name__}: {str(err)[:300]}"))
        return None
    if isinstance(result, list):
        rows.extend(result)
    return result


# --------------------------------------------------------------------------- the whole check


def run_checks(args: argparse.Namespace, out: Path, rows: Rows) -> None:
    env = extra.check_environment(args.device)
    rows.append(env)
    if args.install:
        rows.append(Row("install", "FAIL" if args.install.startswith("failed") else
                        "SKIP" if args.install.startswith("skipped") else "PASS", args.install))
    if env.status == "FAIL":
        return
    missing = extra.missing_extras()
    if missing:
        rows.append(Row("extras", "SKIP", "not installed: " + "; ".join(
            f"{k} ({v})" for k, v in missing.items())))
    families = launched(args)
    # a worker and its CPU reference take a core each; two cores stay for this process and torchrun
    jobs = args.jobs or max(1, min(len(families), ((os.cpu_count() or 2) - 2) // 2))
    with ThreadPoolExecutor(jobs) as pool:
        for failed in pool.map(lambda n: run_worker(args, out, n), families):
            rows.extend(failed)
    if "timing" in args.checks:
        model = build_timing_model(out / "timing" / "model")
        config = out / "timing" / "run.toml"
        n = args.timing_contexts
        config.write_text(extra.TIMING_TOML.format(model=model, corpus=args.corpus,
                                                   n_contexts=n, train_tokens=n * 128 * 3))
        timing = Family("timing", model, config, out / "timing")
        _step(rows, "timing", lambda: extra.check_timing(timing, args.device))
    if "smollm2" in args.checks:
        tol = Tolerances().scaled(args.tolerance_scale)
        _step(rows, "smollm2 harvest", lambda: [extra.check_smollm2(args.device, out, tol)])


def also(args: argparse.Namespace) -> dict[str, list[str]]:
    """Which family's worker runs bf16 and torchrun (each compares with its float32 run)."""
    bf16 = args.bf16_family if args.bf16_family in args.families else args.families[0]
    todo: dict[str, list[str]] = {}
    if "bf16" in args.checks:
        todo.setdefault(bf16, []).append("bf16")
    if "torchrun" in args.checks:
        todo.setdefault(args.families[0], []).append("torchrun")
    return todo


def launched(args: argparse.Namespace) -> list[str]:
    """The families that get a worker: all for the comparisons, else those of bf16 / torchrun."""
    if "families" in args.checks:
        return args.families
    return [f for f in args.families if f in also(args)]


def run_worker(args: argparse.Namespace, out: Path, name: str) -> list[Row]:
    """One family's checks in a subprocess (its own CUDA context); a FAIL row if it crashed.
    Its rows are in ``out/<name>/rows.json``."""
    (out / name).mkdir(parents=True, exist_ok=True)
    left = args.budget_s - (time.monotonic() - T0)
    cmd = [sys.executable, __file__, "--worker", name, "--device", args.device, "--out", str(out),
           "--checks", ",".join(args.checks), "--budget-s", f"{left - 10:.0f}",
           "--tolerance-scale", str(args.tolerance_scale), "--n-contexts", str(args.n_contexts),
           "--corpus", args.corpus, "--also", ",".join(also(args).get(name, []))]
    log = out / name / "worker.log"
    try:
        with log.open("w") as sink:
            code = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT,
                                  env={**os.environ, **ONE_THREAD},
                                  timeout=max(left - 5, 1), check=False).returncode
    except subprocess.TimeoutExpired:
        code = -9
    if code in (0, 1) and (out / name / "rows.json").is_file():
        return []
    tail = log.read_text()[-400:].replace("\n", " | ")
    return [Row(f"{name} worker", "FAIL", f"exit {code}: …{tail}")]


def worker_rows(out: Path, families: list[str]) -> list[Row]:
    """The rows every family worker saved (also those a stopped worker saved so far)."""
    rows = []
    for name in families:
        saved = out / name / "rows.json"
        if saved.is_file():
            rows += [Row(**r) for r in json.loads(saved.read_text())]
    return rows


def in_order(rows: list[Row], families: list[str]) -> list[Row]:
    """The set-up rows, then each family's (run, harvest, train, decompose, analyses, bf16),
    then the rest in the order they ran."""
    kinds = ("run", "harvest", "train", "decompose", "analyses", "bf16")

    def key(r: Row) -> tuple[int, int]:
        head, _, rest = r.check.partition(" ")
        if head in ("environment", "install", "extras"):
            return 0, 0
        if head not in families:
            return 1 + len(families), 0
        kind = rest.split(" ")[0]
        return 1 + families.index(head), kinds.index(kind) if kind in kinds else len(kinds)

    return sorted(rows, key=key)


def print_table(rows: list[Row], seconds: float, out: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"gpu_check: {seconds:.0f} s, results in {out}", show_lines=False)
    for col in ("check", "status", "result"):
        table.add_column(col, overflow="fold")
    for col in ("device s", "CPU s"):
        table.add_column(col, justify="right")
    colour = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    for r in rows:
        table.add_row(escape(r.check), f"[{colour[r.status]}]{r.status}[/]", escape(r.result),
                      "" if r.device_s is None else f"{r.device_s:.1f}",
                      "" if r.cpu_s is None else f"{r.cpu_s:.1f}")
    console = Console(width=max(140, Console().width))
    console.print(table)
    counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    console.print(f"gpu_check: {counts['PASS']} PASS, {counts['FAIL']} FAIL, "
                  f"{counts['SKIP']} SKIP")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = out / (f"{args.worker}/worker_py.log" if args.worker else "gpu_check.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=log, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1 if args.worker else min(2, torch.get_num_threads()))
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGALRM, _stop)
    signal.alarm(max(1, int(args.budget_s)))
    rows = Rows(out / args.worker / "rows.json" if args.worker else None)
    try:
        family_worker(args, out, rows) if args.worker else run_checks(args, out, rows)
    except TimeUp as why:
        rows.append(Row(f"{args.worker or 'time'} budget", "FAIL", f"stopped by {why} after "
                        f"{time.monotonic() - T0:.0f} s; the checks after this did not run"))
    finally:
        signal.alarm(0)
    if args.worker:
        return 0 if all(r.status != "FAIL" for r in rows) else 1
    rows = in_order([*rows, *worker_rows(out, launched(args))], args.families)
    (out / "summary.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    print_table(rows, time.monotonic() - T0, out)
    return 0 if rows and all(r.status != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
