"""The detection figure: accuracy per activation quantile and on negatives, and balanced accuracy,
per SAE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sae_darkmatter.plotting import plt, save_figure

COLOURS = {"x": "#6a994e", "error": "black", "linear": "#e8a33d", "nonlinear": "#2a6f97"}
NAMES = {"x": "x", "error": "e", "linear": "ê (linear)", "nonlinear": "e − ê (nonlinear)"}


def _err(value: float | None, ci: list[float | None]) -> tuple[float, float]:
    lo, hi = ci
    if value is None or lo is None or hi is None:
        return 0.0, 0.0
    return max(value - lo, 0.0), max(hi - value, 0.0)


def _nan(v: float | None) -> float:
    return np.nan if v is None else v


def detection_figure(result: dict[str, Any], path: Path) -> Path:
    """Left: pooled accuracy on negatives ("not") and per quantile (1 weakest); right: balanced
    accuracy.

    Error bars: 95 % bootstrap intervals over latents.
    """
    saes = result["saes"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    n = max(len(saes), 1)
    for i, s in enumerate(saes):
        d = s["detection"]
        colour, shift = COLOURS.get(s["input"]), (i - (n - 1) / 2) * 0.08
        neg, qs = d["negatives"], d["quantiles"]
        ax.errorbar(
            [shift],
            [_nan(neg["accuracy"])],
            yerr=np.array([_err(neg["accuracy"], neg["ci"])]).T,
            fmt="s",
            ms=5,
            capsize=2,
            color=colour,
        )
        label = f"{s['label']} ({NAMES.get(s['input'], s['input'])}, {d['n_latents']} latents)"
        ax.errorbar(
            np.arange(1, len(qs) + 1) + shift,
            [_nan(q["accuracy"]) for q in qs],
            yerr=np.array([_err(q["accuracy"], q["ci"]) for q in qs]).T,
            fmt="o-",
            ms=4,
            capsize=2,
            color=colour,
            label=label,
        )
        b = d["balanced_accuracy"]
        bx.bar(i, _nan(b["value"]), color=COLOURS.get(s["input"], "grey"),
               yerr=np.array([_err(b["value"], b["ci"])]).T, capsize=3)
    q = len(saes[0]["detection"]["quantiles"]) if saes else 0
    ax.set_xticks(range(q + 1), ["not", *(f"Q{j}" for j in range(1, q + 1))])
    ax.axvline(0.5, color="grey", lw=0.8)
    ax.set_xlabel(
        'silent windows ("not": 1 − false-positive rate), then activation quantile (Q1 weakest)'
    )
    ax.set_ylabel("detection accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
    ax.set_title(f"Detection scoring by {result['model']}", fontsize=9)
    bx.axhline(0.5, color="grey", lw=1, ls="--")
    bx.set_xticks(
        range(len(saes)), [NAMES.get(s["input"], s["input"]) for s in saes], rotation=20, fontsize=8
    )
    bx.set_ylabel("balanced accuracy")
    bx.set_ylim(0, 1.02)
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)
