"""Figures of the scaling analysis: the stacked dark-matter plot and the (width, L0) contours."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.plotting import plt, save_figure

if TYPE_CHECKING:
    from sae_darkmatter.analyses.scaling import PowerLawFit, SweepPoint


def stacked_figure(fit: PowerLawFit, selected: Sequence[tuple[SweepPoint, float]],
                   path: str | Path, *, extrapolate: float = 10.0,
                   pursuit_nonlinear: float | None = None) -> Path:
    """Paper Fig. 1: FVU by width with the fitted power law and the error split into bands.

    Bands, top to bottom: absent features (curve − c), linear error (c − mean FVU_nonlinear),
    encoder error (mean FVU_nonlinear − ``pursuit_nonlinear``, only when given), nonlinear error.
    The curve is solid over the measured widths and dotted up to ``extrapolate`` × max width.
    """
    if len(selected) != len(fit.widths):
        raise DarkMatterError(
            f"{len(selected)} selected SAEs but the fit has {len(fit.widths)} widths"
        )
    widths = np.array(fit.widths, dtype=float)
    fvu = np.array(fit.fvu)
    ci = np.array(fit.fvu_ci)
    w_max = widths.max() * max(extrapolate, 1.0)
    grid = np.geomspace(widths.min() / 1.25, w_max, 200)
    curve = fit.predict(grid)
    inside = grid <= widths.max()
    nl = fit.fvu_nonlinear_mean
    floor = nl if pursuit_nonlinear is None else pursuit_nonlinear

    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    ax.fill_between(grid, fit.c, curve, color="#e8a33d", alpha=0.45, label="absent features")
    ax.fill_between(grid, nl, fit.c, color="#5fa55a", alpha=0.45, label="linear error")
    if pursuit_nonlinear is not None:
        ax.fill_between(
            grid, pursuit_nonlinear, nl, color="#b05fa5", alpha=0.45, label="encoder error"
        )
    ax.fill_between(grid, 0, floor, color="#4c4c8c", alpha=0.45, label="nonlinear error")
    ax.plot(grid[inside], curve[inside], color="black", lw=1.5,
            label=f"fit: {fit.c:.3g} + {fit.a:.3g}·W^(−{fit.m:.3g})")
    ax.plot(grid[~inside], curve[~inside], color="black", lw=1.5, ls=":")
    ax.axhline(fit.c, color="#2d6a2a", lw=1, ls="--", label=f"asymptote c = {fit.c:.3g}")
    ax.axhline(nl, color="#2a2a6a", lw=1, ls="--", label=f"mean FVU nonlinear = {nl:.3g}")
    ax.errorbar(widths, fvu, yerr=np.abs(np.stack([fvu - ci[:, 0], ci[:, 1] - fvu])), fmt="o",
                color="black", capsize=3, zorder=5, label="FVU (SAE), 95% CI")
    ax.plot(widths, fit.fvu_nonlinear, "s", color="#2a2a6a", ms=4, zorder=5, label="FVU nonlinear")
    for (p, _), w, y in zip(selected, widths, fvu):
        ax.annotate(f"L0 {p.l0:.0f}", (w, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlim(widths.min() / 1.25, w_max)
    ax.set_ylim(0, max(float(ci[:, 1].max()), float(curve.max())) * 1.15)
    ax.set_xlabel("SAE width (latents)")
    ax.set_ylabel("fraction of variance unexplained (held-out)")
    ax.set_title(f"SAE error scaling at L0 ≈ {fit.target_l0:.0f}")
    ax.legend(frameon=False, fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return save_figure(fig, Path(path))


_CONTOUR_PANELS = (
    ("fvu_nonlinear", "FVU nonlinear"),
    ("r2_error_mean_dim", "R² of error vector e ← x"),
    ("r2_error_norm", "R² of ‖e‖² ← x"),
)


def contour_figure(points: Sequence[SweepPoint], path: str | Path) -> Path:
    """Three panels over (width, L0): FVU_nonlinear, error-vector R², error-norm R².

    Linear interpolation (scipy ``griddata``) on (log2 width, log2 L0) when there are at least 3
    widths and 2 L0 values; otherwise (or when the points are degenerate) a scatter with the
    values written next to each SAE. A constant metric is drawn the same way (no contours).
    """
    from scipy.interpolate import griddata
    from scipy.spatial import QhullError

    lw = np.log2([p.width for p in points])
    ll = np.log2([max(p.l0, 1e-9) for p in points])
    interpolate = np.unique(lw).size >= 3 and np.unique(ll).size >= 2
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], _CONTOUR_PANELS):
        vals = np.array(
            [np.nan if p.metrics.get(key) is None else float(p.metrics[key]) for p in points]
        )
        ok = np.isfinite(vals)
        drawn = False
        varies = ok.any() and np.ptp(vals[ok]) > 1e-9 * max(1.0, float(np.abs(vals[ok]).max()))
        if interpolate and varies and ok.sum() >= 3:
            gx, gy = np.meshgrid(
                np.linspace(lw.min(), lw.max(), 120), np.linspace(ll.min(), ll.max(), 120)
            )
            try:
                z = griddata((lw[ok], ll[ok]), vals[ok], (gx, gy), method="linear")
            except QhullError:
                z = None
            if z is not None and np.isfinite(z).any():
                cs = ax.contourf(2**gx, 2**gy, np.ma.masked_invalid(z), levels=12, cmap="viridis")
                fig.colorbar(cs, ax=ax)
                drawn = True
        if drawn:
            ax.scatter(2**lw, 2**ll, c="white", edgecolors="black", s=18, zorder=5, clip_on=False)
        else:
            sc = ax.scatter(2**lw[ok], 2**ll[ok], c=vals[ok], cmap="viridis", s=60,
                            edgecolors="black", zorder=5, clip_on=False)
            if ok.any():
                fig.colorbar(sc, ax=ax)
            for x, y, v in zip(2**lw[ok], 2**ll[ok], vals[ok]):
                ax.annotate(
                    f"{v:.3f}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("SAE width (latents)")
        ax.set_ylabel("empirical L0")
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, Path(path))
