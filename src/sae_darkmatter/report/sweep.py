"""A sweep's comparative report: ``sweep.json`` and ``report.html`` across the swept values.

Per value: each SAE's held-out metrics with their 95 % intervals, the verdict of every claim
of "Against the paper", the seconds each stage took in this invocation (near zero where the
run was reused), a link to the value's own report; and one figure of the main metrics against
the value.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sae_darkmatter import __version__, layout
from sae_darkmatter._io import atomic_path, write_json
from sae_darkmatter.markup import PAGE_STYLE, esc, figures_html
from sae_darkmatter.plotting import plt, save_figure

SWEEP_JSON = "sweep.json"
METRICS = (  # key, label, format: the columns of the table; the first four are plotted
    ("fvu", "FVU", "{:.4f}"),
    ("fvu_nonlinear", "FVU nonlinear", "{:.4f}"),
    ("r2_error_mean_dim", "R² e (mean dim)", "{:.3f}"),
    ("r2_error_norm", "R² ‖e‖²", "{:.3f}"),
    ("fvu_linear", "FVU linear", "{:.4f}"),
    ("linear_share", "linear share", "{:.3f}"),
)
_VERDICT_COLOURS = {"agrees": "#dff0d8", "disagrees": "#f8d7da", "inconclusive": "#fff3cd"}


def write_sweep_report(over: str, runs: Sequence[tuple[Any, str, dict[str, Any]]],
                       out_dir: Path) -> dict[str, Any]:
    """Write ``sweep.json``, ``figures/sweep_metrics.png`` and ``report.html`` into ``out_dir``
    from each value's ``(value, run folder name, metrics of its run)``; return the summary."""
    points = [_point(value, folder, metrics) for value, folder, metrics in runs]
    figure = metrics_vs_value(over, points, out_dir / layout.FIGURES / "sweep_metrics.png")
    summary = {
        "sae_darkmatter_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "over": over,
        "values": [p["value"] for p in points],
        "points": points,
        "figures": {"metrics_vs_value": str(figure.relative_to(out_dir))},
    }
    write_json(out_dir / SWEEP_JSON, summary)
    with atomic_path(out_dir / layout.REPORT) as tmp:
        tmp.write_text(_html(summary, out_dir))
    return summary


def _point(value: Any, folder: str, metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "d_sae", "k", "l0", *(key for key, _, _ in METRICS))
    saes = [{**{k: s.get(k) for k in keys}, "ci": s.get("ci", {})} for s in metrics["saes"]]
    claims = [{k: c.get(k) for k in ("key", "claim", "verdict", "detail", "items")}
              for c in metrics.get("analyses", {}).get("paper", {}).get("claims", [])]
    return {"value": value, "folder": folder, "report": f"{folder}/{layout.REPORT}",
            "model": metrics.get("model"), "hook": metrics.get("hook"), "saes": saes,
            "claims": claims, "timings_s": metrics.get("timings_s", {})}


def metrics_vs_value(over: str, points: Sequence[dict[str, Any]], path: Path) -> Path:
    """One panel per main metric against the swept value, one line per SAE name, with the
    95 % intervals as error bars. Numeric values sit on a numeric axis (log when they span
    10x or more), others in order."""
    values = [p["value"] for p in points]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x = np.array(values, dtype=float) if numeric else np.arange(len(values), dtype=float)
    names = list(dict.fromkeys(s["name"] for p in points for s in p["saes"]))
    colours = plt.cm.viridis(np.linspace(0.1, 0.85, max(len(names), 1)))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    for ax, (key, label, _) in zip(axes.flat, METRICS):
        for colour, name in zip(colours, names):
            rows = [(xi, s) for xi, p in zip(x, points) for s in p["saes"] if s["name"] == name]
            xs = np.array([xi for xi, _ in rows])
            ys = np.array([math.nan if s[key] is None else s[key] for _, s in rows], dtype=float)
            ci = [s["ci"].get(key) for _, s in rows]
            err = None
            if all(c is not None for c in ci):
                lo = np.array([c[0] for c in ci], dtype=float)  # type: ignore[index]
                hi = np.array([c[1] for c in ci], dtype=float)  # type: ignore[index]
                err = np.clip(np.vstack([ys - lo, hi - ys]), 0, None)
            ax.errorbar(xs, ys, yerr=err, fmt="o-", color=colour, capsize=3, label=name)
        ax.set_title(label)
        ax.set_xlabel(over)
        ax.grid(alpha=0.3)
        if numeric and x.min() > 0 and x.max() >= 10 * x.min():
            ax.set_xscale("log")
        ax.set_xticks(x, [_label(v) for v in values])
    axes[0][0].legend(frameon=False, fontsize=7)
    fig.suptitle(f"Held-out metrics against {over} (95 % intervals)")
    fig.tight_layout()
    return save_figure(fig, path)


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:,}" if isinstance(value, int) else str(value)


def _cell(s: dict[str, Any], key: str, fmt: str) -> str:
    if s.get(key) is None:
        return "<td>–</td>"
    text = esc(fmt.format(s[key]))
    if key in s["ci"]:
        lo, hi = s["ci"][key]
        text += f"<br><small>[{esc(fmt.format(lo))}, {esc(fmt.format(hi))}]</small>"
    return f"<td>{text}</td>"


def _claim_cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "<td>–</td>"
    values = [i["value"] for i in c["items"] if i.get("value") is not None]
    ours = ""
    if values:
        lo, hi = min(values), max(values)
        ours = f"{lo:.3g}" if lo == hi else f"{lo:.3g} to {hi:.3g}"
        ours += "; "
    colour = _VERDICT_COLOURS.get(c["verdict"], "#eee")
    return (f'<td style="background: {colour}"><b>{esc(c["verdict"])}</b><br>'
            f"<small>{esc(ours)}{esc(str(c['detail']))}</small></td>")


def _html(m: dict[str, Any], out_dir: Path) -> str:
    over, points = m["over"], m["points"]

    def link(p: dict[str, Any]) -> str:
        return f'<a href="{esc(p["report"])}">{esc(over)} = {esc(_label(p["value"]))}</a>'

    head = "".join(f"<th>{esc(label)}</th>" for _, label, _ in METRICS)
    rows = "".join(
        f"<tr><td>{link(p)}</td><td><code>{esc(str(p['hook']))}</code></td>"
        f"<td>{esc(str(s['name']))}</td><td>{s['l0']:.1f}</td>"
        + "".join(_cell(s, key, fmt) for key, _, fmt in METRICS) + "</tr>"
        for p in points for s in p["saes"]
    )
    claims = list(dict.fromkeys((c["key"], c["claim"]) for p in points for c in p["claims"]))
    by_key = [{c["key"]: c for c in p["claims"]} for p in points]
    claim_rows = "".join(
        f"<tr><td>{esc(text)}</td>" + "".join(_claim_cell(b.get(key)) for b in by_key) + "</tr>"
        for key, text in claims
    )
    stages = list(dict.fromkeys(k for p in points for k in p["timings_s"]))
    time_rows = "".join(
        f"<tr><td>{link(p)}</td>"
        + "".join(f"<td>{p['timings_s'].get(k, 0):,.1f}</td>" for k in stages)
        + f"<td>{sum(p['timings_s'].values()):,.1f}</td></tr>"
        for p in points
    )
    models = sorted({str(p["model"]) for p in points})
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SAE dark matter sweep over {esc(over)}</title>
{PAGE_STYLE}</head><body>
<h1>SAE dark matter: sweep over {esc(over)}</h1>
<p>Values {esc(", ".join(_label(p["value"]) for p in points))}; model \
<code>{esc(", ".join(models))}</code>; sae-darkmatter {esc(m["sae_darkmatter_version"])}, \
{esc(m["created"])}. Each value is an ordinary run in its own folder, with its own report:
{", ".join(link(p) for p in points)}.</p>
<h2>Against the paper, by {esc(over)}</h2>
<p>The verdict of each claim in each run (our estimates' range; how they split). A verdict
needs a 95 % interval: an estimate <i>agrees</i> when its interval lies inside the claim's
range and <i>disagrees</i> when it lies outside; each run's report has the details.</p>
<table><tr><th>claim</th>{"".join(f"<th>{link(p)}</th>" for p in points)}</tr>{claim_rows}</table>
<h2>Metrics (held-out tokens)</h2>
<table><tr><th>{esc(over)}</th><th>hook</th><th>SAE</th><th>L0</th>{head}</tr>{rows}</table>
<p>Brackets: 95 % intervals, as in each run's report.</p>
<h2>Figures</h2>{figures_html(m["figures"], out_dir)}
<h2>Seconds per stage (this invocation; reused stages take about none)</h2>
<table><tr><th>{esc(over)}</th>{"".join(f"<th>{esc(k)}</th>" for k in stages)}\
<th>total</th></tr>{time_rows}</table>
</body></html>
"""
