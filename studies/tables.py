"""Print the README's study tables (markdown) from the studies' output folders.

    python studies/tables.py norm  study/norm_r2 study/paper study/converged   # study 1
    python studies/tables.py width study/converged [K]         # study 2: FVU nonlinear vs width
    python studies/tables.py error study/converged             # study 3: error-SAE learnability
    python studies/tables.py downstream study/transcoders      # study 4: CE of the error parts
    python studies/tables.py prefixes study/matryoshka study/transcoders  # study 5: prefixes

Every number is on held-out tokens, with its 95 % interval: the decomposition's token
bootstrap for FVU and the probe's R² of ‖e‖²; the norm baselines' token bootstrap for the
target comparison (x fit on a seeded half of the probe-test tokens, scored on the other half).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sae_darkmatter.analyses.norm_baselines import norm_baselines
from sae_darkmatter.decompose import SavedDecomposition
from sae_darkmatter.run_dir import decompositions_of
from sae_darkmatter.store import ActivationStore

NORM_ROWS = [  # (factor, setting, decomposition folder under the norm_r2 output)
    ("base", "layer 15, 400k tokens, filter 5×, target ‖e‖²", "layer15"),
    ("layer", "5", "layer5"), ("layer", "10", "layer10"), ("layer", "20", "layer20"),
    ("layer", "25", "layer25"),
    ("training", "100k tokens", "tokens100k"), ("training", "1.6M tokens", "tokens1600k"),
    ("norm filter", "off", "filter0"), ("norm filter", "2× the median", "filter2"),
    ("norm filter", "off, positions ≥ 8", "filter0_from8"),
]


def ci(value: float, interval: Any, digits: int = 3) -> str:
    if not interval:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def training(dec: SavedDecomposition) -> str:
    """Tokens seen, how training stopped and the last doubling's FVU gain, from training.json."""
    path = Path(dec.info["sae"]["path"]) / "training.json"
    if not path.is_file():
        return "pretrained"
    t = json.loads(path.read_text())
    s = t.get("schedule") or {}
    gain = s.get("doubling_gain")
    tail = f", last doubling −{gain:.1%} FVU" if gain is not None else ""
    return f"{t['tokens_seen'] / 1e6:.2f}M ({s.get('stopped', 'tokens')}{tail})"


def norm_row(factor: str, setting: str, folder: Path, store: ActivationStore,
             name: str | None = None) -> str:
    """One SAE's row: the only decomposition in ``folder``, or the one called ``name``."""
    (dec,) = [d for d in decompositions_of(folder) if name in (None, d.name)]
    m = dec.info["metrics"]
    base = norm_baselines([dec], store)[dec.name]
    cis = base["intervals"]
    return (f"| {factor} | {setting} | {m['n_probe_test']:,} | "
            f"{ci(m['r2_error_norm'], m['ci']['r2_error_norm'])} | "
            f"{ci(base['x (linear)'], cis['x (linear)'])} | "
            f"{ci(base['x (linear) → ‖e‖'], cis['x (linear) → ‖e‖'])} | "
            f"{ci(m['fvu'], m['ci']['fvu'])} | {training(dec)} |")


def norm_table(norm_out: Path, paper_run: Path | None, converged: Path | None) -> list[str]:
    lines = ["| factor | setting | held-out tokens | R² of ‖e‖² (probe) | x → ‖e‖² (half) "
             "| x → ‖e‖ (half) | FVU | SAE training |", "|---|---|---|---|---|---|---|---|"]
    store = ActivationStore.open(norm_out / "store")
    for factor, setting, name in NORM_ROWS:
        folder = norm_out / "decompose" / name
        if folder.is_dir():
            lines.append(norm_row(factor, setting, folder, store))
    if converged is not None and (converged / "decompose").is_dir():
        lines.append(norm_row("training", "toward a plateau (cap 1.6M; 4,096 contexts, 30 % "
                              "train SAEs)", converged / "decompose",
                              ActivationStore.open(converged / "store"), "topk-w1024-k32"))
    if paper_run is not None and (paper_run / "decompose").is_dir():
        lines.append(norm_row("protocol", "paper (1,024-token contexts, positions 200..1022, "
                              "no filter)", paper_run / "decompose",
                              ActivationStore.open(paper_run / "store")))
    return lines


def claim(run: Path, key: str) -> str:
    if not (run / "metrics.json").is_file():
        return "the run has not finished (no metrics.json)"
    metrics = json.loads((run / "metrics.json").read_text())
    claims = metrics["analyses"].get("paper", {}).get("claims", [])
    row = next((c for c in claims if c["key"] == key), None)
    return "not checked in this run" if row is None else f"{row['verdict']}: {row['detail']}"


def width_table(run: Path, k: int | None = None) -> list[str]:
    """FVU and its parts per width (the SAEs with sparsity ``k`` only, when given)."""
    lines = ["| width | SAE training | FVU | FVU linear | FVU nonlinear | linear share |",
             "|---|---|---|---|---|---|"]
    decs = [d for d in decompositions_of(run / "decompose") if k in (None, d.k)]
    for dec in sorted(decs, key=lambda d: d.width):
        m = dec.info["metrics"]
        lines.append(f"| {dec.width:,} | {training(dec)} | {ci(m['fvu'], m['ci']['fvu'])} | "
                     f"{ci(m['fvu_linear'], m['ci']['fvu_linear'])} | "
                     f"{ci(m['fvu_nonlinear'], m['ci']['fvu_nonlinear'])} | "
                     f"{ci(m['linear_share'], m['ci']['linear_share'])} |")
    return [*lines, "", f"Claim check: {claim(run, 'fvu_nonlinear_flat')}"]


def error_table(run: Path) -> list[str]:
    result = json.loads((run / "analyses.json").read_text())["error_saes"]
    lines = ["| base SAE | k | training (linear / nonlinear error SAE) | FVU on ê | FVU on e − ê "
             "| difference |", "|---|---|---|---|---|---|"]
    for base in result["bases"]:
        for entry in base["matched_l0"]:
            trained = {g["target"]: g for g in base["grid"] if g["width"] == entry["width"]
                       and abs(g["l0"] - entry["l0"]) < 1e-9}

            def record(target: str, trained: dict[str, Any] = trained) -> str:
                g = trained.get(target, {})
                t = g.get("training") or {}
                gain = t.get("doubling_gain")
                return (f"{(g.get('tokens_seen') or 0) / 1e6:.2f}M {t.get('stopped', '?')}"
                        + (f" (−{gain:.1%})" if gain is not None else ""))

            diff = entry["fvu"]["nonlinear"] - entry["fvu"]["linear"]
            lines.append(f"| {base['sae']} | {entry['sparsity']} | {record('linear')} / "
                         f"{record('nonlinear')} | {entry['fvu']['linear']:.3f} | "
                         f"{entry['fvu']['nonlinear']:.3f} | "
                         f"{ci(diff, entry.get('fvu_nonlinear_minus_linear_ci'))} |")
    return [*lines, "", f"Claim check: {claim(run, 'error_saes_worse')}"]


def downstream_table(run: Path) -> list[str]:
    """The CE gap each error part closes against the FVU it closes, for the SAEs and the
    transcoders the run spliced (95 % bootstrap intervals over contexts)."""
    results = json.loads((run / "analyses.json").read_text())
    lines = ["| spliced | width | contexts | ΔCE of x̂ / ŷ | CE gap closed by ê | FVU closed by ê "
             "| CE gap closed by e − ê | FVU closed by e − ê | ê minus e − ê |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in ("downstream", "transcoder_downstream"):
        for row in results.get(key, {}).get("table", []):
            diff = "ce_gap_closed_linear_minus_nonlinear"
            lines.append(
                f"| {row['sae']} | {row['width']:,} | {row['contexts']} | "
                f"{row['ce_increase_sae']:+.3f} | "
                f"{ci(row['ce_gap_closed_linear'], row['ce_gap_closed_linear_ci'], 2)} | "
                f"{row['fvu_gap_closed_linear']:.2f} | "
                f"{ci(row['ce_gap_closed_nonlinear'], row['ce_gap_closed_nonlinear_ci'], 2)} | "
                f"{row['fvu_gap_closed_nonlinear']:.2f} | "
                f"{ci(row[diff], row[f'{diff}_ci'], 2)} |")
    return [*lines, "", f"Claim check: {claim(run, 'ce_proportional')}"]


def prefix_table(out: Path, sweep: Path, k: int = 32) -> list[str]:
    """Per prefix width: FVU and FVU nonlinear of each SAE's prefixes (``out/prefixes``) beside
    the separately trained SAEs of that width and ``k`` (``sweep``'s decompositions); then the
    power law fitted to each set."""
    from sae_darkmatter.analyses.scaling import fit_scaling, load_sweep

    prefixes = decompositions_of(out / "prefixes")
    sources = sorted({d.info["prefix"]["of"] for d in prefixes}, reverse=True)
    at = {(d.info["prefix"]["of"], d.width): d.info["metrics"] for d in prefixes}
    at |= {("trained", d.width): d.info["metrics"]
           for d in decompositions_of(sweep / "decompose") if d.k == k}
    columns = [*sources, "trained"]
    lines = ["| width | " + " | ".join(f"{c}: FVU / FVU nonlinear (L0)" for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for width in sorted({w for _, w in at}):
        cells = []
        for c in columns:
            m = at.get((c, width))
            cells.append("–" if m is None else
                         f"{m['fvu']:.3f} / {ci(m['fvu_nonlinear'], m['ci']['fvu_nonlinear'])} "
                         f"({m['l0']:.1f})")
        lines.append(f"| {width:,} | " + " | ".join(cells) + " |")
    lines.append("")
    for c in columns:
        points = (load_sweep(out / "prefixes", prefixes_of=c) if c != "trained"
                  else [p for p in load_sweep(sweep / "decompose") if p.k == k])
        fit = fit_scaling(points, points[-1].l0, n_boot=200)
        first, last = (p.metrics["fvu_nonlinear"] for p in (points[0], points[-1]))
        lines.append(f"- {c}: FVU(W) = c + a·W^(−m) with c = {ci(fit.c, fit.c_ci)}, m = "
                     f"{ci(fit.m, fit.m_ci, 2)}; FVU nonlinear {first:.3f} → {last:.3f} "
                     f"({last / first - 1:+.0%}) from {points[0].width:,} to "
                     f"{points[-1].width:,} latents")
    return lines


def main(argv: list[str]) -> None:
    kind, *paths = argv
    folders = [Path(p) for p in paths]
    if kind == "norm":
        paper, converged = (folders + [None, None])[1:3]  # either may be left out
        lines = norm_table(folders[0], paper, converged)
    elif kind == "width":
        lines = width_table(folders[0], int(paths[1]) if len(paths) > 1 else None)
    elif kind == "error":
        lines = error_table(folders[0])
    elif kind == "downstream":
        lines = downstream_table(folders[0])
    elif kind == "prefixes":
        lines = prefix_table(folders[0], folders[1])
    else:
        raise SystemExit(f"unknown table {kind!r}: norm, width, error, downstream or prefixes")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
