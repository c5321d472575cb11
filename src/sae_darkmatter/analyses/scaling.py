"""Scaling of SAE error with width (paper Fig. 1): power-law fit FVU(W) = c + a·W^(−m).

Reads a sweep of decompositions (``decompose/<name>.json`` + ``.safetensors``, see the format
contract), picks one SAE per width near a target L0, fits the power law (to FVU, or to
FVU_nonlinear), bootstraps confidence intervals over held-out tokens, and draws the stacked
"dark matter" figure and the contour maps of FVU_nonlinear and of the linear predictability of
the error over (width, L0).

The nested prefixes of one SAE (``decompose_prefixes``: ``<sae>__prefix<m>``) are a sweep too,
one point per prefix width: ``load_sweep(folder, prefixes_of=<sae>)`` reads them and
``fit_scaling`` fits the law of that single SAE (their L0 falls with the width, see
``decompose.prefixes``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.optimize import least_squares

from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.analyses.scaling_figures import contour_figure, stacked_figure
from sae_darkmatter.config import RunConfig
from sae_darkmatter.decompose import SavedDecomposition
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.markup import ci_text, esc, figures_html
from sae_darkmatter.run_dir import Decompositions, RunDir, decompositions_of

log = logging.getLogger(__name__)

_GRID_METRICS = ("fvu", "fvu_linear", "fvu_nonlinear", "linear_share", "r2_error_mean_dim",
                 "r2_error_norm")
STACKED_FIGURE = RunDir.figure_key("scaling_stacked")
CONTOUR_FIGURE = RunDir.figure_key("scaling_contours")


@dataclass(frozen=True, eq=False)
class SweepPoint:
    """One decomposed SAE: identity, size, empirical L0, JSON metrics and per-test-token sums.

    The per-token arrays (aligned with ``rows``) are kept so FVUs can be recomputed on bootstrap
    resamples of the held-out tokens. ``prefix_of`` names the SAE a prefix result was cut from
    (None: a whole SAE).
    """

    name: str
    width: int
    k: int | None
    l0: float
    metrics: dict[str, Any]
    rows: np.ndarray
    err_sq: np.ndarray
    nonlinear_sq: np.ndarray
    x_centered_sq: np.ndarray
    prefix_of: str | None = None

    @property
    def fvu(self) -> float:
        """Σ‖e‖² / Σ‖x − x̄‖² over the held-out tokens."""
        return float(self.err_sq.sum() / self.x_centered_sq.sum())

    @property
    def fvu_nonlinear(self) -> float:
        """Σ‖e − ê‖² / Σ‖x − x̄‖² over the held-out tokens."""
        return float(self.nonlinear_sq.sum() / self.x_centered_sq.sum())


CI = tuple[float, float]
Fitted = Literal["fvu", "fvu_nonlinear"]


@dataclass(frozen=True)
class PowerLawFit:
    """FVU(W) = c + a·W^(−m) fitted on one SAE per width, with 95 % percentile bootstrap CIs.

    ``of`` is the FVU fitted (``"fvu"`` or ``"fvu_nonlinear"``); ``widths``/``fvu``/
    ``fvu_nonlinear`` (and their CIs) are the selected points, by width.
    """

    c: float
    a: float
    m: float
    c_ci: CI
    a_ci: CI
    m_ci: CI
    n_boot: int
    fvu_nonlinear_mean: float
    fvu_nonlinear_mean_ci: CI
    target_l0: float
    widths: tuple[int, ...]
    fvu: tuple[float, ...]
    fvu_ci: tuple[CI, ...]
    fvu_nonlinear: tuple[float, ...]
    fvu_nonlinear_ci: tuple[CI, ...]
    of: Fitted = "fvu"

    def predict(self, widths: np.ndarray | Sequence[float]) -> np.ndarray:
        """The fitted curve at the given widths."""
        return self.c + self.a * np.asarray(widths, dtype=float) ** (-self.m)


def _point(d: SavedDecomposition) -> SweepPoint:
    t = d.tokens
    return SweepPoint(
        name=d.name, width=d.width, k=d.k, l0=float(d.info["metrics"]["l0"]),
        metrics=d.info["metrics"], rows=t["rows"].astype(np.int64),
        err_sq=t["err_sq"].astype(np.float64),
        nonlinear_sq=t["nonlinear_sq"].astype(np.float64),
        x_centered_sq=t["x_centered_sq"].astype(np.float64),
        prefix_of=(d.info.get("prefix") or {}).get("of"),
    )


def load_sweep(decompose_dir: Decompositions, *, prefixes_of: str | None = None
               ) -> list[SweepPoint]:
    """All decomposed SAEs of a run or ``decompose`` folder (or those given), sorted by
    (k, width); with ``prefixes_of``, only the prefix results of that SAE."""
    points = [_point(d) for d in decompositions_of(decompose_dir)]
    if prefixes_of is not None:
        points = [p for p in points if p.prefix_of == prefixes_of]
        if not points:
            raise DarkMatterError(f"no prefix results of SAE {prefixes_of!r} there; run "
                                  "'darkmatter decompose --prefixes' on it first")
    return sorted(points, key=lambda p: (p.k if p.k is not None else -1, p.width, p.name))


def grid_table(points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    """One row per SAE (name, width, k, l0 and the JSON metrics), sorted by (k, width)."""
    rows = []
    for p in sorted(points, key=lambda p: (p.k if p.k is not None else -1, p.width, p.name)):
        row: dict[str, Any] = {"name": p.name, "width": p.width, "k": p.k, "l0": p.l0}
        row.update({key: _maybe_float(p.metrics.get(key)) for key in _GRID_METRICS})
        rows.append(row)
    return rows


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)


def select_at_l0(points: Sequence[SweepPoint], target_l0: float) -> list[tuple[SweepPoint, float]]:
    """Per width, the SAE whose empirical L0 is nearest ``target_l0``, with |l0 − target|/target.

    Ties go to the lower L0. Result is sorted by width. Distances above 20 % are logged (the
    paper's code flags those as "Bad!").
    """
    if target_l0 <= 0:
        raise DarkMatterError(f"target L0 must be positive, got {target_l0}")
    best: dict[int, SweepPoint] = {}
    for p in points:
        cur = best.get(p.width)
        if cur is None or (abs(p.l0 - target_l0), p.l0) < (abs(cur.l0 - target_l0), cur.l0):
            best[p.width] = p
    out = [(p, abs(p.l0 - target_l0) / target_l0) for _, p in sorted(best.items())]
    for p, dist in out:
        if dist > 0.2:
            log.warning(
                "%s: L0 %.1f is %.0f%% from target %.1f", p.name, p.l0, 100 * dist, target_l0
            )
    return out


def fit_power_law(widths: Sequence[float] | np.ndarray,
                  fvus: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Least-squares fit of FVU(W) = c + a·W^(−m) with c, a, m ≥ 0; returns (c, a, m).

    The fit is parametrised as c + b·exp(−m·u) with u = ln(W / W_min), so the amplitude b is the
    excess FVU at the smallest width (order one) instead of a, which can be huge for large W;
    a = b·W_min^m. Several deterministic starts (different m0); the lowest cost wins.
    """
    w = np.asarray(widths, dtype=np.float64)
    y = np.asarray(fvus, dtype=np.float64)
    if w.ndim != 1 or w.shape != y.shape:
        raise DarkMatterError(
            f"widths and FVUs must be 1-D of equal length, got {w.shape}, {y.shape}"
        )
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(y)) and np.all(w > 0)):
        raise DarkMatterError("widths must be positive and FVUs finite for a power-law fit")
    if np.unique(w).size < 3:
        raise DarkMatterError(
            f"a power-law fit needs at least 3 distinct widths, got {np.unique(w).size}; "
            "train/decompose more SAE widths"
        )
    order = np.argsort(w, kind="stable")
    w, y = w[order], y[order]
    w_min = w[0]
    u = np.log(w / w_min)

    def residuals(p: np.ndarray) -> np.ndarray:
        c, b, m = p
        return c + b * np.exp(-m * u) - y

    def jacobian(p: np.ndarray) -> np.ndarray:
        _, b, m = p
        ex = np.exp(-m * u)
        return np.stack([np.ones_like(u), ex, -b * u * ex], axis=1)

    c0 = 0.5 * max(float(y.min()), 0.0)
    b0 = max(float(y[0]) - c0, 1e-9)
    best = None
    for m0 in (0.5, 0.1, 1.0, 2.0):
        # scipy's stubs type ``jac`` as a string; it also takes a callable.
        res = least_squares(residuals, x0=[c0, b0, m0], jac=jacobian,  # pyright: ignore[reportArgumentType]
                            bounds=(0.0, np.inf), method="trf", xtol=1e-14, ftol=1e-14,
                            gtol=1e-14, max_nfev=2000)
        if best is None or res.cost < best.cost:
            best = res
    c, b, m = (float(v) for v in best.x)
    return c, b * w_min**m, m


def _percentile_ci(samples: np.ndarray) -> CI:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def fit_scaling(points: Sequence[SweepPoint], target_l0: float, *, n_boot: int = 200,
                seed: int = 0, of: Fitted = "fvu") -> PowerLawFit:
    """Fit the power law to ``of`` (FVU or FVU_nonlinear) on the SAEs nearest ``target_l0`` per
    width; bootstrap over test tokens.

    Each bootstrap draws test-token indices with replacement (one draw shared by all SAEs, since
    they share the test rows), recomputes every selected SAE's FVU and FVU_nonlinear from the
    per-token sums and refits. x̄ stays the full-sample mean (an O(1/n) simplification).
    CIs are 2.5/97.5 percentiles.
    """
    if n_boot < 1:
        raise DarkMatterError(f"n_boot must be at least 1, got {n_boot}")
    if of not in ("fvu", "fvu_nonlinear"):
        raise DarkMatterError(f"fit_scaling fits 'fvu' or 'fvu_nonlinear', not {of!r}")
    selected = [p for p, _ in select_at_l0(points, target_l0)]
    if len(selected) < 3:
        raise DarkMatterError(
            f"a power-law fit needs SAEs of at least 3 widths, the sweep has {len(selected)}"
        )
    rows = selected[0].rows
    for p in selected[1:]:
        if not np.array_equal(p.rows, rows):
            raise DarkMatterError(
                f"{p.name} and {selected[0].name} were decomposed on different test tokens; "
                "rerun decompose on one run folder"
            )
    widths = np.array([p.width for p in selected], dtype=np.float64)
    err = np.stack([p.err_sq for p in selected])
    nonlin = np.stack([p.nonlinear_sq for p in selected])
    total = np.stack([p.x_centered_sq for p in selected])
    fvu = err.sum(1) / total.sum(1)
    fvu_nl = nonlin.sum(1) / total.sum(1)
    c, a, m = fit_power_law(widths, fvu if of == "fvu" else fvu_nl)

    rng = np.random.default_rng(seed)
    n = rows.size
    boot_fvu = np.empty((n_boot, len(selected)))
    boot_nl = np.empty((n_boot, len(selected)))
    boot_par = np.empty((n_boot, 3))
    for i in range(n_boot):
        counts = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
        denom = total @ counts
        boot_fvu[i] = err @ counts / denom
        boot_nl[i] = nonlin @ counts / denom
        boot_par[i] = fit_power_law(widths, boot_fvu[i] if of == "fvu" else boot_nl[i])
    return PowerLawFit(
        c=c, a=a, m=m,
        c_ci=_percentile_ci(boot_par[:, 0]), a_ci=_percentile_ci(boot_par[:, 1]),
        m_ci=_percentile_ci(boot_par[:, 2]), n_boot=n_boot,
        fvu_nonlinear_mean=float(fvu_nl.mean()),
        fvu_nonlinear_mean_ci=_percentile_ci(boot_nl.mean(1)),
        target_l0=float(target_l0),
        widths=tuple(int(w) for w in widths),
        fvu=tuple(float(v) for v in fvu),
        fvu_ci=tuple(_percentile_ci(boot_fvu[:, j]) for j in range(len(selected))),
        fvu_nonlinear=tuple(float(v) for v in fvu_nl),
        fvu_nonlinear_ci=tuple(_percentile_ci(boot_nl[:, j]) for j in range(len(selected))),
        of=of,
    )


def default_target_l0(points: Sequence[SweepPoint]) -> float:
    """Median empirical L0 of the k with the most distinct widths (ties: the smaller k)."""
    by_k: dict[int | None, list[SweepPoint]] = {}
    for p in points:
        by_k.setdefault(p.k, []).append(p)
    k = min(by_k, key=lambda k: (-len({p.width for p in by_k[k]}), -1 if k is None else k))
    return float(np.median([p.l0 for p in by_k[k]]))


def scaling_analysis(decompose_dir: Decompositions, out_dir: str | Path, *,
                     target_l0: float | None = None, n_boot: int = 200,
                     seed: int = 0, encoder_band: float | None = None) -> dict[str, Any]:
    """Run the scaling analysis; writes the two figures under ``out_dir/figures`` only.

    Returns a JSON-able summary: the (width, k) grid, target L0, the selected SAEs with their
    L0 distance, the fit (c, a, m with CIs), mean FVU_nonlinear with CI, per-width FVUs with CIs,
    and figure paths relative to ``out_dir``. ``encoder_band`` (the mean drop of FVU_nonlinear
    under pursuit, from ``encoder_error``) splits the nonlinear band in the stacked figure.
    """
    out_dir = Path(out_dir)
    points = load_sweep(decompose_dir)
    target = default_target_l0(points) if target_l0 is None else float(target_l0)
    selected = select_at_l0(points, target)
    fit = fit_scaling(points, target, n_boot=n_boot, seed=seed)
    floor = None if encoder_band is None else max(fit.fvu_nonlinear_mean - encoder_band, 0.0)
    stacked_figure(fit, selected, out_dir / STACKED_FIGURE, pursuit_nonlinear=floor)
    contour_figure(points, out_dir / CONTOUR_FIGURE)
    return {
        "target_l0": target,
        "target_l0_source": "given"
        if target_l0 is not None
        else "median L0 of the k with most widths",
        "grid": grid_table(points),
        "selected": [
            {"name": p.name, "width": p.width, "k": p.k, "l0": p.l0, "l0_rel_distance": dist}
            for p, dist in selected
        ],
        "fit": {
            "model": "FVU(W) = c + a * W^(-m)",
            "c": fit.c,
            "c_ci": list(fit.c_ci),
            "a": fit.a,
            "a_ci": list(fit.a_ci),
            "m": fit.m,
            "m_ci": list(fit.m_ci),
            "n_boot": fit.n_boot,
            "seed": seed,
            "n_test_tokens": int(selected[0][0].rows.size),
        },
        "fvu_nonlinear_mean": fit.fvu_nonlinear_mean,
        "fvu_nonlinear_mean_ci": list(fit.fvu_nonlinear_mean_ci),
        "encoder_band": encoder_band,
        "per_width": [
            {
                "name": p.name,
                "width": w,
                "fvu": f,
                "fvu_ci": list(fc),
                "fvu_nonlinear": nl,
                "fvu_nonlinear_ci": list(nc),
            }
            for (p, _), w, f, fc, nl, nc in zip(
                selected, fit.widths, fit.fvu, fit.fvu_ci, fit.fvu_nonlinear, fit.fvu_nonlinear_ci
            )
        ],
        "figures": {"stacked": STACKED_FIGURE, "contours": CONTOUR_FIGURE},
    }


def section(s: dict[str, Any], out_dir: Path) -> str:
    f = s["fit"]
    rows = "".join(
        f"<tr><td>{esc(p['name'])}</td><td>{p['width']:,}</td><td>{p['l0']:.1f}</td>"
        f"<td>{100 * p['l0_rel_distance']:.0f} %</td></tr>"
        for p in s["selected"]
    )
    return (
        f"<p>At target L0 ≈ {s['target_l0']:.1f}: FVU(W) = c + a·W<sup>−m</sup> with "
        f"c = {ci_text(f['c'], f['c_ci'])}, a = {ci_text(f['a'], f['a_ci'])}, "
        f"m = {ci_text(f['m'], f['m_ci'])}; mean FVU nonlinear = "
        f"{ci_text(s['fvu_nonlinear_mean'], s['fvu_nonlinear_mean_ci'])} "
        f"(95 % bootstrap intervals over held-out tokens, {f['n_boot']} resamples).</p>"
        f"<table><tr><th>SAE used</th><th>width</th><th>L0</th><th>L0 off target</th></tr>"
        f"{rows}</table>" + figures_html(s["figures"], out_dir)
    )


def _band(results: Results) -> float | None:
    """The encoder-error band (mean drop of FVU nonlinear under pursuit), where it ran."""
    return results.get("encoder_error", {}).get("fvu_nonlinear_drop_mean")


def _run(run: RunDir, cfg: RunConfig, results: Results, progress: bool) -> dict[str, Any]:
    return scaling_analysis(run, run.path, seed=cfg.split.seed, encoder_band=_band(results))


ANALYSIS = Analysis(
    name="scaling",
    title="Scaling with width",
    run=_run,
    section=section,
    settings=lambda cfg, results: (_band(results),),
    needs=("encoder_error",),
)
