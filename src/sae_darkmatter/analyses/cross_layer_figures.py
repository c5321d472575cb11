"""Figure and report section of the cross-layer analysis (paper §8, Fig. 10b)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sae_darkmatter.markup import esc, figures_html
from sae_darkmatter.plotting import plt, save_figure

TARGETS = ("error", "linear", "nonlinear")  # e, ê, e − ê


def cross_layer_figure(result: Mapping[str, Any], path: str | Path) -> Path:
    """Four panels of horizontal bars per predictor set: held-out R² of e, ê and e − ê (mean
    over dimensions; pooled as dots), and the share of FVU_nonlinear left after adding the
    prediction of e − ê."""
    names = list(result["predictors"])
    rows = [result["predictors"][n] for n in names]
    y = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(15, 0.45 * len(names) + 1.8), sharey=True)
    titles = {
        "error": "SAE error e",
        "linear": "linear part ê",
        "nonlinear": "nonlinear part e − ê",
    }
    for ax, t in zip(axes, TARGETS):
        mean = np.array([r[t]["r2_mean_dim"] for r in rows], dtype=float)
        pooled = np.array([r[t]["r2_pooled"] for r in rows], dtype=float)
        ax.barh(
            y,
            mean,
            color="#5fa55a" if t == "linear" else "#4c4c8c",
            alpha=0.75,
            label="mean over dims",
        )
        ax.plot(pooled, y, "o", color="black", ms=4, label="pooled")
        for yi, v, p in zip(y, mean, pooled):
            ax.annotate(f"{v:.2f}", (np.nanmax([v, p, 0.0]), yi), textcoords="offset points",
                        xytext=(6, -3), fontsize=7)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(f"R² of {titles[t]}", fontsize=9)
        ax.set_xlim(min(0.0, float(np.nanmin([mean, pooled])) - 0.05), 1.05)
        ax.grid(axis="x", alpha=0.3)
    remaining = np.array([r["nonlinear_remaining"] for r in rows], dtype=float)
    axes[3].barh(y, remaining, color="#b05fa5", alpha=0.75)
    for yi, v in zip(y, remaining):
        axes[3].annotate(
            f"{v:.2f}", (v, yi), textcoords="offset points", xytext=(3, -3), fontsize=7
        )
    axes[3].axvline(1.0, color="grey", lw=0.8, ls="--")
    axes[3].set_title("FVU_nonlinear left after adding the prediction", fontsize=9)
    axes[3].grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(
        f"Predicting the {result['target']} SAE error from SAE outputs (held-out)", fontsize=10
    )
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, frameon=False, fontsize=7, loc="upper left")
    return save_figure(fig, Path(path))



def section(r: dict[str, Any], out_dir: Path) -> str:
    """The report's HTML: pooled held-out R² per predictor set, the best set and the figure."""
    rows = "".join(
        f"<tr><td>{esc(name)}</td>"
        + "".join(f"<td>{p[t]['r2_pooled']:.3f}</td>" for t in TARGETS)
        + f"<td>{p['nonlinear_remaining']:.3f}</td></tr>"
        for name, p in r["predictors"].items()
    )
    best = r["best"]
    return (
        f"<p>Held-out R² (pooled) of predicting the {esc(r['target'])} SAE error e, its linear "
        f"part ê and its nonlinear part e − ê linearly from other hooks' SAE reconstructions (and "
        f"x); {r['n_probe_train']:,} fit / {r['n_probe_test']:,} scored tokens. Best set: "
        f"<code>{esc(best['predictor'])}</code> leaves {100 * best['nonlinear_remaining']:.1f} % "
        f"of FVU nonlinear ({best['fvu_nonlinear_before']:.4f} → "
        f"{best['fvu_nonlinear_after']:.4f}; chosen on the scored tokens, so slightly "
        f"optimistic).</p>"
        f"<table><tr><th>predictors</th><th>R² e</th><th>R² ê</th><th>R² e − ê</th>"
        f"<th>nonlinear left</th></tr>{rows}</table>" + figures_html(r["figures"], out_dir)
    )
