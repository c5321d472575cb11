"""Encoder error (paper §6): how much of an SAE's nonlinear error a better encoder removes.

For each SAE the scaling analysis uses (one per width, nearest the target L0), the activations are
re-encoded with pursuit over the SAE's own decoder (``saes.pursuit.PursuitSAE``: by default
gradient pursuit with each token's L0 equal to the SAE's on that token). SAE and pursuit are
decomposed together, on the same subsample of evaluation tokens and sharing one XᵀX, so their
FVU, FVU_nonlinear and linear share compare like for like. The drop in FVU_nonlinear is the
"encoder error" band of the scaling figure.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.analyses.scaling import default_target_l0, load_sweep, select_at_l0
from sae_darkmatter.config import DecomposeConfig, PursuitConfig, RunConfig, SplitConfig
from sae_darkmatter.decompose import decompose_many
from sae_darkmatter.errors import ConfigError, DarkMatterError
from sae_darkmatter.markup import esc, figures_html
from sae_darkmatter.plotting import plt, save_figure
from sae_darkmatter.run_dir import RunDir
from sae_darkmatter.saes.formats import open_sae
from sae_darkmatter.saes.pursuit import PursuitSAE
from sae_darkmatter.splits import Splits

log = logging.getLogger(__name__)

FIGURE = RunDir.figure_key("encoder_error")
_METRICS = ("l0", "fvu", "fvu_nonlinear", "linear_share")


def subsample(splits: Splits, max_tokens: int, seed: int) -> Splits:
    """At most ``max_tokens // 2`` probe-train and as many probe-test rows (seeded, sorted)."""
    if max_tokens < 4:
        raise DarkMatterError(f"pursuit.max_tokens must be >= 4, got {max_tokens}")
    rng = np.random.default_rng(seed)

    def pick(rows: np.ndarray) -> np.ndarray:
        n = min(rows.size, max_tokens // 2)
        return np.sort(rng.choice(rows, size=n, replace=False))

    return dataclasses.replace(splits, probe_train=pick(splits.probe_train),
                               probe_test=pick(splits.probe_test))


def encoder_error_analysis(
    run_dir: RunDir | str | Path,
    cfg: PursuitConfig = PursuitConfig(),
    *,
    split: SplitConfig = SplitConfig(),
    decompose_cfg: DecomposeConfig = DecomposeConfig(),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Pursuit vs SAE encoder on the scaling-selected SAEs of ``run_dir``; draws ``FIGURE``.

    Returns the method and L0 rule, the token counts, one entry per SAE (its metrics and the
    pursuit's on the same tokens, and the drops), and ``fvu_nonlinear_drop_mean`` (the band
    height).
    """
    run = RunDir.of(run_dir)
    points = load_sweep(run)
    selected = [p for p, _ in select_at_l0(points, default_target_l0(points))]
    infos = {d.name: d.info for d in run.decompositions}

    store = run.store
    hook = infos[selected[0].name]["metrics"]["hook"]
    splits = run.splits(split, hook=hook)
    if not np.array_equal(splits.probe_test, selected[0].rows):
        raise DarkMatterError(
            f"the split settings give other test tokens than {run.decompose_path} was scored on; "
            "pass the run's split settings"
        )
    sub = subsample(splits, cfg.max_tokens, seed)
    models: dict[str, Any] = {}
    for p in selected:
        sae = open_sae(infos[p.name]["sae"].get("source") or infos[p.name]["sae"]["path"]).sae
        models[p.name] = sae
        try:
            models[f"{p.name}@pursuit"] = PursuitSAE(sae, method=cfg.method, l0=cfg.l0)  # type: ignore[arg-type]
        except ValueError as err:
            raise ConfigError(f"pursuit: {err}") from None
    outs = decompose_many(store, models, sub, decompose_cfg, hook=hook, progress=progress)

    per_sae = []
    for p in selected:
        own, pur = outs[p.name].metrics, outs[f"{p.name}@pursuit"].metrics
        entry: dict[str, Any] = {"name": p.name, "width": p.width, "k": p.k}
        entry |= {f"sae_{m}": float(getattr(own, m)) for m in _METRICS}
        entry |= {f"pursuit_{m}": float(getattr(pur, m)) for m in _METRICS}
        entry |= {f"{who}_fvu_nonlinear_ci": list(d.ci["fvu_nonlinear"])  # bootstrap, 95 %
                  for who, d in (("sae", own), ("pursuit", pur)) if "fvu_nonlinear" in d.ci}
        entry["fvu_drop"] = entry["sae_fvu"] - entry["pursuit_fvu"]
        entry["fvu_nonlinear_drop"] = entry["sae_fvu_nonlinear"] - entry["pursuit_fvu_nonlinear"]
        per_sae.append(entry)
    result = {
        "method": cfg.method,
        "l0": cfg.l0,
        "nonnegative": next(m for m in models.values() if isinstance(m, PursuitSAE)).nonnegative,
        "n_probe_train": int(sub.probe_train.size),
        "n_probe_test": int(sub.probe_test.size),
        "per_sae": per_sae,
        "fvu_nonlinear_drop_mean": float(np.mean([e["fvu_nonlinear_drop"] for e in per_sae])),
        "figures": {"encoder_error": FIGURE},
    }
    encoder_error_figure(result, run.path / FIGURE)
    return result


def encoder_error_figure(result: dict[str, Any], path: str | Path) -> Path:
    """FVU and FVU_nonlinear by width for the SAE's encoder and for pursuit (same tokens)."""
    rows = sorted(result["per_sae"], key=lambda e: e["width"])
    widths = [e["width"] for e in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for who, style in (("sae", "-"), ("pursuit", "--")):
        label = "SAE encoder" if who == "sae" else f"{result['method']} (L0 {result['l0']})"
        ax.plot(widths, [e[f"{who}_fvu"] for e in rows], "o" + style, color="black",
                label=f"FVU, {label}")
        ax.plot(widths, [e[f"{who}_fvu_nonlinear"] for e in rows], "s" + style, color="#4c4c8c",
                label=f"FVU nonlinear, {label}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("SAE width (latents)")
    ax.set_ylabel("fraction of variance unexplained (held-out)")
    ax.set_title(
        f"Encoder error: SAE vs pursuit over its decoder ({result['n_probe_test']:,} test tokens)",
        fontsize=9,
    )
    ax.legend(frameon=False, fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, Path(path))


def section(r: dict[str, Any], out_dir: Path) -> str:
    rows = "".join(
        f"<tr><td>{esc(e['name'])}</td><td>{e['width']:,}</td><td>{e['sae_l0']:.1f} / "
        f"{e['pursuit_l0']:.1f}</td><td>{e['sae_fvu']:.4f} / {e['pursuit_fvu']:.4f}</td>"
        f"<td>{e['sae_fvu_nonlinear']:.4f} / {e['pursuit_fvu_nonlinear']:.4f}</td>"
        f"<td>{e['fvu_nonlinear_drop']:+.4f}</td></tr>"
        for e in r["per_sae"]
    )
    return (
        f"<p>Each SAE of the scaling fit re-encoded by {esc(str(r['method']))} over its own "
        f"decoder (L0 {esc(str(r['l0']))}), decomposed with the SAE on the same "
        f"{r['n_probe_train']:,} + {r['n_probe_test']:,} probe-train/test tokens. The drop in FVU "
        f"nonlinear is the encoder error (mean {r['fvu_nonlinear_drop_mean']:+.4f}; its band is "
        f"drawn in the scaling figure).</p><table><tr><th>SAE</th><th>width</th>"
        f"<th>L0 SAE / pursuit</th><th>FVU SAE / pursuit</th><th>FVU nonlinear SAE / pursuit</th>"
        f"<th>encoder error</th></tr>{rows}</table>" + figures_html(r["figures"], out_dir)
    )


def _run(run: RunDir, cfg: RunConfig, results: Results, progress: bool) -> dict[str, Any]:
    return encoder_error_analysis(
        run, cfg.pursuit, split=cfg.split, decompose_cfg=cfg.decompose, seed=cfg.split.seed,
        progress=progress,
    )


VERSION = 2  # part of the cache key: 2 added the FVU-nonlinear intervals

ANALYSIS = Analysis(
    name="encoder_error",
    title="Encoder error: pursuit over the SAE's decoder",
    run=_run,
    section=section,
    settings=lambda cfg, results: (cfg.pursuit, cfg.decompose, VERSION),
    enabled=lambda cfg: cfg.pursuit.enabled,
)
