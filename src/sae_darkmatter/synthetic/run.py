"""Runs on synthetic data: the Fig. 15 / Table 1 grid, a trained-SAE check, the report."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sae_darkmatter.config import SAETrainConfig
from sae_darkmatter.config_base import to_dict
from sae_darkmatter.report.synthetic import write_synthetic_report
from sae_darkmatter.saes import train_sae
from sae_darkmatter.synthetic.claims import check_synthetic
from sae_darkmatter.synthetic.data import SyntheticConfig, SyntheticData, centred_ss, generate
from sae_darkmatter.synthetic.evaluate import (
    decomposition,
    estimates,
    evaluate_fits,
    fit_differences,
    split_halves,
    table1,
)

RECOVERED_COSINE = 0.9  # a true feature counts as recovered by an SAE latent above this cosine


def _progress(enabled: bool):  # unannotated: rich's type is internal
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not enabled, transient=True)


def run_grid(
    cfg: SyntheticConfig,
    *,
    fits: tuple[str, ...] = ("in_sample", "held_out"),
    progress: bool = False,
    data: SyntheticData | None = None,
) -> dict[str, Any]:
    """Fig. 15 lines (each line config over ablations), the noise² grid at ablation 0, Table 1.

    Each configuration draws its own noise from ``(cfg.seed, configuration index)``; all fit
    modes of a configuration share that draw. Returns a JSON-able dict.
    """
    t0 = time.perf_counter()
    data = generate(cfg) if data is None else data
    t_gen = time.perf_counter() - t0
    cfg = data.cfg
    jobs: list[tuple[str, float, float, float]] = [
        ("line", ab, act, rec) for act, rec in cfg.line_configs for ab in cfg.ablations
    ] + [("grid", 0.0, act, rec) for act in cfg.noise_levels for rec in cfg.noise_levels]
    lines: list[dict[str, Any]] = [
        {"act_noise": act, "rec_noise": rec, "points": []} for act, rec in cfg.line_configs
    ]
    grid: list[dict[str, Any]] = []
    with _progress(progress) as bar:
        task = bar.add_task("synthetic grid", total=len(jobs))
        for i, (kind, ab, act, rec) in enumerate(jobs):
            res = evaluate_fits(data, ab, act, rec, fits=fits, seed=cfg.seed * 1_000_003 + i + 1)
            if kind == "line":
                lines[i // len(cfg.ablations)]["points"].append(res)
            else:
                grid.append(res)
            bar.advance(task)
    n, d = data.x.shape
    return {
        "config": to_dict(cfg),
        "data": {"n_tokens": n, "d": d, "n_features": data.n_features,
                 "mean_l0": float((data.values > 0).sum(1).double().mean()),
                 "noise_unit": data.noise_unit},
        "fits": list(fits),
        "lines": lines,
        "grid": grid,
        "table1": {fit: table1(grid, fit) for fit in fits},
        "fit_differences": fit_differences(grid, fits, n, d),
        "seconds": {"generate": t_gen, "grid": time.perf_counter() - t0 - t_gen},
    }


def check_config(cfg: SyntheticConfig) -> SyntheticConfig:
    """The small model ``trained_sae_check`` uses by default: d=64, F=512, 30k tokens, L0 8."""
    return replace(cfg, d=64, n_features=512, n_tokens=30_000, l0=8.0, dictionary="random")


def trained_sae_check(
    cfg: SyntheticConfig,
    *,
    act_noise_levels: tuple[float, ...] = (0.0, 0.5),
    width: int | None = None,
    k: int | None = None,
    train_tokens: int = 240_000,
    out_dir: str | Path,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train a TopK SAE on ``x'`` (one per activation-noise level) and decompose its error.

    The data come from ``cfg`` as given (see ``check_config`` for a fast one). Tokens are split
    in seeded halves: the SAE and the probe are fit on the first, everything is scored on the
    second. ``width`` defaults to the true feature count, ``k`` to ceil(l0). Reports FVU,
    est_linear, est_nonlinear, the true activation-noise share of TV(x'), and the share of true
    features whose direction some decoder row matches with cosine > 0.9.
    """
    data = generate(cfg)
    width = data.n_features if width is None else width
    k = math.ceil(data.cfg.l0) if k is None else k
    fit_rows, score_rows = split_halves(data.n_tokens, cfg.seed)
    out: list[dict[str, Any]] = []
    for i, level in enumerate(act_noise_levels):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 999_983 + i)
        act = torch.randn(data.x.shape, generator=gen).mul_(level * data.noise_unit)
        x_obs = data.x + act
        t0 = time.perf_counter()
        train_cfg = SAETrainConfig(
            widths=(width,),
            ks=(k,),
            train_tokens=train_tokens,
            batch_size=1024,
            seed=cfg.seed,
            checkpoint_every=10**9,
            device="cpu",
        )
        sae = train_sae(x_obs[fit_rows], width=width, k=k, cfg=train_cfg,
                        out_dir=Path(out_dir) / f"act_noise_{level:g}", progress=progress,
                        metadata={"model_name": "synthetic", "hook_name": f"act_noise_{level:g}"})
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            recon = sae(x_obs).double()
        dec = sae.W_dec.detach().float()
        dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        best_cos = (data.dictionary @ dec.T).max(dim=1).values
        res = decomposition(x_obs.double(), recon, score_rows, fit_rows)
        xs = x_obs[score_rows].double()
        out.append({
            "act_noise": level,
            "width": width,
            "k": k,
            "train_tokens": train_tokens,
            **estimates(res["fvu_recon"], res["fvu_lin"]),
            "true_activation_noise_share": centred_ss(act[score_rows]) / centred_ss(xs),
            "features_recovered": float((best_cos > RECOVERED_COSINE).double().mean()),
            "train_seconds": seconds,
        })
    return out


def run_synthetic(
    cfg: SyntheticConfig,
    out_dir: str | Path,
    *,
    train_check: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Grid + Table 1 (checked against the paper's pattern), the trained-SAE check (on
    ``check_config(cfg)``) if asked, the report."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    results = run_grid(cfg, progress=progress)
    results["paper"] = check_synthetic(results)
    if train_check:
        t1 = time.perf_counter()
        results["trained_sae_check"] = trained_sae_check(
            check_config(cfg), out_dir=out_dir / "sae_check", progress=progress)
        results["seconds"]["trained_sae_check"] = time.perf_counter() - t1
    results["seconds"]["total"] = time.perf_counter() - t0
    results["report"] = str(write_synthetic_report(results, out_dir))
    return results
