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


def _encoder_error(r: dict[str, Any], out_dir: Path) -> str:
    rows = "".join(
        f"<tr><td>{esc(e['name'])}</td><td>{e['width']:,}</td><td>{e['sae_l0']:.1f} / "
        f"{e['pursuit_l0']:.1f}</td><td>{e['sae_fvu']:.4f} / {e['pursuit_fvu']:.4f}</td>"
        f"<td>{e['sae_fvu_nonlinear']:.4f} / {e['pursuit_fvu_nonlinear']:.4f}</td>"
        f"<td>{e['fvu_nonlinear_drop']:+.4f}</td></tr>" for e in r["per_sae"]
    )
    return (
        f"<p>Each SAE of the scaling fit re-encoded by {esc(str(r['method']))} over its own decoder "
        f"(L0 {esc(str(r['l0']))}), decomposed with the SAE on the same "
        f"{r['n_probe_train']:,} + {r['n_probe_test']:,} probe-train/test tokens. The drop in FVU "
        f"nonlinear is the encoder error (mean {r['fvu_nonlinear_drop_mean']:+.4f}; its band is "
        f"drawn in the scaling figure).</p><table><tr><th>SAE</th><th>width</th>"
        f"<th>L0 SAE / pursuit</th><th>FVU SAE / pursuit</th><th>FVU nonlinear SAE / pursuit</th>"
        f"<th>encoder error</th></tr>{rows}</table>" + figures_html(r["figures"], out_dir)
    )


def _cross_layer(r: dict[str, Any], out_dir: Path) -> str:
    rows = "".join(
        f"<tr><td>{esc(name)}</td>"
        + "".join(f"<td>{p[t]['r2_pooled']:.3f}</td>" for t in ("error", "linear", "nonlinear"))
        + f"<td>{p['nonlinear_remaining']:.3f}</td></tr>"
        for name, p in r["predictors"].items()
    )
    best = r["best"]
    return (
        f"<p>Held-out R² (pooled) of predicting the {esc(r['target'])} SAE error e, its linear part "
        f"ê and its nonlinear part e − ê linearly from other hooks' SAE reconstructions (and x); "
        f"{r['n_probe_train']:,} fit / {r['n_probe_test']:,} scored tokens. Best set: "
        f"<code>{esc(best['predictor'])}</code> leaves {100 * best['nonlinear_remaining']:.1f} % of "
        f"FVU nonlinear ({best['fvu_nonlinear_before']:.4f} → {best['fvu_nonlinear_after']:.4f}; "
        f"chosen on the scored tokens, so slightly optimistic).</p>"
        f"<table><tr><th>predictors</th><th>R² e</th><th>R² ê</th><th>R² e − ê</th>"
        f"<th>nonlinear left</th></tr>{rows}</table>" + figures_html(r["figures"], out_dir)
    )


def _num(value: Any, fmt: str) -> str:
    """A formatted number, or a dash where there is none (e.g. an L0 outside a sweep)."""
    return "–" if value is None else fmt.format(value)


def _error_saes(r: dict[str, Any], out_dir: Path) -> str:
    rows = "".join(
        f"<tr><td>{esc(t['sae'])}</td><td>{t['width']:,}</td><td>{t['l0']:.1f}</td>"
        + "".join(
            f"<td>{_num(t[f'fvu_{p}'], '{:.3f}')}</td>" for p in ("error", "linear", "nonlinear")
        )
        + "".join(
            f"<td>{_num(t[f'dead_{p}'], '{}')}</td>" for p in ("error", "linear", "nonlinear")
        )
        + "</tr>"
        for t in r["table"]
    )
    tokens = r["bases"][0]["tokens"] if r["bases"] else {}
    return (
        f"<p>SAEs trained on the SAE error e, its linear part ê and its nonlinear part e − ê, on "
        f"tokens the error probe never saw ({tokens.get('train', 0):,} train / "
        f"{tokens.get('eval', 0):,} held-out tokens, split by context). Held-out FVU of each "
        f"target and dead latents, compared at matched L0 (– : that L0 is outside the "
        f"target's sweep):</p>"
        f"<table><tr><th>base SAE</th><th>width</th><th>L0</th><th>FVU e</th><th>FVU ê</th>"
        f"<th>FVU e − ê</th><th>dead e</th><th>dead ê</th><th>dead e − ê</th></tr>{rows}</table>"
        + figures_html(r["figures"], out_dir)
    )


def _downstream(r: dict[str, Any], out_dir: Path) -> str:
    def ci(v: float, c: Any) -> str:
        return f"{v:.2f} <small>[{c[0]:.2f}, {c[1]:.2f}]</small>"

    rows = "".join(
        f"<tr><td>{esc(t['sae'])}</td><td>{t['width']:,}</td><td>{t['l0']:.1f}</td>"
        f"<td>{t['ce_increase_sae']:+.3f}</td>"
        + "".join(f"<td>{ci(t[f'ce_gap_closed_{p}'], t[f'ce_gap_closed_{p}_ci'])}</td>"
                  f"<td>{t[f'fvu_gap_closed_{p}']:.2f}</td>" for p in ("linear", "nonlinear"))
        + f"<td>{t['ce_gap_closed_sae+random@error']:.2f}</td></tr>" for t in r["table"]
    )
    tok, sh = r["tokens"], r["shared"]
    clean = sh["clean"]["ce"]["mean"]
    ablations = ", ".join(f"{name} ablation {sh[key]['ce']['mean']:.3f}"
                          for key, name in (("zero", "zero"), ("mean", "mean")) if key in sh)
    return (
        f"<p>The SAE reconstruction and its parts spliced into the model at {esc(r['hook'])} "
        f"(real forward passes) on {tok['contexts']} evaluation contexts; CE averaged over "
        f"{tok['averaged']:,} tokens. Clean CE {clean:.3f} (equal to the harvest's stored loss: max "
        f"difference {r['check'].get('clean_vs_stored_max_abs') or 0:.1e}); {esc(ablations)}. Share of "
        f"the CE gap of x̂ closed by adding each error part (95 % bootstrap over contexts) next to "
        f"the share of the FVU it closes; the last column adds a random vector of ‖e‖ instead.</p>"
        f"<table><tr><th>SAE</th><th>width</th><th>L0</th><th>ΔCE x̂</th><th>CE gap closed "
        f"by ê</th><th>FVU closed by ê</th><th>CE gap closed by e − ê</th><th>FVU closed by "
        f"e − ê</th><th>random ‖e‖</th></tr>{rows}</table>" + figures_html(r["figures"], out_dir)
    )


def _autointerp(r: dict[str, Any], out_dir: Path) -> str:
    def ci(block: dict[str, Any]) -> str:
        v, (lo, hi) = block["value"], block["ci"]
        return (
            "–"
            if v is None
            else f"{v:.3f}" + ("" if lo is None else f" <small>[{lo:.3f}, {hi:.3f}]</small>")
        )

    rows = "".join(
        f"<tr><td>{esc(s['label'])}</td><td>{esc(s['input'])}</td>"
        f"<td>{s['latents']['scored']} / {s['latents']['requested']}</td>"
        f"<td>{s['latents']['dead']} / {s['latents']['too_rare']}</td>"
        f"<td>{ci(s['detection']['balanced_accuracy'])}</td><td>{ci(s['detection']['recall'])}</td>"
        f"<td>{ci(s['detection']['specificity'])}</td>"
        f"<td>{_num(s['detection']['quantiles'][-1]['accuracy'], '{:.3f}')}</td>"
        f"<td>{s['latents']['unparsable_explanations']} / {s['snippets']['unparsable']}</td></tr>"
        for s in r["saes"]
    )
    examples = "".join(
        f"<li><b>{esc(s['label'])}</b> latent {e['latent']}: {esc(str(e['explanation']))} "
        f"(balanced accuracy {_num(e.get('balanced_accuracy'), '{:.2f}')})</li>"
        for s in r["saes"] for e in s["explanations"][:3]
    )
    st, req = r["settings"], r["requests"]
    return (
        f"<p>An LLM (<code>{esc(str(r['model']))}</code>) explained each sampled latent from its "
        f"{st['n_explain']} top windows ({st['window']} tokens) in explanation contexts; the same model then "
        f"judged which held-out snippets from other contexts activate it: {st['n_per_quantile']} per activation "
        f"quantile (Q1 weakest … Q{st['n_quantiles']} strongest) and {st['n_negatives']} silent ones per latent. "
        f"Balanced accuracy = (recall on activating snippets + specificity on silent ones) / 2; 95 % bootstrap "
        f"intervals over latents. Unparsable answers were retried once, then left out (counted). "
        f"{req['sent']} requests sent, {req['from_cache']} answered from the cache.</p>"
        f"<table><tr><th>SAE</th><th>input</th><th>latents scored</th><th>dead / too rare</th>"
        f"<th>balanced acc.</th><th>recall</th><th>specificity</th><th>top quantile</th>"
        f"<th>unparsable expl. / snippets</th></tr>{rows}</table>"
        f"<ul>{examples}</ul>" + figures_html(r["figures"], out_dir)
    )


# analysis name in analyses.json -> (section title, renderer), in report order
SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any], Path], str]]] = {
    "scaling": ("Scaling with width", _scaling),
    "per_token": ("Per-token scaling", _per_token),
    "norms": ("Predicting the error norm: baselines", _norms),
    "encoder_error": ("Encoder error: pursuit over the SAE's decoder", _encoder_error),
    "cross_layer": ("Predicting the error from other hooks' SAEs", _cross_layer),
    "error_saes": ("SAEs trained on each part of the error", _error_saes),
    "downstream": ("Downstream loss of each part of the error", _downstream),
    "autointerp": ("Are the latents interpretable? Detection scoring by an LLM judge", _autointerp),
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
