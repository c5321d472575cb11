"""The report stage: collect decomposition results into metrics.json, figures and report.html."""

from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path
from typing import Any

import numpy as np

from sae_darkmatter import __version__, layout
from sae_darkmatter._io import atomic_path, read_json, require_folder, write_json
from sae_darkmatter.markup import PAGE_STYLE
from sae_darkmatter.report import figures
from sae_darkmatter.report.sections import analyses_html
from sae_darkmatter.run_dir import Decompositions, RunDir, decompositions_of

_SCATTER_POINTS = 4000  # held-out tokens drawn per SAE in the norm-prediction scatter
_COLUMNS = [
    ("name", "SAE", "{}"),
    ("d_sae", "width", "{:,}"),
    ("k", "k", "{}"),
    ("l0", "L0", "{:.1f}"),
    ("fvu", "FVU", "{:.4f}"),
    ("fvu_linear", "FVU linear", "{:.4f}"),
    ("fvu_nonlinear", "FVU nonlinear", "{:.4f}"),
    ("linear_share", "linear share", "{:.3f}"),
    ("r2_error_mean_dim", "R² e (mean dim)", "{:.3f}"),
    ("r2_error_norm", "R² ‖e‖²", "{:.3f}"),
]


def display_name(model: str | None) -> str:
    """A short model label: the file or folder name for local paths, else the id as given."""
    if model and Path(model).exists():
        return Path(model).name
    return str(model)


def write_report(decompose_dir: Decompositions, out_dir: str | Path | None = None) -> Path:
    """Write ``metrics.json``, ``figures/*.png`` and ``report.html`` into ``out_dir``.

    ``decompose_dir`` is a run (``RunDir``: ``out_dir`` defaults to its folder), a run or
    ``decompose`` folder, or the decompositions themselves; the analyses' results are read from
    ``out_dir/analyses.json`` where it exists.
    """
    if out_dir is None:
        if not isinstance(decompose_dir, RunDir):
            raise TypeError("write_report: give out_dir, or a RunDir as the first argument")
        out_dir = decompose_dir.path
    out_dir = Path(out_dir)
    require_folder(out_dir, "the report")
    decs = sorted(decompositions_of(decompose_dir), key=lambda d: (d.k or 0, d.width, d.name))
    results = [d.info for d in decs]
    flat = [{"name": r["name"], "architecture": r.get("sae", {}).get("architecture"),
             "k": r.get("sae", {}).get("k"), **r["metrics"], "provenance": r.get("sae", {})}
            for r in results]
    fig_dir = out_dir / layout.FIGURES
    ks = sorted({d.k for d in decs if d.k is not None})
    middle_k = ks[len(ks) // 2] if ks else None
    samples = []
    for d in decs:
        if middle_k is not None and d.k != middle_k:
            continue  # one row of panels: the SAEs of the middle sparsity
        true, pred = d.tokens["err_sq"], d.tokens["err_sq_pred"]
        pick = np.random.default_rng(0).permutation(true.size)[:_SCATTER_POINTS]
        samples.append((d.name, true[pick], pred[pick], d.info["metrics"]["r2_error_norm"]))
    figs = {
        "fvu_vs_width": figures.fvu_vs_width(flat, fig_dir / "fvu_vs_width.png"),
        "error_norm_prediction": figures.error_norm_prediction(
            samples, fig_dir / "error_norm_prediction.png"
        ),
        "r2_vs_width": figures.r2_vs_width(flat, fig_dir / "r2_vs_width.png"),
    }
    analyses_path = out_dir / layout.ANALYSES
    analyses = read_json(analyses_path) if analyses_path.exists() else {}
    metrics = {
        "sae_darkmatter_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "harvest": results[0].get("harvest", {}),
        "data": results[0].get("data", {}),
        "model": results[0].get("model"),
        "hook": results[0]["metrics"]["hook"],
        "saes": flat,
        "figures": {k: str(p.relative_to(out_dir)) for k, p in figs.items()},
        "analyses": {k: _strip_html(v) for k, v in analyses.items()},
    }
    write_json(out_dir / layout.METRICS, metrics)
    page = out_dir / layout.REPORT
    with atomic_path(page) as tmp:
        tmp.write_text(_html(metrics, analyses, out_dir))
    return page


def _strip_html(result: dict[str, Any]) -> dict[str, Any]:
    """An analysis result without its HTML fragments (they belong in report.html only)."""
    out = dict(result)
    if isinstance(out.get("darkest"), dict):
        out["darkest"] = {k: {kk: vv for kk, vv in v.items() if kk != "html"}
                          for k, v in out["darkest"].items()}
    return out


def _provenance_rows(saes: list[dict[str, Any]]) -> str:
    """One row per SAE: library, source (registry id or path), architecture, size, training hook."""
    esc = html.escape
    rows = []
    for s in saes:
        p = s.get("provenance", {})
        hook = p.get("original_hook_name") or p.get("hook_name")
        trained_on = " @ ".join(str(v) for v in (p.get("model_name"), hook) if v)
        cells = [
            s["name"],
            p.get("library", "?"),
            p.get("source", p.get("path", "?")),
            p.get("architecture", "?"),
            f"{s['d_sae']:,}",
            f"{s['l0']:.1f}",
            p.get("dtype") or "?",
            trained_on or "?",
            _trained_with(p.get("trained_with") or {}),
            _training_length(p.get("training") or {}),
        ]
        rows.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    return "".join(rows)


def _trained_with(t: dict[str, Any]) -> str:
    """The training-data settings an SAE's files state, in a few words (``?``: none stated)."""
    parts = []
    if "context_size" in t:
        parts.append(f"{t['context_size']:,}-token contexts")
    if "prepend_bos" in t:
        parts.append("BOS first" if t["prepend_bos"] else "no BOS")
    if t.get("seqpos_slice"):
        start, stop, _ = t["seqpos_slice"]
        parts.append(f"positions [{start or 0}:{'' if stop is None else stop}]")
    if t.get("dataset_path"):
        parts.append(str(t["dataset_path"]))
    return ", ".join(parts) or "?"


def _training_length(t: dict[str, Any]) -> str:
    """Tokens seen and the last doubling's FVU gain of an SAE this tool trained (– otherwise)."""
    if not t.get("tokens_seen"):
        return "–"
    gain = t.get("doubling_gain")
    text = f"{t['tokens_seen']:,} tokens"
    if gain is not None:
        text += f", FVU {-100 * gain:+.1f} % over the last doubling"
    if t.get("stopped") in ("plateau", "cap"):
        text += f" ({'plateau' if t['stopped'] == 'plateau' else 'cap reached'})"
    return text


def _harvest_line(h: dict[str, Any]) -> str:
    """How the contexts were made: count, length, corpus, BOS first or not, separator."""
    if not h:
        return ""
    bos = (
        f"every context starts with the BOS token (id {h['bos_token_id']})"
        if h.get("prepend_bos")
        else "no BOS token prepended"
    )
    sep = h.get("separator_token_id")
    joined = "no separator" if sep is None else f"separator token id {sep}"
    return (f"<li>contexts: {h.get('contexts') or 0:,} × {h['context_length']:,} tokens of "
            f"<code>{html.escape(str(h.get('corpus')))}</code>; {bos}; documents joined with "
            f"{joined} ({html.escape(str(h.get('packing')))} packing)</li>")


def _html(m: dict[str, Any], analyses: dict[str, Any], out_dir: Path) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(label)}</th>" for _, label, _ in _COLUMNS)
    def cell(s: dict[str, Any], key: str, fmt: str) -> str:
        text = esc(fmt.format(s.get(key)))
        if key in s.get("ci", {}):
            lo, hi = s["ci"][key]
            text += f'<br><small>[{esc(fmt.format(lo))}, {esc(fmt.format(hi))}]</small>'
        return f"<td>{text}</td>"

    body = "".join(
        "<tr>" + "".join(cell(s, key, fmt) for key, _, fmt in _COLUMNS) + "</tr>"
        for s in m["saes"]
    )
    data = _harvest_line(m.get("harvest", {})) + "".join(
        f"<li>{esc(k.replace('_', ' '))}: {v:,}</li>" for k, v in m["data"].items())
    figs = "".join(
        f'<figure><img src="{esc(p)}" alt="{esc(k)}"><figcaption>{esc(k.replace("_", " "))}'
        "</figcaption></figure>"
        for k, p in m["figures"].items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SAE dark matter report</title>
{PAGE_STYLE}</head><body>
<h1>SAE dark matter</h1>
<p>Model <code title="{esc(str(m["model"]))}">{esc(display_name(m["model"]))}</code>, \
hook <code>{esc(m["hook"])}</code>;
sae-darkmatter {esc(m["sae_darkmatter_version"])}, {esc(m["created"])}.</p>
<h2>Metrics (held-out tokens)</h2>
<table><tr>{head}</tr>{body}</table>
<p>Brackets: 95 % intervals (bootstrap over held-out tokens; a 16-group jackknife for the
mean per-dimension R²). SAE error <code>e = x − x̂</code>. A least-squares probe \
<code>ê = [x, 1]·W</code> is fit on
probe-train tokens; all numbers are scored on disjoint probe-test tokens. FVU = Σ‖e‖²/Σ‖x − x̄‖²;
FVU nonlinear = Σ‖e − ê‖²/Σ‖x − x̄‖²; FVU linear = FVU − FVU nonlinear; linear share =
1 − Σ‖e − ê‖²/Σ‖e‖²; R² e (mean dim) is the mean over dimensions of the per-dimension R² of ê;
R² ‖e‖² is the R² of a separate linear prediction of ‖e‖² from x.</p>
<h2>SAEs: where they come from</h2>
<table><tr><th>SAE</th><th>library</th><th>source</th><th>architecture</th><th>width</th><th>L0</th>
<th>stored dtype</th><th>trained on</th><th>trained with</th><th>training length</th></tr>\
{_provenance_rows(m["saes"])}</table>
<p>Training length: tokens seen, and how much the last doubling of tokens still lowered the
FVU (before the learning-rate decay; from held-out rows under <code>until = "plateau"</code>,
else from the training batches): a few percent or more means the SAE is still far from its
plateau.</p>
<h2>Data</h2><ul>{data}</ul>
<h2>Figures</h2>{figs}
{analyses_html(analyses, out_dir)}
</body></html>
"""
