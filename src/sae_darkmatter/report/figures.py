"""Report figures (matplotlib, Agg backend): FVU split by width, error-norm prediction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .._io import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def fvu_vs_width(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """Held-out FVU against SAE width, the area under it split into nonlinear and linear error."""
    rows = sorted(results, key=lambda r: r["d_sae"])
    width = np.array([r["d_sae"] for r in rows], dtype=float)
    total = np.array([r["fvu"] for r in rows])
    nonlin = np.array([r["fvu_nonlinear"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.fill_between(width, 0, nonlin, color="#4c4c8c", alpha=0.55, label="nonlinear error")
    ax.fill_between(width, nonlin, total, color="#e8a33d", alpha=0.55, label="linear error")
    ax.plot(width, total, "o-", color="black", label="FVU (SAE)")
    ax.plot(width, nonlin, "s--", color="#2a2a6a", label="FVU nonlinear")
    ax.set_xscale("log", base=2)
    ax.set_xticks(width, [f"{int(w):,}" for w in width])
    ax.set_xlabel("SAE width (latents)")
    ax.set_ylabel("fraction of variance unexplained (held-out)")
    ax.set_ylim(0, max(total.max() * 1.15, 1e-3))
    ks = sorted({r.get("k") for r in rows if r.get("k") is not None})
    ax.set_title("SAE error split into linear and nonlinear parts" + (f" (k={ks[0]})" if len(ks) == 1 else ""))
    ax.legend(frameon=False)
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
    rows = sorted(results, key=lambda r: r["d_sae"])
    width = [r["d_sae"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(width, [r["r2_error_norm"] for r in rows], "o-", label="R² of ‖e‖² from x")
    ax.plot(width, [r["r2_error_mean_dim"] for r in rows], "s-", label="mean per-dim R² of e from x")
    ax.plot(width, [r["linear_share"] for r in rows], "^-", label="linear share of Σ‖e‖²")
    ax.set_xscale("log", base=2)
    ax.set_xticks(width, [f"{int(w):,}" for w in width])
    ax.set_xlabel("SAE width (latents)")
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out R²")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
