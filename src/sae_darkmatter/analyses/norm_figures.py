"""Figures of the norm baselines: R² per baseline, ‖e‖² violins, latent / norm-probe alignment."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from sae_darkmatter.linalg import r2_score
from sae_darkmatter.plotting import plt, save_figure
from sae_darkmatter.run_dir import Decompositions, decompositions_of

if TYPE_CHECKING:
    from matplotlib.collections import PolyCollection


def baseline_figure(result: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars: held-out R² of ‖e‖² per baseline (groups) and SAE (bars)."""
    names = result["baselines"]
    saes = [k for k, v in result.items() if isinstance(v, dict)]
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(names)), 4.2))
    width = 0.8 / max(len(saes), 1)
    pos = np.arange(len(names))
    for i, sae in enumerate(saes):
        vals = np.array([result[sae][b] for b in names], dtype=float)
        ax.bar(pos + (i - (len(saes) - 1) / 2) * width, np.nan_to_num(vals), width, label=sae)
    ax.set_xticks(pos, names, rotation=25, ha="right")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("held-out R² of ‖e‖²")
    ax.set_title("Predicting the SAE error norm: x vs baselines (all with bias)")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, Path(path))


def violin_figure(
    decompose_dir: Decompositions, path: str | Path, *, max_points: int = 20000, seed: int = 0
) -> Path:
    """Per SAE: violins of actual ‖e‖² and the norm probe's prediction (log10 scale).

    Non-positive predictions cannot be drawn on a log scale; they are dropped from the
    predicted violin and counted in the label. The label's R² is over all test tokens.
    """
    decomps = decompositions_of(decompose_dir)
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.8 * len(decomps)), 4.4))
    labels, ticks = [], []
    for i, dec in enumerate(decomps):
        actual = dec.tokens["err_sq"].astype(np.float64)
        pred = dec.tokens["err_sq_pred"].astype(np.float64)
        r2 = r2_score(actual, pred)
        idx = rng.choice(len(actual), min(max_points, len(actual)), replace=False)
        a, p = actual[idx], pred[idx]
        n_bad = int((p <= 0).sum())
        data = [np.log10(v[v > 0]) if (v > 0).any() else np.zeros(1) for v in (a, p)]
        parts = ax.violinplot(data, positions=[3 * i, 3 * i + 1], showmedians=True, widths=0.9)
        # matplotlib's stubs type "bodies" as one Collection; it is a list of them.
        bodies = cast("list[PolyCollection]", parts["bodies"])
        for body, color in zip(bodies, ("#4c72b0", "#dd8452"), strict=True):
            body.set_facecolor(color)
        ticks.append(3 * i + 0.5)
        labels.append(f"{dec.name}\nR²={r2:.3f}" + (f"\n({n_bad} pred ≤ 0)" if n_bad else ""))
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_ylabel("log10 ‖e‖²")
    ax.set_title("‖e‖² per token: actual (blue) vs predicted from x (orange), held-out")
    return save_figure(fig, Path(path))


def alignment_figure(result: dict[str, Any], path: str | Path) -> Path:
    """Scatter of each latent's mean activation when active vs the norm probe's a*·d_i."""
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    ax.scatter(result["mean_activation"], result["projection"], s=4, alpha=0.4, color="#4c72b0")
    ax.set_xlabel("mean activation when active")
    ax.set_ylabel("a*·d_i (norm probe onto unit decoder row)")
    r, rho = result["pearson"], result["spearman"]
    corr = "n/a" if r is None else f"Pearson {r:.3f}, Spearman {rho:.3f}"
    ax.set_title(f"Why ‖e‖² is linear in x: {result['n_latents']} latents ({corr})", fontsize=9)
    return save_figure(fig, Path(path))
