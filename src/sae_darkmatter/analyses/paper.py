"""Against the paper: each headline claim of Engels, Riggs & Tegmark checked on this run.

For every claim: the paper's value and where it comes from (``shared/paper_spec.md``: the
abstract, or a figure of the authors' code; "no number in the paper" where it gives none), ours
with its 95 % interval per SAE (or source), the verdict of ``claims`` and one line on what
differs in the setting. A claim whose analysis did not run says so. Nothing is recomputed: the
estimates come from the decompositions and the other analyses' results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_darkmatter.analyses.claims import (
    NOT_RUN,
    Item,
    Region,
    claim_verdict,
    interval_difference,
)
from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.config import RunConfig
from sae_darkmatter.markup import esc
from sae_darkmatter.run_dir import RunDir

PAPER_SETTING = ("Gemma 2 9B layer-20 residual stream, pretrained Gemma Scope JumpReLU SAEs "
                 "(16k-1M latents), 300 contexts of 1,024 tokens, positions 200-1022, probes fit "
                 "on 150k tokens and scored on 96.9k")


NEEDS = ("scaling", "per_token", "encoder_error", "cross_layer", "error_saes", "downstream")


class NotRun(Exception):
    """The analysis a claim reads is not in this run (the message says which)."""


Estimates = Callable[[Results, list[dict[str, Any]]], list[Item]]
VERSION = 2  # part of the cache key: bump when a claim, its reading or its estimates change


@dataclass(frozen=True)
class Claim:
    """One claim: its words, the paper's value and source, our reading of it (``region``) and
    how our estimates are read from a run (``estimates(results, saes)``)."""

    key: str
    claim: str
    paper: str
    source: str
    metric: str
    region: Region
    estimates: Estimates
    differs: str = ""  # what differs for this claim beyond the run's setting ({cfg.<field>})


def _ci(value: Any) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def _analysis(results: Results, name: str) -> dict[str, Any]:
    r = results.get(name)
    if not isinstance(r, dict):
        raise NotRun(f"the {name} analysis is not in this run")
    if "skipped" in r:
        raise NotRun(f"the {name} analysis was skipped: {r['skipped']}")
    return r


def _per_sae(metric: str) -> Estimates:
    def read(results: Results, saes: list[dict[str, Any]]) -> list[Item]:
        return [Item(s["name"], float(s[metric]), _ci(s.get("ci", {}).get(metric)))
                for s in saes if s.get(metric) is not None]
    return read


def _flat_nonlinear(results: Results, saes: list[dict[str, Any]]) -> list[Item]:
    """Relative change of FVU nonlinear from the narrowest to the widest SAE at the scaling
    fit's L0: (widest − narrowest) / their mean."""
    r = _analysis(results, "scaling")
    widths = sorted(r["per_width"], key=lambda w: w["width"])
    if len(widths) < 2:
        raise NotRun("the scaling analysis has fewer than two widths")
    lo, hi = widths[0], widths[-1]
    mean = (lo["fvu_nonlinear"] + hi["fvu_nonlinear"]) / 2
    value, ci = interval_difference((hi["fvu_nonlinear"], _ci(hi.get("fvu_nonlinear_ci"))),
                                    (lo["fvu_nonlinear"], _ci(lo.get("fvu_nonlinear_ci"))))
    rel_ci = None if ci is None else (ci[0] / mean, ci[1] / mean)
    return [Item(f"{lo['name']} -> {hi['name']} (L0 {r['target_l0']:g})", value / mean, rel_ci)]


def _same_tokens(results: Results, saes: list[dict[str, Any]]) -> list[Item]:
    """Held-out R² of ‖e_j‖ from ‖e_i‖ for each narrower i and wider j of the same k."""
    r = _analysis(results, "per_token")
    k_of = dict(zip(r["names"], r["ks"], strict=True))
    p = r["predictability"]
    names, widths, r2 = p["names"], p["widths"], p["r2"]
    ci = p.get("r2_ci") or [[None] * len(names) for _ in names]
    ks = [k_of.get(n) for n in names]
    return [Item(f"{names[i]} -> {names[j]}", float(r2[i][j]), _ci(ci[i][j]))
            for i in range(len(names)) for j in range(len(names))
            if ks[i] == ks[j] and widths[i] < widths[j] and r2[i][j] is not None]


def _error_saes(results: Results, saes: list[dict[str, Any]]) -> list[Item]:
    """FVU of the SAE trained on e − ê minus that of the one trained on ê, at matched L0."""
    rows = _analysis(results, "error_saes")["table"]
    return [Item(f"{t['sae']}: width {t['width']}, L0 {t['l0']:g}",
                 float(t["fvu_nonlinear"]) - float(t["fvu_linear"]),
                 _ci(t.get("fvu_nonlinear_minus_linear_ci")))
            for t in rows if t.get("fvu_nonlinear") is not None and t.get("fvu_linear") is not None]


def _ce_proportional(results: Results, saes: list[dict[str, Any]]) -> list[Item]:
    """Share of the CE gap the nonlinear part closes minus its share of ‖e‖² (same tokens)."""
    rows = _analysis(results, "downstream")["table"]
    out = []
    for t in rows:
        share = t.get("sq_norm_share_nonlinear")
        if share is None or t.get("ce_gap_closed_nonlinear") is None:
            continue
        ci = _ci(t.get("ce_gap_closed_nonlinear_ci"))
        out.append(Item(t["sae"], float(t["ce_gap_closed_nonlinear"]) - share,
                        None if ci is None else (ci[0] - share, ci[1] - share)))
    return out


def _pursuit(results: Results, saes: list[dict[str, Any]]) -> list[Item]:
    """Drop of FVU nonlinear under pursuit, relative to the SAE's own FVU nonlinear."""
    out = []
    for e in _analysis(results, "encoder_error")["per_sae"]:
        base = float(e["sae_fvu_nonlinear"])
        value, ci = interval_difference(
            (base, _ci(e.get("sae_fvu_nonlinear_ci"))),
            (float(e["pursuit_fvu_nonlinear"]), _ci(e.get("pursuit_fvu_nonlinear_ci"))))
        out.append(Item(e["name"], value / base, None if ci is None else
                        (ci[0] / base, ci[1] / base)))
    return out


def _earlier_outputs(results: Results, saes: list[dict[str, Any]]) -> list[Item]:
    """Held-out R² (mean over dimensions) of the nonlinear error from each other hook's SAE
    output."""
    r = _analysis(results, "cross_layer")
    return [Item(name, float(p["nonlinear"]["r2_mean_dim"]), _ci(p["nonlinear"].get("ci")))
            for name in r["sources"] if name != r["target"]
            for p in (r["predictors"][name],)]


CLAIMS: tuple[Claim, ...] = (
    Claim("error_vector_half", "About half of the SAE error vector is linearly predictable "
          "from x", "about half", "abstract; Fig. 1-3 (vector R²)",
          "held-out mean per-dimension R² of the error probe",
          Region(0.4, 0.6, "0.4-0.6 (\"about half\" read as 0.5 ± 0.1)"),
          _per_sae("r2_error_mean_dim")),
    Claim("error_norm_90", "More than 90 % of the error norm is linearly predictable",
          "> 0.9", "abstract; Fig. 7 (R² of ‖e‖² from x)",
          "held-out R² of the norm probe (‖e‖² from x)", Region(0.9, 1.0, "R² >= 0.9"),
          _per_sae("r2_error_norm")),
    Claim("fvu_nonlinear_flat", "FVU nonlinear stays about constant as the SAE widens "
          "(fixed L0)", "no number in the paper", "Fig. 1 (second-hand: \"roughly constant\")",
          "relative change of FVU nonlinear, narrowest to widest SAE",
          Region(-0.1, 0.1, "within ±10 % of its mean"), _flat_nonlinear,
          "paper: 7 widths 16k-1M at L0 ≈ 60; ours: the run's widths at the scaling L0"),
    Claim("same_tokens", "Larger SAEs fail on the same tokens as smaller ones",
          "no number in the paper", "Fig. 4a (R² of ‖e_j‖ from ‖e_i‖)",
          "held-out R² of ‖e_wider‖ from ‖e_narrower‖ (same k)",
          Region(0.5, 1.0, "R² >= 0.5 (\"mostly the same\")"), _same_tokens),
    Claim("error_saes_worse", "SAEs trained on the nonlinear error are worse than those "
          "trained on the linear error", "no number in the paper",
          "Fig. 8 (\"quantitatively worse\")",
          "held-out FVU of the SAE on e − ê minus on ê, matched L0",
          Region(0.0, math.inf, "difference > 0"), _error_saes,
          "paper: Gemma 2 2B layer 12, k=32, 36,864 latents, one pass over RedPajama; ours: "
          "widths {cfg.error_saes.train.widths}, each trained {cfg.error_saes.train.budget}"),
    Claim("ce_proportional", "The nonlinear error costs CE in proportion to its norm",
          "no number in the paper", "Fig. 9 (\"a proportional amount\")",
          "share of the CE gap closed by adding e − ê back, minus its share of ‖e‖²",
          Region(-0.1, 0.1, "within ±0.1"), _ce_proportional,
          "paper: 300 contexts, positions 200-1022, fp16; ours: "
          "{cfg.downstream.n_contexts}-{cfg.downstream.max_contexts} contexts (more while an "
          "interval is wider than ±{cfg.downstream.target_half_width})"),
    Claim("pursuit_slight", "Gradient pursuit over the decoder barely lowers the nonlinear "
          "error", "\"very slight decrease\"; total FVU −3-5 % (second-hand)",
          "Fig. 10a", "relative drop of FVU nonlinear, SAE encoder -> pursuit",
          Region(-math.inf, 0.1, "drop <= 10 %"), _pursuit,
          "ours: {cfg.pursuit.method} at L0 rule {cfg.pursuit.l0!r} on "
          "{cfg.pursuit.max_tokens:,} tokens"),
    Claim("earlier_outputs", "Earlier components' SAE outputs predict part of the nonlinear "
          "error", "up to ~0.5 (second-hand)", "Fig. 10b",
          "held-out R² (mean dim) of e − ê from each other hook's SAE output",
          Region(0.0, 1.0, "R² > 0"), _earlier_outputs,
          "paper: 16k Gemma Scope SAEs at layer 19 resid, layer 20 MLP and attention"),
)


def check_claims(results: Results, saes: Sequence[dict[str, Any]], cfg: RunConfig | None,
                 claims: Sequence[Claim] = CLAIMS) -> list[dict[str, Any]]:
    """One JSON-able row per claim: paper value, our estimates, verdict, what differs
    (``cfg`` fills the claims' ``differs`` lines; None for claims that name no setting)."""
    rows = []
    for c in claims:
        row: dict[str, Any] = {"key": c.key, "claim": c.claim, "paper": c.paper,
                               "source": c.source, "metric": c.metric,
                               "region": [v if math.isfinite(v) else None  # strict JSON
                                          for v in (c.region.low, c.region.high)],
                               "reading": c.region.text, "differs": c.differs.format(cfg=cfg)}
        try:
            items = c.estimates(results, list(saes))
        except NotRun as why:
            rows.append(row | {"verdict": NOT_RUN, "detail": str(why), "items": []})
            continue
        verdict, detail = claim_verdict(items, c.region)
        rows.append(row | {"verdict": verdict, "detail": detail,
                           "items": [i.to_dict() for i in items]})
    return rows


def run_setting(run: RunDir, cfg: RunConfig) -> str:
    """Ours against the paper's setting, in one line."""
    meta = run.store.meta
    trained = ("pretrained SAEs" if cfg.saes else
               f"{cfg.train.architecture} SAEs, each trained {cfg.train.budget}")
    return (f"ours: {Path(str(meta.get('model_name'))).name}, "
            f"{run.store.context_length}-token contexts, positions >= "
            f"{cfg.split.filter.skip_positions}, {trained}; paper: {PAPER_SETTING}")


def _run(run: RunDir, cfg: RunConfig, results: Results, progress: bool) -> dict[str, Any]:
    saes = [{"name": d.name, **d.info["metrics"]} for d in run.decompositions]
    return {"setting": run_setting(run, cfg), "claims": check_claims(results, saes, cfg),
            "figures": {}}


def _items_text(row: dict[str, Any]) -> str:
    values = [i["value"] for i in row["items"] if i["value"] is not None]
    if not values:
        return "–"
    with_ci = [i for i in row["items"] if i["ci"] is not None and None not in i["ci"]]
    text = f"{min(values):.3g}" if len(values) == 1 else f"{min(values):.3g} to {max(values):.3g}"
    if len(with_ci) == 1:
        text += f" [{with_ci[0]['ci'][0]:.3g}, {with_ci[0]['ci'][1]:.3g}]"
    elif with_ci:
        low = min(i["ci"][0] for i in with_ci)
        high = max(i["ci"][1] for i in with_ci)
        text += f" (intervals within [{low:.3g}, {high:.3g}])"
    return text + (f" over {len(values)}" if len(values) > 1 else "")


def section(r: dict[str, Any], out_dir: Path) -> str:
    rows = "".join(
        f"<tr><td>{esc(c['claim'])}<br><small>{esc(c['metric'])}</small></td>"
        f"<td>{esc(c['paper'])}<br><small>{esc(c['source'])}</small></td>"
        f"<td>{esc(_items_text(c))}</td>"
        f"<td><b>{esc(c['verdict'])}</b><br><small>{esc(c['detail'])}; claim read as "
        f"{esc(c['reading'])}</small></td><td><small>{esc(c['differs'])}</small></td></tr>"
        for c in r["claims"]
    )
    return (
        "<p>Each claim of the paper with the paper's value, ours (95 % intervals: a verdict "
        "needs one; estimates without an interval are inconclusive), and the verdict: "
        "<i>agrees</i> when every interval lies inside the claim's range, <i>disagrees</i> when "
        f"every one lies outside. Setting: {esc(r['setting'])}.</p>"
        "<table><tr><th>claim</th><th>paper</th><th>ours</th><th>verdict</th>"
        "<th>also differs</th></tr>"
        f"{rows}</table>"
    )


ANALYSIS = Analysis(
    name="paper",
    title="Against the paper",
    run=_run,
    section=section,
    settings=lambda cfg, results: (
        VERSION, cfg.train, cfg.saes, cfg.error_saes, cfg.downstream, cfg.pursuit,
        {n: r.get("fingerprint") for n, r in sorted(results.items())
         if isinstance(r, dict) and n in NEEDS}),
    needs=NEEDS,
)
