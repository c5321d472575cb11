"""The steps of gpu_check: pipeline runs on the device under test and their checks.

Each ``check_*`` function returns a ``Row`` of the summary table. Runs on the device happen in
this process (``build_config`` is what the CLI's ``--device``/``--dtype`` flags produce); the CPU
reference runs are ``darkmatter run`` subprocesses started by gpu_check.py.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_check_compare import (
    Diff,
    Tol,
    compare_decompositions,
    compare_stores,
    compare_training,
    compare_tree,
    decompositions,
)
from sae_darkmatter.analyses import run_analyses
from sae_darkmatter.analyses.downstream import downstream_analysis
from sae_darkmatter.analyses.registry import NAMES, get
from sae_darkmatter.cli.common import build_config
from sae_darkmatter.config import ModelConfig, RunConfig
from sae_darkmatter.models import load_model
from sae_darkmatter.pipeline import decompose_saes, decompose_transcoder_specs, run
from sae_darkmatter.run_dir import RunDir
from sae_darkmatter.splits import make_splits
from sae_darkmatter.store import ActivationStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Tolerances:
    """Every tolerance of the check, and why.

    float32 on two devices computes the same sums in another order (TF32 off). On these models
    float32 activations differ from float64 by at most 7.8e-7 (‖Δ‖_F / ‖a‖_F) and 1.1e-6
    (max |Δ| / max |a|) at any hook, the per-token loss by 2.4e-6 nats (measured on the CPU);
    CPU and GPU are each that far from exact, so they differ by ~2e-6. The bounds sit 50x and
    more above that, and 100x below any real fault (a wrong layer, position or dtype moves
    activations by >= 1e-2; bfloat16 alone moves them by 1e-2).
    """

    acts: Tol = Tol(1e-4)  # ‖Δ‖_F / ‖a‖_F per hook
    acts_max: Tol = Tol(1e-3)  # max |Δ| / max |a| per hook
    loss: Tol = Tol(1e-4)  # nats per token
    # Same SAEs and store on both devices: TopK encodes differ by rounding, and a near-tie
    # may swap one latent of a token. Measured by multiplying every SAE weight by
    # (1 + 1e-6·N(0, 1)), about float32 GEMM rounding: metrics move by <= 1e-5 of their value,
    # per-token errors by 9e-6 of the column mean, analyses by <= 4e-5 (pursuit's FVU drop);
    # at 1e-3 the per-token errors move 500x beyond these bounds.
    decompose: Tol = Tol(1e-6, 1e-3)
    per_token: Tol = Tol(1e-3)  # each token's ‖e‖² etc., relative to the column mean
    analyses: Tol = Tol(5e-4, 2e-3)
    # SAEs trained on each device from the same data and seed end like two seeds' SAEs (CUDA's
    # atomics and rounding change which latents win TopK): measured on these grids, another
    # seed moves the final FVU by <= 0.003, inputs perturbed by 1e-6 by <= 2e-4.
    train: Tol = Tol(0.02)
    trained_analyses: Tol = Tol(0.05)  # error_saes trains its SAEs on the device
    # bfloat16 LM vs float32: 8 significant bits (unit roundoff 2^-9 ≈ 2e-3 per rounding).
    # Measured on the CPU: ‖Δ‖_F / ‖a‖_F <= 1.8e-2, max |Δ| / max |a| <= 2.7e-2, loss within
    # 0.04 nats (mean 0.008) over the nine families; bounds ~3x that.
    bf16_acts: Tol = Tol(5e-2)
    bf16_acts_max: Tol = Tol(1e-1)
    bf16_loss: Tol = Tol(0.15)
    bf16_fvu: Tol = Tol(0.05)  # SAEs trained on each harvest: ``train`` plus the data change

    def scaled(self, s: float) -> Tolerances:
        return Tolerances(**{k: getattr(self, k).scaled(s) for k in self.__dataclass_fields__})


# Paths inside analyses.json left out: timings, and the shares of the CE / KL gap closed, ratios
# whose denominator (an SAE's own CE or KL gap) can be ~0 on random models, so any rounding is
# amplified without bound (the CE and KL values that determine them are compared).
ANALYSIS_SKIP = (r"seconds", r"tokens_per_second", r"fingerprint", r"(ce|kl)_gap_closed")
TRAINED_ANALYSES = ("error_saes",)


@dataclass
class Row:
    """One line of the summary table."""

    check: str
    status: str  # PASS, FAIL or SKIP
    result: str = ""
    device_s: float | None = None
    cpu_s: float | None = None

    @classmethod
    def of(cls, check: str, diff: Diff, what: str = "|Δ|", **kw: Any) -> Row:
        return cls(check, "PASS" if diff.ok else "FAIL", diff.summary(what), **kw)


@dataclass
class Family:
    """One family's model, run config and run folders."""

    name: str
    model: Path
    config: Path
    root: Path
    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def cpu(self) -> Path:  # the CPU reference run (`darkmatter run --device cpu`)
        return self.root / "cpu"

    @property
    def device(self) -> Path:  # the whole pipeline on the device
        return self.root / "device"

    @property
    def same(self) -> Path:  # the CPU run's store and SAEs, decomposed and analysed on the device
        return self.root / "same_saes"


def config_for(f: Family, device: str, dtype: str | None = None) -> RunConfig:
    return build_config(f.config, device=device, dtype=dtype)


def device_run(cfg: RunConfig, out: Path) -> tuple[dict[str, Any], float]:
    t = time.perf_counter()
    metrics = run(cfg, out, progress=False)
    return metrics, time.perf_counter() - t


def run_problems(out: Path) -> list[str]:
    """What is missing or wrong in a finished run folder: metrics, report, figures, analyses."""
    problems = []
    for name in ("metrics.json", "report.html", "analyses.json"):
        if not (out / name).is_file():
            problems.append(f"no {name}")
    if problems:
        return problems
    metrics = json.loads((out / "metrics.json").read_text())
    analyses = json.loads((out / "analyses.json").read_text())
    for name in NAMES:
        if name not in analyses:
            problems.append(f"analysis {name} did not run")
        elif "skipped" in analyses[name]:
            problems.append(f"analysis {name} skipped: {analyses[name]['skipped'][:200]}")
    for s in metrics.get("saes", []):
        for key in ("fvu", "fvu_nonlinear", "r2_error_mean_dim"):
            if not isinstance(s.get(key), float) or not math.isfinite(s[key]):
                problems.append(f"{s.get('name')}: {key} = {s.get(key)!r}")
    pngs = list((out / "figures").glob("*.png"))
    if not pngs or any(p.read_bytes()[:8] != PNG_MAGIC for p in pngs):
        problems.append("figures missing or not PNG")
    return problems


def check_run(label: str, out: Path, seconds: float, cpu_s: float | None) -> Row:
    problems = run_problems(out)
    if problems:
        return Row(label, "FAIL", "; ".join(problems[:4]), seconds, cpu_s)
    analyses = json.loads((out / "analyses.json").read_text())
    figures = len(list((out / "figures").glob("*.png")))
    down = analyses["downstream"].get("check", {})
    kl = down.get("identity_max_kl")
    return Row(label, "PASS", f"{len(NAMES)} analyses, {figures} figures, report; identity "
               f"splice KL {kl:.1g}" if isinstance(kl, float) else "all analyses, report",
               seconds, cpu_s)


def timings(out: Path) -> dict[str, float]:
    return json.loads((out / "metrics.json").read_text()).get("timings_s", {})


def check_harvest(f: Family, tol: Tolerances) -> Row:
    diff = compare_stores(f.cpu / "store", f.device / "store", tol.acts, tol.acts_max,
                          tol.loss)
    return Row.of(f"{f.name} harvest", diff, "rel Δ", device_s=timings(f.device).get("harvest"),
                  cpu_s=timings(f.cpu).get("harvest"))


def check_train(f: Family, tol: Tolerances) -> Row:
    diff = compare_training(f.cpu, f.device, tol.train)
    return Row.of(f"{f.name} train", diff, device_s=timings(f.device).get("train"),
                  cpu_s=timings(f.cpu).get("train"))


def copy_inputs(src: Path, dst: Path) -> None:
    """The CPU run's store, SAEs, transcoders and config, into a fresh run folder."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copytree(src / "store", dst / "store")
    shutil.copytree(src / "saes", dst / "saes")
    if (src / "transcoders").is_dir():
        shutil.copytree(src / "transcoders", dst / "transcoders")
    shutil.copy2(src / "run_config.json", dst / "run_config.json")


def check_same_saes_decompose(f: Family, device: str, tol: Tolerances) -> tuple[Row, float]:
    """The CPU run's SAEs decomposed on the device, on the CPU run's store."""
    copy_inputs(f.cpu, f.same)
    cfg = config_for(f, device)
    store = ActivationStore.open(f.same / "store")
    splits = make_splits(store, cfg.split)
    names = list(decompositions(f.cpu / "decompose"))
    t = time.perf_counter()
    decompose_saes(store, splits, [f.same / "saes" / n for n in names], cfg.decompose,
                   f.same / "decompose", progress=False, check_training=False)
    tc_dir = f.cpu / "decompose" / "transcoders"  # the CPU run's transcoders, the same way
    transcoders = list(decompositions(tc_dir)) if tc_dir.is_dir() else []
    if transcoders:
        decompose_transcoder_specs(store, splits, [f.same / "transcoders" / n for n in transcoders],
                                   cfg.decompose, f.same / "decompose" / "transcoders",
                                   progress=False)
    seconds = time.perf_counter() - t
    diff = compare_decompositions(f.cpu / "decompose", f.same / "decompose", tol.decompose,
                                  tol.per_token)
    if transcoders:
        diff.merge(compare_decompositions(tc_dir, f.same / "decompose" / "transcoders",
                                          tol.decompose, tol.per_token), "transcoders/")
    return Row.of(f"{f.name} decompose", diff, device_s=timings(f.device).get("decompose"),
                  cpu_s=timings(f.cpu).get("decompose")), seconds


def check_same_saes_analyses(f: Family, device: str, tol: Tolerances) -> Row:
    """Every analysis on the device over the same store, SAEs and decompositions as the CPU
    run's, compared value by value (downstream with the LM on the device, too)."""
    cfg = config_for(f, device)
    run_dir = RunDir(f.same)
    later = ("downstream", "paper")  # paper reads downstream's result: both after the others
    wanted = tuple(n for n in NAMES if n not in later and get(n).enabled(cfg))
    t = time.perf_counter()
    results = run_analyses(run_dir, only=wanted, cfg=cfg, progress=False)
    # downstream loads the LM as the store recorded it (on the CPU): give it the device's
    lm = load_model(ModelConfig(name=str(f.model), device=device))
    results["downstream"] = downstream_analysis(run_dir, lm=lm, cfg=cfg.downstream,
                                                split=cfg.split, progress=False)
    results["paper"] = get("paper").run(run_dir, cfg, results, False)
    seconds = time.perf_counter() - t
    ref = json.loads((f.cpu / "analyses.json").read_text())
    diff = Diff()
    for name in NAMES:
        if "skipped" in results.get(name, {}) or name not in results:
            diff.problem(f"{name} skipped: {results.get(name, {}).get('skipped', 'not run')}")
            continue
        own = tol.trained_analyses if name in TRAINED_ANALYSES else tol.analyses
        diff.merge(compare_tree(ref[name], results[name], own, ANALYSIS_SKIP), f"{name}.")
    return Row.of(f"{f.name} analyses", diff, device_s=seconds,
                  cpu_s=timings(f.cpu).get("analyses"))


def check_bf16(f: Family, device: str, tol: Tolerances) -> Row:
    """The whole pipeline with the LM in bfloat16 on the device, against float32 there."""
    out = f.root / "device_bf16"
    metrics, seconds = device_run(config_for(f, device, "bfloat16"), out)
    diff = Diff()
    for p in run_problems(out):
        diff.problem(p)
    diff.merge(compare_stores(f.device / "store", out / "store", tol.bf16_acts,
                              tol.bf16_acts_max, tol.bf16_loss),
               "store ")
    ref = {s["name"]: s for s in json.loads((f.device / "metrics.json").read_text())["saes"]}
    for s in metrics["saes"]:
        diff.add(f"{s['name']} FVU", abs(s["fvu"] - ref[s["name"]]["fvu"]), tol.bf16_fvu.atol)
    return Row.of(f"{f.name} bf16 vs float32", diff, device_s=seconds)
