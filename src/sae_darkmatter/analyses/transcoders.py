"""Transcoders beside the SAEs: how their dark matter moves with width, and what a skip term
takes out of it.

Reads the transcoders' decompositions (``decompose/transcoders/``; each transcoder's FVUs are
relative to the variance of its target ``y``, the MLP's output) and answers, with 95 %
bootstrap intervals over the held-out tokens (one resample shared by every transcoder and SAE,
which were all scored on the same tokens):

- per kind (transcoder, skip transcoder, and the run's SAEs of the same k), the relative change
  of FVU nonlinear from the narrowest to the widest: (widest − narrowest) / their mean, and
  with 3 widths or more the scaling analysis's power law FVU(W) = c + a·W^(−m). The SAEs' FVUs
  are relative to their own input's variance, so only the relative change is compared across
  kinds;
- at each (width, k) with both kinds, the share of the plain transcoder's linear dark matter
  the skip transcoder does not have, ``1 − FVU_linear(skip) / FVU_linear(plain)``, and the
  change of FVU. Each skip transcoder's own ``absorbed_share`` (``SkipAccount``: its linear
  dark matter with the skip term left out) is in its row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.analyses.scaling import fit_power_law
from sae_darkmatter.config import RunConfig
from sae_darkmatter.decompose import SavedDecomposition
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.markup import ci_text, esc, figures_html, num
from sae_darkmatter.plotting import plt, save_figure
from sae_darkmatter.run_dir import RunDir

VERSION = 2
N_BOOT = 200
FIGURE = RunDir.figure_key("transcoders")
KINDS = ("SAE", "transcoder", "skip transcoder")
COLORS = {"SAE": "#777777", "transcoder": "#3b6fb6", "skip transcoder": "#d9822b"}


@dataclass(frozen=True, eq=False)
class _Point:
    """One decomposed SAE or transcoder and its per-test-token sums."""

    name: str
    kind: str
    width: int
    k: int | None
    l0: float
    metrics: dict[str, Any]
    rows: np.ndarray
    err: np.ndarray  # ‖e‖²
    nonlinear: np.ndarray  # ‖e − ê‖²
    total: np.ndarray  # ‖y − ȳ‖² (an SAE's: ‖x − x̄‖²)


def trained_k(d: SavedDecomposition) -> int | None:
    """The k an SAE was built or trained with: its own (TopK), else our trainer's record."""
    if d.k is not None:
        return d.k
    record = Path(str(d.info.get("sae", {}).get("path"))) / "training.json"
    k = json.loads(record.read_text()).get("k") if record.is_file() else None
    return None if k is None else int(k)


def _point(d: SavedDecomposition, kind: str) -> _Point:
    t = d.tokens
    return _Point(d.name, kind, d.width, trained_k(d), float(d.info["metrics"]["l0"]),
                  d.info["metrics"], t["rows"].astype(np.int64),
                  t["err_sq"].astype(np.float64), t["nonlinear_sq"].astype(np.float64),
                  t["x_centered_sq"].astype(np.float64))


def _points(run: RunDir) -> list[_Point]:
    tcs = run.transcoder_decompositions
    if not tcs:
        raise DarkMatterError("the run has no transcoder decompositions (set [transcoders] "
                              "enabled = true, or decompose them with --transcoder)")
    points = [_point(d, "skip transcoder" if d.info.get("transcoder", {}).get("skip")
                     else "transcoder") for d in tcs]
    ks = {p.k for p in points}
    points += [_point(d, "SAE") for d in run.decompositions
               if trained_k(d) in ks and np.array_equal(d.tokens["rows"], points[0].rows)]
    for p in points[1:]:
        if not np.array_equal(p.rows, points[0].rows):
            raise DarkMatterError(f"{p.name} and {points[0].name} were scored on different "
                                  "tokens; rerun the run's decompositions")
    return points


class _Bootstrap:
    """Ratios of per-token sums on the full sample and on ``n_boot`` shared resamples."""

    def __init__(self, points: list[_Point], n_boot: int, seed: int) -> None:
        n = points[0].rows.size
        rng = np.random.default_rng(seed)
        self.weights = np.vstack([np.ones(n)] + [
            np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
            for _ in range(n_boot)])  # row 0: the sample itself
        self.index = {p.name: i for i, p in enumerate(points)}
        w = self.weights.T
        total = np.stack([p.total for p in points]) @ w
        self.fvu = np.stack([p.err for p in points]) @ w / total  # [points, 1 + n_boot]
        self.nonlinear = np.stack([p.nonlinear for p in points]) @ w / total
        self.linear = self.fvu - self.nonlinear

    def of(self, name: str) -> dict[str, np.ndarray]:
        i = self.index[name]
        return {"fvu": self.fvu[i], "fvu_linear": self.linear[i],
                "fvu_nonlinear": self.nonlinear[i]}


def _value(samples: np.ndarray) -> tuple[float, list[float]]:
    """The full-sample value and the 2.5/97.5 percentiles of the resamples."""
    lo, hi = np.percentile(samples[1:], [2.5, 97.5])
    return float(samples[0]), [float(lo), float(hi)]


def _rows(points: list[_Point], boot: _Bootstrap) -> list[dict[str, Any]]:
    rows = []
    for p in points:
        row: dict[str, Any] = {"name": p.name, "kind": p.kind, "width": p.width, "k": p.k,
                               "l0": p.l0}
        for metric, samples in boot.of(p.name).items():
            row[metric], row[f"{metric}_ci"] = _value(samples)
        skip = p.metrics.get("skip")
        if skip:
            row["fvu_absorbed"] = skip["fvu_absorbed"]
            row["fvu_absorbed_ci"] = skip.get("ci", {}).get("fvu_absorbed")
            row["absorbed_share"] = skip["absorbed_share"]
        rows.append(row)
    return rows


def _width_changes(points: list[_Point], boot: _Bootstrap) -> list[dict[str, Any]]:
    """Per (kind, k): relative change of FVU nonlinear from the narrowest to the widest."""
    out = []
    for kind in KINDS:
        for k in sorted({p.k for p in points if p.kind == kind}, key=lambda k: k or 0):
            group = sorted((p for p in points if p.kind == kind and p.k == k),
                           key=lambda p: p.width)
            if len({p.width for p in group}) < 2:
                continue
            lo, hi = (boot.of(p.name)["fvu_nonlinear"] for p in (group[0], group[-1]))
            value, ci = _value((hi - lo) / ((hi + lo) / 2))
            out.append({"kind": kind, "k": k, "narrowest": group[0].name,
                        "widest": group[-1].name, "widths": [group[0].width, group[-1].width],
                        "fvu_nonlinear_change": value, "ci": ci,
                        **({"power_law": _power_law(group, boot)}
                           if len({p.width for p in group}) >= 3 else {})})
    return out


def _power_law(group: list[_Point], boot: _Bootstrap) -> dict[str, Any]:
    """FVU(W) = c + a·W^(−m) over the group's widths (``scaling.fit_power_law``), refitted on
    every resample: the scaling analysis's law, for one kind of sparse replacement."""
    widths = [p.width for p in group]
    fvu = np.stack([boot.of(p.name)["fvu"] for p in group])  # [widths, 1 + n_boot]
    fits = np.array([fit_power_law(widths, fvu[:, b]) for b in range(fvu.shape[1])])
    out: dict[str, Any] = {"model": "FVU(W) = c + a * W^(-m)"}
    for i, name in enumerate(("c", "a", "m")):
        out[name], out[f"{name}_ci"] = _value(fits[:, i])
    return out


def _skip_effects(points: list[_Point], boot: _Bootstrap) -> list[dict[str, Any]]:
    """At each (width, k) with a plain and a skip transcoder: what the skip term changes."""
    by_key = {(p.kind, p.width, p.k): p for p in points}
    out = []
    for (kind, width, k), plain in sorted(by_key.items(), key=lambda kv: kv[0][1:]):
        skip = by_key.get(("skip transcoder", width, k))
        if kind != "transcoder" or skip is None:
            continue
        a, b = boot.of(plain.name), boot.of(skip.name)
        removed, removed_ci = _value(1 - b["fvu_linear"] / a["fvu_linear"])
        change, change_ci = _value(b["fvu"] - a["fvu"])
        nl_change, nl_ci = _value(b["fvu_nonlinear"] - a["fvu_nonlinear"])
        out.append({"width": width, "k": k, "plain": plain.name, "skip": skip.name,
                    "linear_removed": removed, "linear_removed_ci": removed_ci,
                    "fvu_change": change, "fvu_change_ci": change_ci,
                    "fvu_nonlinear_change": nl_change, "fvu_nonlinear_change_ci": nl_ci})
    return out


def transcoder_analysis(run: RunDir | str | Path, *, n_boot: int = N_BOOT, seed: int = 0
                        ) -> dict[str, Any]:
    """The transcoders' table, width changes and skip effects of a run; draws ``FIGURE``."""
    run = RunDir.of(run)
    points = _points(run)
    boot = _Bootstrap(points, n_boot, seed)
    rows = _rows(points, boot)
    _figure(rows, run.path / FIGURE)
    hooks = next(d.info["transcoder"] for d in run.transcoder_decompositions
                 if "transcoder" in d.info)
    return {"hooks": {"in": hooks["hook_in"], "out": hooks["hook_out"]},
            "n_test_tokens": int(points[0].rows.size), "n_boot": n_boot, "seed": seed,
            "rows": rows, "width_changes": _width_changes(points, boot),
            "skip_effects": _skip_effects(points, boot), "figures": {"transcoders": FIGURE}}


def _figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """FVU nonlinear (solid) and linear (dashed) against width, one colour per kind and k."""
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.8))
    for kind in KINDS:
        for k in sorted({r["k"] for r in rows if r["kind"] == kind}, key=lambda k: k or 0):
            group = sorted((r for r in rows if r["kind"] == kind and r["k"] == k),
                           key=lambda r: r["width"])
            widths = [r["width"] for r in group]
            label = f"{kind}{_k_text(k)}"
            for ax, metric, style in ((axes[0], "fvu_nonlinear", "-"),
                                      (axes[1], "fvu_linear", "--")):
                values = np.array([r[metric] for r in group])
                ci = np.array([r[f"{metric}_ci"] for r in group]).T
                ax.errorbar(widths, values, yerr=np.abs(ci - values), fmt=f"o{style}",
                            color=COLORS[kind], label=label, capsize=3)
    for ax, title in zip(axes, ("FVU nonlinear", "FVU linear"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width (latents)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of the target's variance")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def _law_text(law: dict[str, Any] | None) -> str:
    if law is None:
        return ""
    return (f"; FVU(W) = c + a·W<sup>−m</sup> with c = {ci_text(law['c'], law['c_ci'])}, "
            f"m = {ci_text(law['m'], law['m_ci'])}")


def _k_text(k: int | None) -> str:
    return "" if k is None else f" (k = {k})"


def section(s: dict[str, Any], out_dir: Path) -> str:
    hooks = s["hooks"]
    rows = "".join(
        f"<tr><td>{esc(r['name'])}</td><td>{esc(r['kind'])}</td><td>{r['width']:,}</td>"
        f"<td>{r['l0']:.1f}</td><td>{ci_text(r['fvu'], r['fvu_ci'])}</td>"
        f"<td>{ci_text(r['fvu_linear'], r['fvu_linear_ci'])}</td>"
        f"<td>{ci_text(r['fvu_nonlinear'], r['fvu_nonlinear_ci'])}</td>"
        f"<td>{num(r.get('absorbed_share'), '{:.3f}')}</td></tr>"
        for r in s["rows"])
    changes = "".join(
        f"<li>{esc(c['kind'])}{_k_text(c['k'])}: "
        f"{c['widths'][0]:,} → {c['widths'][1]:,} latents, FVU nonlinear "
        f"{100 * c['fvu_nonlinear_change']:+.1f} % "
        f"[{100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}]{_law_text(c.get('power_law'))}</li>"
        for c in s["width_changes"])
    skips = "".join(
        f"<li>width {e['width']:,}: the skip transcoder has "
        f"{ci_text(100 * e['linear_removed'], [100 * v for v in e['linear_removed_ci']])} % "
        f"less linear dark matter than the plain one; FVU changes by "
        f"{ci_text(e['fvu_change'], e['fvu_change_ci'])}</li>"
        for e in s["skip_effects"])
    return (
        f"<p>Transcoders from <code>{esc(hooks['in'])}</code> to <code>{esc(hooks['out'])}"
        f"</code>; FVUs are fractions of the variance of <code>{esc(hooks['out'])}</code> on "
        f"{s['n_test_tokens']:,} held-out tokens (95 % bootstrap intervals, {s['n_boot']} "
        "resamples). The last column is each skip transcoder's own absorbed share: the part "
        "of its linear dark matter that its skip term removes.</p>"
        "<table><tr><th>name</th><th>kind</th><th>width</th><th>L0</th><th>FVU</th>"
        "<th>FVU linear</th><th>FVU nonlinear</th><th>skip absorbs</th></tr>"
        f"{rows}</table>"
        f"<p>Relative change of FVU nonlinear from the narrowest to the widest (SAEs: of their "
        f"own input's variance):</p><ul>{changes}</ul>"
        + (f"<p>Skip against plain, at equal width and k:</p><ul>{skips}</ul>" if skips else "")
        + figures_html(s["figures"], out_dir)
    )


def _run(run: RunDir, cfg: RunConfig, results: Results, progress: bool) -> dict[str, Any]:
    return transcoder_analysis(run, seed=cfg.split.seed)


ANALYSIS = Analysis(
    name="transcoders",
    title="Transcoders and skip transcoders",
    run=_run,
    section=section,
    settings=lambda cfg, results: (VERSION,),
    enabled=lambda cfg: cfg.transcoders.enabled,
)
