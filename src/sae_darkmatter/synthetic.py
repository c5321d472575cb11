"""Synthetic activation models with a known ground truth (paper §5, Fig. 15, Table 1).

Activations are sparse sums of unit feature directions, ``x = codes @ D``. A stand-in "SAE"
knows the true dictionary minus the least active features and adds its own noise:

- ``x' = x + N(0, σ_act²)`` (activation noise: the dense, linearly predictable part);
- ``recon = (codes ⊙ mask) @ D + N(0, σ_rec²)`` (unlearned features + introduced error);
- ``e = x' − recon``; a linear probe ``e ≈ [x', 1] W`` gives ``ê`` and
  ``FVU_recon = FVU(x', recon)``, ``FVU_lin = FVU(x', recon + ê)``,
  ``est_linear = FVU_recon − FVU_lin``, ``est_nonlinear = FVU_lin``.

Because the truth is known, the report checks that activation noise moves the linear estimate
and reconstruction noise the nonlinear one (the paper's Table 1), and how the probe's fitting
mode biases the estimates.

Conventions and differences from the paper's ``synthetic_simulation.py``:

- FVU is pooled ``Σ‖y − ŷ‖² / Σ‖y − ȳ‖²`` with the per-dimension mean ȳ, as everywhere in this
  library; the paper's synthetic script subtracts one global scalar mean instead.
- Noise levels are stds in units of the clean activations' per-coordinate RMS about their
  per-dimension mean (``sqrt(TV(x) / (N·d))``), so level 1 adds as much variance as ``x`` has.
  The paper used absolute stds 0..4 on Gemma-2-9B activations.
- The probe has a bias column (the paper's script had none). Fit modes: ``in_sample`` fits and
  scores on all tokens (the paper: OLS then explains ≈ (d+1)/N of pure noise, inflating the
  linear estimate); ``held_out`` fits on a seeded half and scores on the other half (the probe's
  estimation noise then inflates the residual by ≈ (d+1)/(N_fit − d − 2) for Gaussian
  regressors, more for sparse heavy-tailed ones: 1.36-1.48x instead of 1.28x measured at d=64,
  N_fit=300); ``debiased`` divides the in-sample residual by ``1 − (d+1)/N`` (exact in
  expectation for noise the probe cannot predict).
- True components are shares of ``TV(x')``: absent (ablated) features and activation noise are
  centred sums of squares, reconstruction noise its raw sum of squares (it enters the error
  uncentred and has mean zero). Absent features are not perfectly linear in ``x'`` (they are
  sparse, in superposition), so part of them lands in ``est_nonlinear``: the estimate is an
  upper bound on the introduced error, as the paper argues.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sae_darkmatter.config import SAETrainConfig
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.linalg import StreamingLstsq, fvu
from sae_darkmatter.report.synthetic import write_synthetic_report
from sae_darkmatter.saes import load_sae, train_sae

FREQUENCIES = ("zipf", "uniform")
MAGNITUDES = ("exponential", "lognormal", "constant")
FITS = ("in_sample", "held_out", "debiased")
RECOVERED_COSINE = 0.9  # a true feature counts as recovered by an SAE latent above this cosine
_LOGNORMAL_SIGMA = 0.5
_GEN_ROWS = 4096  # rows of uniforms drawn at once when sampling which features fire


@dataclass(frozen=True)
class SyntheticConfig:
    """A synthetic activation model and the (ablation × noise) grid evaluated on it.

    ``l0`` is the expected number of active features per token. ``dictionary`` is ``"random"``
    (Gaussian rows, normalised: near-orthogonal) or a SAELens SAE folder whose normalised
    decoder rows become the features (``d`` and ``n_features`` then come from it). ``ablations``
    are shares of the least active features (by mean activation) the stand-in SAE lacks.
    Noise levels are in units of the clean per-coordinate RMS (module docstring).
    """

    d: int = 256
    n_features: int = 2048
    n_tokens: int = 20_000
    l0: float = 16.0
    frequency: str = "zipf"
    zipf_exponent: float = 1.0
    magnitude: str = "exponential"
    dictionary: str = "random"
    ablations: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    noise_levels: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    line_configs: tuple[tuple[float, float], ...] = ((0.5, 0.3), (0.3, 0.5))
    seed: int = 0


@dataclass(frozen=True)
class SyntheticData:
    """Generated activations and their ground truth.

    ``values``/``indices`` [N, K] hold each token's active features, padded with value 0 at
    index 0 (K = the largest count in any token); ``x = codes @ dictionary`` in float32.
    ``feature_mean`` is each feature's mean activation over all tokens (float64), the ranking
    used for ablations; ``noise_unit`` the clean per-coordinate RMS (noise levels' unit).
    """

    cfg: SyntheticConfig
    dictionary: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    x: torch.Tensor
    probabilities: torch.Tensor
    feature_mean: torch.Tensor
    noise_unit: float

    @property
    def n_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def d(self) -> int:
        return self.x.shape[1]

    @property
    def n_features(self) -> int:
        return self.dictionary.shape[0]

    def dense_codes(self) -> torch.Tensor:
        """Codes as a dense float32 [N, F] matrix (memory N·F; for small models and tests)."""
        codes = torch.zeros(self.n_tokens, self.n_features)
        return codes.scatter_add_(1, self.indices, self.values)

    def decode(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``(codes ⊙ keep) @ D`` [N, d] float32; ``keep`` [F] bool (None: all features)."""
        weights = self.values if keep is None else self.values * keep[self.indices]
        return F.embedding_bag(
            self.indices, self.dictionary, per_sample_weights=weights, mode="sum"
        )


# ---------------------------------------------------------------------------------------------
# generation


def _load_dictionary(cfg: SyntheticConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.dictionary == "random":
        if cfg.d < 1 or cfg.n_features < 1:
            raise DarkMatterError(f"d and n_features must be >= 1, got {cfg.d}, {cfg.n_features}")
        rows = torch.randn(cfg.n_features, cfg.d, generator=gen)
    else:
        path = Path(cfg.dictionary)
        if not path.is_dir():
            raise DarkMatterError(
                f"dictionary must be 'random' or an SAE folder; {path} is not a folder"
            )
        rows = load_sae(path).W_dec.detach().float().cpu()
    norms = rows.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise DarkMatterError(
            f"dictionary {cfg.dictionary!r} has {int((norms == 0).sum())} zero rows"
        )
    return (rows / norms).contiguous()


def feature_probabilities(cfg: SyntheticConfig, n_features: int) -> torch.Tensor:
    """Firing probabilities p_i (float64) with Σ p_i = l0 and p_i ≤ 1.

    zipf: p_i = min(1, c·(i+1)^−α), c found by bisection so the sum is exactly l0 (plain
    rescaling then clipping would lose mass whenever the head clips); uniform: l0 / F.
    """
    if cfg.frequency == "uniform":
        return torch.full((n_features,), cfg.l0 / n_features, dtype=torch.float64)
    shape = torch.arange(1, n_features + 1, dtype=torch.float64).pow(-cfg.zipf_exponent)
    lo, hi = 0.0, cfg.l0 / float(shape.min())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((mid * shape).clamp(max=1).sum()) < cfg.l0 else (lo, mid)
    return (hi * shape).clamp(max=1.0)


def _magnitudes(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """Positive activation sizes with mean 1."""
    if kind == "exponential":
        return torch.empty(n).exponential_(1.0, generator=gen)
    if kind == "lognormal":
        s = _LOGNORMAL_SIGMA
        return torch.exp(torch.randn(n, generator=gen) * s - s * s / 2)
    return torch.ones(n)


def _validate(cfg: SyntheticConfig) -> None:
    if cfg.frequency not in FREQUENCIES:
        raise DarkMatterError(f"unknown frequency {cfg.frequency!r}; choose from {FREQUENCIES}")
    if cfg.magnitude not in MAGNITUDES:
        raise DarkMatterError(f"unknown magnitude {cfg.magnitude!r}; choose from {MAGNITUDES}")
    if cfg.n_tokens < 2:
        raise DarkMatterError(f"n_tokens must be >= 2, got {cfg.n_tokens}")
    if not cfg.l0 > 0:
        raise DarkMatterError(f"l0 must be > 0, got {cfg.l0}")
    if cfg.frequency == "zipf" and not cfg.zipf_exponent >= 0:
        raise DarkMatterError(f"zipf_exponent must be >= 0, got {cfg.zipf_exponent}")
    for a in cfg.ablations:
        _check_ablation(a)
    levels = [*cfg.noise_levels, *(v for pair in cfg.line_configs for v in pair)]
    if any(not (v >= 0 and math.isfinite(v)) for v in levels):
        raise DarkMatterError(f"noise levels must be finite and >= 0, got {levels}")
    if any(len(pair) != 2 for pair in cfg.line_configs):
        raise DarkMatterError(f"line_configs must be (act, rec) pairs, got {cfg.line_configs}")


def _check_ablation(ablation: float) -> None:
    if not 0.0 <= ablation < 1.0:
        raise DarkMatterError(f"ablation must be in [0, 1), got {ablation}")


def generate(cfg: SyntheticConfig) -> SyntheticData:
    """Sample the dictionary, the sparse codes and ``x = codes @ D`` (float32, seeded)."""
    _validate(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    dictionary = _load_dictionary(cfg, gen)
    n_features, d = dictionary.shape
    if cfg.l0 > n_features:
        raise DarkMatterError(f"l0 ({cfg.l0}) cannot exceed the number of features ({n_features})")
    cfg = replace(cfg, d=d, n_features=n_features)
    p = feature_probabilities(cfg, n_features)
    p32 = p.float()
    rows, cols = [], []
    for start in range(0, cfg.n_tokens, _GEN_ROWS):
        n = min(_GEN_ROWS, cfg.n_tokens - start)
        r, c = (torch.rand(n, n_features, generator=gen) < p32).nonzero(as_tuple=True)
        rows.append(r + start)
        cols.append(c)
    row, col = torch.cat(rows), torch.cat(cols)  # row-major order from nonzero
    counts = torch.bincount(row, minlength=cfg.n_tokens)
    k = max(1, int(counts.max()))
    slot = torch.arange(row.numel()) - (torch.cumsum(counts, 0) - counts)[row]
    values = torch.zeros(cfg.n_tokens, k)
    indices = torch.zeros(cfg.n_tokens, k, dtype=torch.int64)
    values[row, slot] = _magnitudes(cfg.magnitude, row.numel(), gen)
    indices[row, slot] = col
    x = F.embedding_bag(indices, dictionary, per_sample_weights=values, mode="sum")
    feature_mean = torch.zeros(n_features, dtype=torch.float64).index_add_(
        0, indices.flatten(), values.flatten().double()) / cfg.n_tokens
    noise_unit = math.sqrt(_centred_ss(x) / x.numel())
    return SyntheticData(cfg, dictionary, values, indices, x, p, feature_mean, noise_unit)


# ---------------------------------------------------------------------------------------------
# evaluation


def _centred_ss(y: torch.Tensor) -> float:
    """Σ‖y − ȳ‖² (per-dimension mean), float64."""
    y = y.double()
    return float((y - y.mean(0)).square().sum())


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


def _decomposition(x_obs: torch.Tensor, recon: torch.Tensor, rows: torch.Tensor | None,
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


def _estimates(fvu_recon: float, fvu_lin: float) -> dict[str, float]:
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
    """Like ``evaluate`` for several fit modes on one noise draw: ``{"fits": {mode: ...}, "truth": ...}``.

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
    tv = _centred_ss(x_obs)
    truth = {
        "absent_features": _centred_ss(data.x.double() - present.double()) / tv,
        "activation_noise": _centred_ss(act) / tv,
        "reconstruction_noise": float(rec_n.double().square().sum()) / tv,
    }
    out: dict[str, Any] = {"ablation": ablation, "act_noise": act_noise, "rec_noise": rec_noise,
                           "fits": {}, "truth": truth}
    if "in_sample" in fits or "debiased" in fits:
        ins = _decomposition(x_obs, recon, None, None)
        n, d = x_obs.shape
        if "in_sample" in fits:
            out["fits"]["in_sample"] = _estimates(ins["fvu_recon"], ins["fvu_lin"])
        if "debiased" in fits:
            if n <= d + 1:
                raise DarkMatterError(f"debiased fit needs more tokens ({n}) than d + 1 ({d + 1})")
            out["fits"]["debiased"] = _estimates(
                ins["fvu_recon"], ins["fvu_lin"] / (1 - (d + 1) / n)
            )
    if "held_out" in fits:
        fit_rows, score_rows = split_halves(x_obs.shape[0], seed)
        ho = _decomposition(x_obs, recon, score_rows, fit_rows)
        out["fits"]["held_out"] = _estimates(ho["fvu_recon"], ho["fvu_lin"])
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


# ---------------------------------------------------------------------------------------------
# grid and Table 1


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


def _fit_differences(
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


def _progress(enabled: bool):  # noqa: ANN202 (rich type is internal)
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
        "config": _config_dict(cfg),
        "data": {"n_tokens": n, "d": d, "n_features": data.n_features,
                 "mean_l0": float((data.values > 0).sum(1).double().mean()),
                 "noise_unit": data.noise_unit},
        "fits": list(fits),
        "lines": lines,
        "grid": grid,
        "table1": {fit: table1(grid, fit) for fit in fits},
        "fit_differences": _fit_differences(grid, fits, n, d),
        "seconds": {"generate": t_gen, "grid": time.perf_counter() - t0 - t_gen},
    }


def _config_dict(cfg: SyntheticConfig) -> dict[str, Any]:
    out = asdict(cfg)
    return {k: [list(v) if isinstance(v, tuple) else v for v in val] if isinstance(val, tuple)
            else val for k, val in out.items()}


# ---------------------------------------------------------------------------------------------
# a real trained SAE on synthetic data


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
        res = _decomposition(x_obs.double(), recon, score_rows, fit_rows)
        xs = x_obs[score_rows].double()
        out.append({
            "act_noise": level,
            "width": width,
            "k": k,
            "train_tokens": train_tokens,
            **_estimates(res["fvu_recon"], res["fvu_lin"]),
            "true_activation_noise_share": _centred_ss(act[score_rows]) / _centred_ss(xs),
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
    """Grid + Table 1, optionally the trained-SAE check (on ``check_config(cfg)``), and the report."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    results = run_grid(cfg, progress=progress)
    if train_check:
        t1 = time.perf_counter()
        results["trained_sae_check"] = trained_sae_check(
            check_config(cfg), out_dir=out_dir / "sae_check", progress=progress)
        results["seconds"]["trained_sae_check"] = time.perf_counter() - t1
    results["seconds"]["total"] = time.perf_counter() - t0
    results["report"] = str(write_synthetic_report(results, out_dir))
    return results
