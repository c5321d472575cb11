"""Report figures (matplotlib, Agg backend): FVU split by width, error-norm prediction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sae_darkmatter.plotting import plt, save_figure


def _by_k(results: Sequence[dict[str, Any]]) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: r["d_sae"]):
        groups.setdefault(r.get("k"), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0])))


def fvu_vs_width(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """Held-out FVU against SAE width, one colour per k: total (solid) and nonlinear (dashed).

    The gap between the two lines is the linearly predictable error; the area under the
    dashed line is shaded for the k with the most widths.
    """
    groups = _by_k(results)
    fig, ax = plt.subplots(figsize=(6.6, 4.3))
    colours = plt.cm.viridis(np.linspace(0.1, 0.85, len(groups)))
    main_k = max(groups, key=lambda k: len(groups[k]))
    top = 0.0
    for colour, (k, rows) in zip(colours, groups.items()):
        width = np.array([r["d_sae"] for r in rows], dtype=float)
        total = np.array([r["fvu"] for r in rows])
        nonlin = np.array([r["fvu_nonlinear"] for r in rows])
        label = f"k={k}" if k is not None else "SAE"
        ax.plot(width, total, "o-", color=colour, label=f"FVU, {label}")
        ax.plot(width, nonlin, "s--", color=colour, label=f"FVU nonlinear, {label}")
        if k == main_k:
            ax.fill_between(width, 0, nonlin, color=colour, alpha=0.15)
            ax.fill_between(width, nonlin, total, color="#e8a33d", alpha=0.25,
                            label=f"linear error, {label}")
        top = max(top, float(total.max()))
    widths = sorted({r["d_sae"] for r in results})
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [f"{int(w):,}" for w in widths])
    ax.set_xlabel("SAE width (latents)")
    ax.set_ylabel("fraction of variance unexplained (held-out)")
    ax.set_ylim(0, max(top * 1.15, 1e-3))
    ax.set_title("SAE error: total (solid) and nonlinear (dashed)")
    ax.legend(frameon=False, fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def error_norm_prediction(
    samples: Sequence[tuple[str, np.ndarray, np.ndarray, float]], path: Path
) -> Path:
    """Predicted vs actual ‖e‖² on held-out tokens, one panel per SAE: (name, true, pred, R²).

    Log-log axes: squared error norms span orders of magnitude and a few heavy-tailed tokens
    would squash a linear plot. Predictions below the smallest actual value are drawn at it.
    """
    n = len(samples)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    for ax, (name, true, pred, r2) in zip(axes[0], samples):
        if true.size:
            lo, hi = float(true[true > 0].min()), float(max(true.max(), pred.max()))
            ax.scatter(true, np.clip(pred, lo, None), s=3, alpha=0.35, color="#2a6f97",
                       rasterized=True)
            ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--")
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(f"{name}\nR² = {r2:.3f}", fontsize=9)
        ax.set_xlabel("actual ‖e‖²")
        ax.set_ylabel("predicted ‖e‖² (linear in x)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def r2_vs_width(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """Held-out R² of the error vector (mean per dimension) and of its squared norm, by width."""
    groups = _by_k(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    colours = plt.cm.viridis(np.linspace(0.1, 0.85, len(groups)))
    for colour, (k, rows) in zip(colours, groups.items()):
        width = [r["d_sae"] for r in rows]
        label = f"k={k}" if k is not None else "SAE"
        axes[0].plot(width, [r["r2_error_mean_dim"] for r in rows], "s-", color=colour, label=label)
        axes[1].plot(width, [r["r2_error_norm"] for r in rows], "o-", color=colour, label=label)
    widths = sorted({r["d_sae"] for r in results})
    for ax, title in zip(axes, ("mean per-dim R² of e from x", "R² of ‖e‖² from x")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [f"{int(w):,}" for w in widths])
        ax.set_xlabel("SAE width (latents)")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out R²")
    axes[0].legend(frameon=False)
    return save_figure(fig, path)
