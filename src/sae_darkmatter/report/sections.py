"""HTML sections of the report, one function per analysis (each says why when it was skipped)."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

esc = html.escape


def _rel(path: str, out_dir: Path) -> str:
    p = Path(path)
    return str(p.relative_to(out_dir)) if p.is_absolute() and p.is_relative_to(out_dir) else str(p)


def figures_html(paths: dict[str, str], out_dir: Path) -> str:
    """<figure> tags for figure paths (made relative to the report folder)."""
    return "".join(
        f'<figure><img src="{esc(_rel(p, out_dir))}" alt="{esc(k)}"></figure>'
        for k, p in paths.items()
    )


def _ci(value: float, ci: Any) -> str:
    return f"{value:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]"


def _scaling(s: dict[str, Any], out_dir: Path) -> str:
    f = s["fit"]
    rows = "".join(
        f"<tr><td>{esc(p['name'])}</td><td>{p['width']:,}</td><td>{p['l0']:.1f}</td>"
        f"<td>{100 * p['l0_rel_distance']:.0f} %</td></tr>" for p in s["selected"]
    )
    return (
        f"<p>At target L0 ≈ {s['target_l0']:.1f}: FVU(W) = c + a·W<sup>−m</sup> with "
        f"c = {_ci(f['c'], f['c_ci'])}, a = {_ci(f['a'], f['a_ci'])}, "
        f"m = {_ci(f['m'], f['m_ci'])}; mean FVU nonlinear = "
        f"{_ci(s['fvu_nonlinear_mean'], s['fvu_nonlinear_mean_ci'])} "
        f"(95 % bootstrap intervals over held-out tokens, {f['n_boot']} resamples).</p>"
        f"<table><tr><th>SAE used</th><th>width</th><th>L0</th><th>L0 off target</th></tr>"
        f"{rows}</table>" + figures_html(s["figures"], out_dir)
    )


def _per_token(p: dict[str, Any], out_dir: Path) -> str:
    parts = [
        "<p>Held-out R² of predicting SAE j's per-token ‖e‖ from SAE i's, and the share of "
        "the remaining variance removed by adding SAE i's ‖nonlinear error‖.</p>"
        + figures_html(p["figures"], out_dir)
    ]
    for kind in ("nonlinear", "linear"):
        d = p.get("darkest", {}).get(kind)
        if d and d.get("html"):
            parts.append(d["html"])  # titled "Contexts with the largest {kind} error"
    return "".join(parts)


def _norms(n: dict[str, Any], out_dir: Path) -> str:
    b = n["baselines"]
    names = [k for k in b if k not in ("baselines", "n_fit", "n_score")]
    head = "".join(f"<th>{esc(x)}</th>" for x in b["baselines"])
    body = "".join(
        f"<tr><td>{esc(name)}</td>"
        + "".join(f"<td>{b[name][x]:.3f}</td>" for x in b["baselines"]) + "</tr>"
        for name in names
    )
    al = n.get("alignment", {})
    return (
        f"<p>Held-out R² of ‖e‖² ({b['n_fit']:,} fit / {b['n_score']:,} scored tokens).</p>"
        f"<table><tr><th>SAE</th>{head}</tr>{body}</table>"
        f"<p>Latent mean activation vs norm-probe projection on its decoder direction "
        f"({esc(str(al.get('sae')))}): Pearson {al.get('pearson') or float('nan'):.3f}, "
        f"Spearman {al.get('spearman') or float('nan'):.3f} over {al.get('n_latents')} latents.</p>"
        + figures_html(n["figures"], out_dir)
    )


# analysis name in analyses.json -> (section title, renderer), in report order
SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any], Path], str]]] = {
    "scaling": ("Scaling with width", _scaling),
    "per_token": ("Per-token scaling", _per_token),
    "norms": ("Predicting the error norm: baselines", _norms),
}


def analyses_html(a: dict[str, Any], out_dir: Path) -> str:
    """Report sections for the analyses that ran (a skipped one says why)."""
    parts = []
    for name, (title, render) in SECTIONS.items():
        result = a.get(name)
        if not result:
            continue
        parts.append(f"<h2>{esc(title)}</h2>")
        if "skipped" in result:
            parts.append(f"<p>Skipped: {esc(result['skipped'])}</p>")
        else:
            parts.append(render(result, out_dir))
    return "".join(parts)
