"""Figures and report section of the downstream analysis: CE-gap shares against FVU shares,
CE per splice, and the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sae_darkmatter.analyses.splice import PER_SAE
from sae_darkmatter.markup import esc, figures_html
from sae_darkmatter.plotting import plt, save_figure

DIFF = "ce_gap_closed_linear_minus_nonlinear"


Slices = list[tuple[str, list[dict[str, Any]], str]]  # (title, rows, "width" or "l0")


def kind_slices(transcoders: list[dict[str, Any]]) -> Slices:
    """One panel per kind (transcoders, skip transcoders), each by width."""
    out: Slices = []
    for skip, title in ((False, "transcoders"), (True, "skip transcoders")):
        rows = sorted((t for t in transcoders if t["skip"] == skip), key=lambda t: t["width"])
        if rows:
            out.append((f"{title}, by width", rows, "width"))
    return out


def shares_figure(result: dict[str, Any], path: Path, slices: Slices | None = None) -> Path:
    """Bars: CE gap closed by the linear / nonlinear part (95 % CI); markers: FVU gap closed.

    ``slices``: the panels; default, the SAE sweep's two (``panels``)."""
    if slices is None:
        slices = [(title, rows, by) for (title, rows), by in zip(panels(result["saes"]),
                                                                 ("width", "l0"))]
    fig, axes = plt.subplots(1, len(slices), figsize=(5.2 * len(slices), 3.9), squeeze=False)
    for ax, (title, rows, by) in zip(axes[0], slices):
        pos = np.arange(len(rows))
        for j, (part, colour) in enumerate((("linear", "#e8a33d"), ("nonlinear", "#2a6f97"))):
            stat = [r["ce_gap_closed"][f"sae+{part}"] for r in rows]
            mean = np.array([s["mean"] for s in stat])
            err = np.abs(np.array([s["ci"] for s in stat]).T - mean)
            ax.bar(pos + (j - 0.5) * 0.38, mean, 0.38, yerr=err, color=colour, capsize=3,
                   label=f"CE gap closed by {part} error")
            ax.plot(pos + (j - 0.5) * 0.38, [r["fvu_gap_closed"][part]["mean"] for r in rows], "D",
                    color="black", ms=4, label="FVU gap closed" if j == 0 else None)
        labels = [f"{r['width']:,}" if by == "width" else f"{r['l0']:.0f}" for r in rows]
        ax.set_xticks(pos, labels)
        ax.set_xlabel("width" if by == "width" else "L0")
        ax.set_title(title, fontsize=10)
        ax.axhline(0, color="black", lw=0.8)
        ax.grid(alpha=0.3, axis="y")
    what, hat = _terms(result)
    axes[0][0].set_ylabel(f"share of the {what}'s gap closed")
    axes[0][0].legend(frameon=False, fontsize=7)
    fig.suptitle(
        f"Splicing {hat} + error part at {result['hook']} ({result['tokens']['contexts']} "
        "contexts)",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def ce_figure(result: dict[str, Any], path: Path) -> Path:
    """CE increase over the clean model per intervention and SAE; ablations as horizontal lines."""
    saes = sorted(result["saes"], key=lambda s: (s["k"] or 0, s["width"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(saes) + 3), 4.2))
    pos = np.arange(len(saes))
    for key, colour in zip(PER_SAE, plt.cm.tab10(np.arange(len(PER_SAE)))):
        ax.plot(
            pos, [s["ce_increase"][key]["mean"] for s in saes], "o", color=colour, label=key, ms=5
        )
    for key, ls in (("zero", ":"), ("mean", "--")):
        ax.axhline(
            result["shared"][key]["ce_increase"]["mean"],
            color="grey",
            ls=ls,
            label=f"{key} ablation",
        )
    ax.set_yscale("symlog", linthresh=1e-3)
    lowest = min(s["ce_increase"][key]["mean"] for s in saes for key in PER_SAE)
    ax.set_ylim(bottom=min(0.0, 1.5 * lowest))
    ax.set_xticks(pos, [s["name"] for s in saes], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("CE − clean CE (nats/token)")
    ax.set_title(f"Downstream loss of splices at {result['hook']}", fontsize=10)
    ax.legend(frameon=False, fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def panels(saes: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The sweep's two slices: SAEs of the k with most widths (by width), of the width with most ks
    (by L0).

    Ties: the k nearest the median k, the largest width. Items need "width", "k" and "l0".
    """
    ks = [s["k"] for s in saes if s["k"] is not None]
    median = float(np.median(ks)) if ks else 0.0
    by_k: dict[Any, list[dict[str, Any]]] = {}
    by_w: dict[int, list[dict[str, Any]]] = {}
    for s in saes:
        by_k.setdefault(s["k"], []).append(s)
        by_w.setdefault(s["width"], []).append(s)
    k = max(by_k, key=lambda k: (len(by_k[k]), -abs((k or 0) - median)))
    w = max(by_w, key=lambda w: (len(by_w[w]), w))
    out = [(f"k = {k}, by width", sorted(by_k[k], key=lambda s: s["width"]))]
    if len(by_w[w]) > 1:
        out.append((f"width = {w:,}, by L0", sorted(by_w[w], key=lambda s: s["l0"])))
    return out


def _terms(r: dict[str, Any]) -> tuple[str, str]:
    """What was spliced ("SAE" or "transcoder") and its output's symbol."""
    what = r.get("replaces", "SAE")
    return what, ("x̂" if what == "SAE" else "ŷ")


def section(r: dict[str, Any], out_dir: Path) -> str:
    """The report's HTML: what was spliced, the clean-loss check, the table and the figures."""
    what, hat = _terms(r)

    def ci(v: float, c: Any) -> str:
        return f"{v:.2f} <small>[{c[0]:.2f}, {c[1]:.2f}]</small>"

    rows = "".join(
        f"<tr><td>{esc(t['sae'])}</td><td>{t['width']:,}</td><td>{t['l0']:.1f}</td>"
        f"<td>{t.get('contexts', r['tokens']['contexts'])}</td>"
        f"<td>{t['ce_increase_sae']:+.3f}</td>"
        + "".join(
            f"<td>{ci(t[f'ce_gap_closed_{p}'], t[f'ce_gap_closed_{p}_ci'])}</td>"
            f"<td>{t[f'fvu_gap_closed_{p}']:.2f}</td>"
            for p in ("linear", "nonlinear")
        )
        + (f"<td>{ci(t[DIFF], t[f'{DIFF}_ci'])}</td>" if DIFF in t else "<td></td>")
        + f"<td>{t['ce_gap_closed_sae+random@error']:.2f}</td></tr>"
        for t in r["table"]
    )
    tok, sh, check = r["tokens"], r["shared"], r["check"]
    clean = sh["clean"]["ce"]["mean"]
    diff = check.get("clean_vs_reference_max_abs", check.get("clean_vs_stored_max_abs"))
    against = (
        "the harvest's stored loss" if check.get("reference", "stored") == "stored"
        else f"the model's plain forward pass, whose activations at {esc(r['hook'])} equal the "
        f"stored ones to {check['activations_vs_stored_max_rel']:.1e} (the harvest stored no loss)"
    )
    checked = (
        f"equal to {against}: max difference {diff:.1e}" if diff is not None
        else "not checked: the harvest stored no loss"  # results from before the recomputation
    )
    ablations = ", ".join(
        f"{name} ablation {sh[key]['ce']['mean']:.3f}"
        for key, name in (("zero", "zero"), ("mean", "mean"))
        if key in sh
    )
    spliced = (
        "The SAE reconstruction x̂ and its parts" if what == "SAE" else
        f"Each transcoder's output ŷ (computed from {esc(r['source'])}) and its error parts, in "
        "place of the MLP's output,"
    )
    return (
        f"<p>{spliced} spliced into the model at {esc(r['hook'])} "
        f"(real forward passes) on {tok['contexts']} evaluation contexts; CE averaged over "
        f"{tok['averaged']:,} tokens. {_rule(r)}Clean CE {clean:.3f} ({checked}); "
        f"{esc(ablations)}. Share of the CE gap of {hat} closed by adding each error part (95 % "
        f"bootstrap over contexts) next to the share of the FVU it closes, and their paired "
        f"difference; the last column adds a random vector of ‖e‖ instead.</p>"
        f"<table><tr><th>{what}</th><th>width</th><th>L0</th><th>contexts</th><th>ΔCE {hat}</th>"
        f"<th>CE gap closed by ê</th><th>FVU closed by ê</th><th>CE gap closed by e − ê</th>"
        f"<th>FVU closed by e − ê</th><th>ê minus e − ê</th><th>random ‖e‖</th></tr>{rows}"
        f"</table>" + figures_html(r["figures"], out_dir)
    )


def _rule(r: dict[str, Any]) -> str:
    """The stopping rule's outcome in a sentence ('' for results from before it)."""
    target = r.get("target") or {}
    if target.get("half_width") is None:
        return ""
    what, hat = _terms(r)
    met = f"every {what} met it" if target["met"] else (
        f"not met within {target['contexts_allowed']} contexts: widest "
        f"±{target['widest_half_width']:.3f}")
    return (f"Every intervention ran on the first {target['first_round']} contexts; {what}s "
            f"whose gap-closed intervals were wider than ±{target['half_width']} got more "
            f"contexts for {hat}, {hat} + ê and {hat} + (e − ê) ({met}). ")
