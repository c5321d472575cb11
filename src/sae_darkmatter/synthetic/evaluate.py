"""Scoring one (ablation, noise) configuration of synthetic data, and Table 1 over a grid."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.linalg import StreamingLstsq, fvu
from sae_darkmatter.synthetic.data import SyntheticData, centred_ss

FITS = ("in_sample", "held_out", "debiased")


def _check_ablation(ablation: float) -> None:
    if not 0.0 <= ablation < 1.0:
        raise DarkMatterError(f"ablation must be in [0, 1), got {ablation}")


def known_features(data: SyntheticData, ablation: float) -> torch.Tensor:
    """[F] bool: the features the stand-in SAE knows (all but the ``ablation`` least active)."""
    _check_ablation(ablation)
    n_out = int(round(ablation * data.n_features))
    keep = torch.ones(data.n_features, dtype=torch.bool)
    keep[torch.argsort(data.feature_mean, stable=True)[:n_out]] = False
    return keep


def split_halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of ``range(n)`` into a fit half and a scoring half."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2], perm[n // 2 :]


def decomposition(x_obs: torch.Tensor, recon: torch.Tensor, rows: torch.Tensor | None,
                  fit_rows: torch.Tensor | None) -> dict[str, float]:
    """FVUs of recon and recon + ê on ``rows`` (None: all), ê fit on ``fit_rows`` (None: all)."""
    err = x_obs - recon
    lstsq = StreamingLstsq(x_obs.shape[1], x_obs.shape[1], bias=True)
    fx, fe = (x_obs, err) if fit_rows is None else (x_obs[fit_rows], err[fit_rows])
    lstsq.update(fx, fe)
    probe = lstsq.solve()
    xs, rs = (x_obs, recon) if rows is None else (x_obs[rows], recon[rows])
    fvu_recon = fvu(xs, rs)
    fvu_lin = fvu(xs, rs + probe.predict(xs))
    return {"fvu_recon": fvu_recon, "fvu_lin": fvu_lin}


def estimates(fvu_recon: float, fvu_lin: float) -> dict[str, float]:
    return {"fvu_recon": fvu_recon, "fvu_lin": fvu_lin,
            "est_linear": fvu_recon - fvu_lin, "est_nonlinear": fvu_lin}


def evaluate_fits(
    data: SyntheticData,
    ablation: float,
    act_noise: float,
    rec_noise: float,
    *,
    fits: tuple[str, ...] = ("in_sample", "held_out"),
    seed: int = 0,
) -> dict[str, Any]:
    """Like ``evaluate`` for several fit modes on one noise draw.

    Returns ``{"fits": {mode: estimates}, "truth": ...}`` with the configuration's settings.

    Sharing the draw makes the modes' differences paired (no sampling noise between them).
    The held-out split is ``split_halves(N, seed)``; noise comes from ``seed`` too.
    """
    unknown = [f for f in fits if f not in FITS]
    if unknown or not fits:
        raise DarkMatterError(f"unknown fit mode(s) {unknown or fits}; choose from {FITS}")
    if not (act_noise >= 0 and rec_noise >= 0):
        raise DarkMatterError(f"noise levels must be >= 0, got {act_noise}, {rec_noise}")
    keep = known_features(data, ablation)
    gen = torch.Generator().manual_seed(seed)
    unit = data.noise_unit
    act = torch.randn(data.x.shape, generator=gen).mul_(act_noise * unit)
    rec_n = torch.randn(data.x.shape, generator=gen).mul_(rec_noise * unit)
    present = data.decode(keep)
    x_obs = (data.x + act).double()
    recon = (present + rec_n).double()
    tv = centred_ss(x_obs)
    truth = {
        "absent_features": centred_ss(data.x.double() - present.double()) / tv,
        "activation_noise": centred_ss(act) / tv,
        "reconstruction_noise": float(rec_n.double().square().sum()) / tv,
    }
    out: dict[str, Any] = {"ablation": ablation, "act_noise": act_noise, "rec_noise": rec_noise,
                           "fits": {}, "truth": truth}
    if "in_sample" in fits or "debiased" in fits:
        ins = decomposition(x_obs, recon, None, None)
        n, d = x_obs.shape
        if "in_sample" in fits:
            out["fits"]["in_sample"] = estimates(ins["fvu_recon"], ins["fvu_lin"])
        if "debiased" in fits:
            if n <= d + 1:
                raise DarkMatterError(f"debiased fit needs more tokens ({n}) than d + 1 ({d + 1})")
            out["fits"]["debiased"] = estimates(
                ins["fvu_recon"], ins["fvu_lin"] / (1 - (d + 1) / n)
            )
    if "held_out" in fits:
        fit_rows, score_rows = split_halves(x_obs.shape[0], seed)
        ho = decomposition(x_obs, recon, score_rows, fit_rows)
        out["fits"]["held_out"] = estimates(ho["fvu_recon"], ho["fvu_lin"])
    return out


def evaluate(
    data: SyntheticData,
    ablation: float,
    act_noise: float,
    rec_noise: float,
    *,
    fit: str = "held_out",
    seed: int = 0,
) -> dict[str, Any]:
    """One (ablation, noise) configuration scored with one probe fit mode (module docstring).

    Returns fvu_recon, fvu_lin, est_linear, est_nonlinear, and ``truth``: the shares of TV(x')
    of absent features, activation noise and reconstruction noise. Noise levels are in units of
    ``data.noise_unit``.
    """
    res = evaluate_fits(data, ablation, act_noise, rec_noise, fits=(fit,), seed=seed)
    return {"ablation": ablation, "act_noise": act_noise, "rec_noise": rec_noise, "fit": fit,
            **res["fits"][fit], "truth": res["truth"]}


def _pearson(a: list[float], b: list[float]) -> float:
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_.std() == 0 or b_.std() == 0:
        return math.nan
    return float(np.corrcoef(a_, b_)[0, 1])


def table1(grid: list[dict[str, Any]], fit: str) -> dict[str, dict[str, float]]:
    """Pearson correlations over the grid: {act_noise, rec_noise} × {est_linear, est_nonlinear}."""
    out: dict[str, dict[str, float]] = {}
    for noise in ("act_noise", "rec_noise"):
        xs = [g[noise] for g in grid]
        out[noise] = {est: _pearson(xs, [g["fits"][fit][est] for g in grid])
                      for est in ("est_linear", "est_nonlinear")}
    return out


def fit_differences(
    grid: list[dict[str, Any]], fits: tuple[str, ...], n: int, d: int
) -> dict[str, Any]:
    """Held-out minus in-sample estimates over the grid, with the OLS noise-bias predictions."""
    if not {"in_sample", "held_out"} <= set(fits):
        return {}
    diffs = {est: [g["fits"]["held_out"][est] - g["fits"]["in_sample"][est] for g in grid]
             for est in ("est_linear", "est_nonlinear")}
    n_fit = n // 2
    return {
        **{f"{est}_mean": float(np.mean(v)) for est, v in diffs.items()},
        **{f"{est}_max_abs": float(np.max(np.abs(v))) for est, v in diffs.items()},
        "in_sample_bias_d_over_n": (d + 1) / n,
        "held_out_inflation_predicted": (d + 1) / max(n_fit - d - 2, 1),
        "note": ("for noise the probe cannot predict, in-sample OLS removes ≈ (d+1)/N of it and "
                 "a probe fit on N/2 rows adds ≈ (d+1)/(N/2 − d − 2) of it on fresh rows "
                 "(Gaussian regressors; more for sparse heavy-tailed activations)"),
    }
