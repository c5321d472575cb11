"""The report's analysis sections: each registered analysis renders its own; autointerp's is
here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_darkmatter.analyses.registry import NAMES, get
from sae_darkmatter.markup import esc, figures_html, num


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
        f"<td>{num(s['detection']['quantiles'][-1]['accuracy'], '{:.3f}')}</td>"
        f"<td>{s['latents']['unparsable_explanations']} / {s['snippets']['unparsable']}</td></tr>"
        for s in r["saes"]
    )
    examples = "".join(
        f"<li><b>{esc(s['label'])}</b> latent {e['latent']}: {esc(str(e['explanation']))} "
        f"(balanced accuracy {num(e.get('balanced_accuracy'), '{:.2f}')})</li>"
        for s in r["saes"] for e in s["explanations"][:3]
    )
    st, req = r["settings"], r["requests"]
    return (
        f"<p>An LLM (<code>{esc(str(r['model']))}</code>) explained each sampled latent from its "
        f"{st['n_explain']} top windows ({st['window']} tokens) in explanation contexts; "
        "the same model then judged which held-out snippets from other contexts activate it: "
        f"{st['n_per_quantile']} per activation quantile (Q1 weakest … Q{st['n_quantiles']} "
        f"strongest) and {st['n_negatives']} silent ones per latent. Balanced accuracy = "
        "(recall on activating snippets + specificity on silent ones) / 2; 95 % bootstrap "
        f"intervals over latents. Unparsable answers were retried once, then left out (counted). "
        f"{req['sent']} requests sent, {req['from_cache']} answered from the cache.</p>"
        f"<table><tr><th>SAE</th><th>input</th><th>latents scored</th><th>dead / too rare</th>"
        f"<th>balanced acc.</th><th>recall</th><th>specificity</th><th>top quantile</th>"
        f"<th>unparsable expl. / snippets</th></tr>{rows}</table>"
        f"<ul>{examples}</ul>" + figures_html(r["figures"], out_dir)
    )


AUTOINTERP_TITLE = "Are the latents interpretable? Detection scoring by an LLM judge"


def analyses_html(a: dict[str, Any], out_dir: Path) -> str:
    """Report sections for the analyses that ran (a skipped one says why), in registry order;
    auto-interpretability (``darkmatter autointerp``) last."""
    sections: list[tuple[str, str, Callable[[dict[str, Any], Path], str]]] = [
        (name, get(name).title, get(name).section) for name in NAMES
    ]
    sections.append(("autointerp", AUTOINTERP_TITLE, _autointerp))
    parts = []
    for name, title, render in sections:
        result = a.get(name)
        if not result:
            continue
        parts.append(f"<h2>{esc(title)}</h2>")
        if "skipped" in result:
            parts.append(f"<p>Skipped: {esc(result['skipped'])}</p>")
        else:
            parts.append(render(result, out_dir))
    return "".join(parts)
