"""The synthetic-model report: Fig. 15 lines, noise heatmaps, fit-mode comparison, Table 1."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from sae_darkmatter._io import atomic_path, write_json
from sae_darkmatter.analyses.paper import section as paper_section
from sae_darkmatter.plotting import plt, save_figure


def _line_figure(results: dict[str, Any], path: Path) -> Path:
    lines, fits = results["lines"], results["fits"]
    fig, axes = plt.subplots(
        1, len(lines), figsize=(5.2 * len(lines), 3.8), squeeze=False, sharey=True
    )
    styles = {"in_sample": "-", "held_out": "--", "debiased": ":"}
    for ax, line in zip(axes[0], lines):
        ab = [100 * p["ablation"] for p in line["points"]]
        for fit in fits:
            ls = styles[fit]
            ax.plot(ab, [p["fits"][fit]["fvu_recon"] for p in line["points"]], "o" + ls,
                    color="black", label=f"FVU(SAE) [{fit}]")
            ax.plot(ab, [p["fits"][fit]["fvu_lin"] for p in line["points"]], "s" + ls,
                    color="#4c4c8c", label=f"FVU(SAE + linear) [{fit}]")
        ax.invert_xaxis()
        ax.set_xlabel("% of least active features ablated")
        ax.set_title(
            f"activation noise {line['act_noise']:g}, reconstruction noise {line['rec_noise']:g}"
        )
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("FVU")
    axes[0][0].legend(frameon=False, fontsize=7)
    return save_figure(fig, path)


def _heatmap_figure(results: dict[str, Any], fit: str, path: Path) -> Path:
    levels = results["config"]["noise_levels"]
    m = len(levels)
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.4))
    for ax, est, title in zip(axes, ("est_nonlinear", "est_linear"),
                              ("estimated nonlinear error", "estimated linear error")):
        grid = np.array([g["fits"][fit][est] for g in results["grid"]]).reshape(m, m)
        im = ax.imshow(grid, origin="lower", cmap="viridis")
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=7,
                    color="white" if v < grid.max() * 0.6 else "black")
        ax.set_xticks(range(m), [f"{v:g}" for v in levels])
        ax.set_yticks(range(m), [f"{v:g}" for v in levels])
        ax.set_xlabel("reconstruction noise (std, clean-RMS units)")
        ax.set_ylabel("activation noise (std, clean-RMS units)")
        ax.set_title(f"{title} [{fit}]")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, path)


def _fit_comparison_figure(results: dict[str, Any], path: Path) -> Path:
    grid = results["grid"]
    truth = [g["truth"]["reconstruction_noise"] for g in grid]
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for fit, marker in zip(results["fits"], "o^sD"):
        ax.scatter(truth, [g["fits"][fit]["est_nonlinear"] for g in grid], marker=marker,
                   alpha=0.75, label=fit)
    hi = max(max(truth), *(g["fits"][f]["est_nonlinear"] for g in grid for f in results["fits"]))
    ax.plot([0, hi], [0, hi], color="gray", lw=1, label="estimate = truth")
    ax.set_xlabel("true reconstruction-noise share of TV(x')")
    ax.set_ylabel("estimated nonlinear error (FVU)")
    ax.set_title("nonlinear estimate by probe fit mode")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _table_html(t: dict[str, dict[str, float]], fit: str) -> str:
    rows = "".join(
        f"<tr><th>{name}</th><td>{t[key]['est_linear']:.3f}</td><td>{t[key]['est_nonlinear']:.3f}</td></tr>"
        for key, name in (
            ("act_noise", "Activation noise"),
            ("rec_noise", "SAE-reconstruction noise"),
        )
    )
    return (f"<h3>Table 1 ({html.escape(fit)})</h3><table><tr><th></th><th>Est. linear error</th>"
            f"<th>Est. nonlinear error</th></tr>{rows}</table>")


def write_synthetic_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``synthetic.json``, the figures and ``synthetic.html``; return the HTML path."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    write_json(out_dir / "synthetic.json", results)
    figs = [_line_figure(results, fig_dir / "synthetic_lines.png")]
    figs += [
        _heatmap_figure(results, fit, fig_dir / f"synthetic_heatmaps_{fit}.png")
        for fit in results["fits"]
    ]
    if len(results["fits"]) > 1:
        figs.append(_fit_comparison_figure(results, fig_dir / "synthetic_fit_modes.png"))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Synthetic dark matter</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;"
        "padding:4px 10px;text-align:right}</style></head><body>",
        "<h1>Synthetic activations with known ground truth</h1>",
        f"<p>Config: <code>{html.escape(str(results['config']))}</code></p>",
        "<p>FVU is pooled with per-dimension means (the paper's synthetic script subtracted one "
        "global scalar mean). Noise stds are in units of the clean activations' per-coordinate "
        "RMS (the paper used absolute stds 0–4 on Gemma-2-9B).</p>",
    ]
    if results.get("paper"):
        parts += ["<h2>Against the paper</h2>", paper_section(results["paper"], out_dir)]
    parts += [_table_html(results["table1"][fit], fit) for fit in results["fits"]]
    diff = results.get("fit_differences") or {}
    if diff:
        parts.append("<h3>Held-out minus in-sample</h3><table>" + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{v:.4f}</td></tr>" for k, v in diff.items()
            if isinstance(v, float)) + f"</table><p>{html.escape(diff['note'])}</p>")
    if results.get("trained_sae_check"):
        keys = ("act_noise", "fvu_recon", "est_linear", "est_nonlinear",
                "true_activation_noise_share", "features_recovered")
        rows = "".join("<tr>" + "".join(f"<td>{r[k]:.4g}</td>" for k in keys) + "</tr>"
                       for r in results["trained_sae_check"])
        parts.append("<h3>Trained TopK SAE (held-out)</h3><table><tr>" +
                     "".join(f"<th>{k}</th>" for k in keys) + f"</tr>{rows}</table>")
    parts += [f"<p><img src='figures/{p.name}' style='max-width:100%'></p>" for p in figs]
    parts.append("</body></html>")
    path = out_dir / "synthetic.html"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
    return path
