"""SAEs trained on the SAE error and on its linear and nonlinear parts (paper Fig. 8).

For a base SAE of a run, the error ``e = x − x̂``, its linear part ``ê = [x, 1]·W`` (the probe
that decompose fit on the probe-train tokens) and its nonlinear part ``e − ê`` are computed on
the probe-test tokens only, which the probe never saw. Those tokens are split by context
(seeded) into a training and an evaluation part; one SAE per (target, width, k) of the same
architecture and sweep is trained on each target and scored on the evaluation part: FVU of its
own target, unexplained variance relative to the error's, L0 and dead latents (never active on
the evaluation tokens). FVUs of the three targets are compared at matched L0 by log-log
interpolation over each target's own L0 sweep.

SAEs go to ``<run>/error_saes/<base>/<target>/<arch>-w{W}-k{k}/`` (reruns reuse them).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_darkmatter._io import read_json, resolve_device
from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.config import ErrorSAEConfig, RunConfig, to_dict
from sae_darkmatter.decompose import SavedDecomposition
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.linalg import R2Accumulator, bootstrap_counts, percentile_interval
from sae_darkmatter.markup import esc, figures_html, num
from sae_darkmatter.plotting import plt, save_figure
from sae_darkmatter.run_dir import RunDir, error_probe
from sae_darkmatter.saes import SAE, load_sae
from sae_darkmatter.saes.latents import encode_decode
from sae_darkmatter.saes.train import train_grid
from sae_darkmatter.store import ActivationStore

log = logging.getLogger(__name__)

TARGETS = ("error", "linear", "nonlinear")
VERSION = 3  # part of the cache key: 2 added the FVU-difference intervals, 3 the training record
N_BOOT = 200  # bootstrap resamples of the held-out tokens for the FVU-difference intervals
FIGURE = RunDir.figure_key("error_saes")





def split_by_context(rows: np.ndarray, contexts: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` (with their ``contexts``) into (train, eval) rows by a seeded context
    split."""
    ids = np.unique(contexts)
    if ids.size < 2 or not 0.0 < fraction < 1.0:
        raise DarkMatterError(f"need >= 2 contexts and 0 < train_fraction < 1 (have {ids.size} "
                              f"contexts, fraction {fraction}); harvest more contexts")
    n_train = min(max(1, round(fraction * ids.size)), ids.size - 1)
    train_ids = np.random.default_rng(seed).permutation(ids)[:n_train]
    in_train = np.isin(contexts, train_ids)
    return rows[in_train], rows[~in_train]


def error_targets(
    store: ActivationStore,
    hook: str,
    rows: np.ndarray,
    sae: SAE,
    dec: SavedDecomposition,
    *,
    chunk_rows: int = 8192,
    device: torch.device = torch.device("cpu"),
) -> dict[str, torch.Tensor]:
    """``{"error": e, "linear": ê, "nonlinear": e − ê}`` as float32 CPU tensors
    ``[len(rows), d]`` (rows sorted), computed on ``device`` (where ``sae`` is)."""
    probe = error_probe(dec)
    parts: dict[str, list[torch.Tensor]] = {t: [] for t in TARGETS}
    with torch.inference_mode():
        for _, x in store.iter_chunks(hook, rows, chunk_rows):
            x = x.to(device)
            e = x - sae.forward(x)
            lin = probe.predict(x)
            for key, value in zip(TARGETS, (e, lin, e - lin)):
                parts[key].append(value.to("cpu", copy=True))  # chunks may share a buffer
    return {k: torch.cat(v) if v else torch.zeros(0, store.d(hook)) for k, v in parts.items()}


def score(sae: SAE, y: torch.Tensor, error_sst: float, *, chunk_rows: int = 8192,
          device: torch.device = torch.device("cpu")) -> tuple[dict[str, Any], np.ndarray]:
    """Held-out FVU of ``sae`` (on ``device``) on ``y``, its residual over the error's total
    variance, L0, dead latents; and each token's squared error ``‖y − ŷ‖²`` (float64)."""
    acc = R2Accumulator(y.shape[1])
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    active, sse = 0, []
    with torch.inference_mode():
        for chunk in y.split(chunk_rows):
            y_hat, latents = encode_decode(sae, chunk.to(device))
            acc.update(chunk, y_hat)
            sse.append((chunk.to(device).double() - y_hat.double()).square().sum(1).cpu())
            fired |= latents.fired().cpu()
            active += int(latents.l0().sum())
    summary = {"fvu": acc.fvu(), "unexplained_over_error_var": acc.sse() / error_sst,
               "l0": active / max(y.shape[0], 1), "dead": int((~fired).sum()),
               "dead_fraction": float((~fired).float().mean())}
    return summary, (torch.cat(sse) if sse else torch.zeros(0)).numpy()


def difference_intervals(matched: list[dict[str, Any]], grid: list[dict[str, Any]],
                         sse: list[np.ndarray], deviation: dict[str, np.ndarray], *,
                         n_boot: int = N_BOOT, seed: int = 0) -> None:
    """Add ``fvu_nonlinear_minus_linear_ci`` to each matched-L0 entry: the paired bootstrap
    over held-out tokens of FVU(e − ê) − FVU(ê), where both targets have an SAE of the entry's
    width at exactly its L0 (TopK: the same k); None where one is interpolated.

    ``sse[i]`` is grid row i's per-token squared error, ``deviation[t]`` each token's
    ``‖y − ȳ‖²`` for target t (ȳ: the full sample's mean, an O(1/n) approximation per draw).
    """
    counts = bootstrap_counts(next(iter(deviation.values())).size, n_boot, [seed, 2])

    def draws(target: str, entry: dict[str, Any]) -> np.ndarray | None:
        i = next((i for i, r in enumerate(grid) if r["target"] == target
                  and r["width"] == entry["width"] and abs(r["l0"] - entry["l0"]) < 1e-9), None)
        return None if i is None else (counts @ sse[i]) / (counts @ deviation[target])

    for entry in matched:
        lin, nonlin = draws("linear", entry), draws("nonlinear", entry)
        entry["fvu_nonlinear_minus_linear_ci"] = (
            None if lin is None or nonlin is None else percentile_interval(nonlin - lin))


def _total_var(y: torch.Tensor) -> float:
    acc = R2Accumulator(y.shape[1])
    acc.update(y, y)
    return acc.sst()


def train_on_targets(
    train: dict[str, torch.Tensor],
    held_out: dict[str, torch.Tensor],
    cfg: ErrorSAEConfig,
    out_dir: Path,
    *,
    progress: bool = True,
    device: torch.device = torch.device("cpu"),
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Train the ``cfg.train`` grid on each target; one row of held-out scores per SAE, and
    each SAE's per-token squared error on the held-out tokens.

    ``sparsity`` is the grid's sparsity value (k for TopK SAEs).
    """
    error_sst = _total_var(held_out["error"])
    grid = [
        (s, w) for s in cfg.train.sparsity_values() for w in cfg.train.widths
    ]  # train_grid's order
    rows, sse = [], []
    for target in TARGETS:
        folders = train_grid(train[target], cfg.train, out_dir / target, progress=progress,
                             metadata={"error_target": target, "base_sae": out_dir.name})
        for folder, (sparsity, width) in zip(folders, grid):
            summary, token_sse = score(load_sae(folder).to(device).eval(), held_out[target],
                                       error_sst, device=device)
            sse.append(token_sse)
            trained = read_json(folder / "training.json")
            rows.append(
                {
                    "target": target,
                    "width": width,
                    "sparsity": sparsity,
                    "path": str(folder),
                    **summary,
                    "dead_fraction_train": trained.get("dead_fraction"),
                    "tokens_seen": trained.get("tokens_seen"),
                    "training": {k: v for k, v in (trained.get("schedule") or {}).items()
                                 if k != "heldout"},
                }
            )
    return rows, sse


def matched_l0(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per error SAE: each target's FVU at its L0 (log-log interpolation over that target's L0
    sweep at the same width; None outside it) and the dead latents of each target's SAE of the
    same width and sparsity (None if absent)."""
    out = []
    for width in sorted({r["width"] for r in rows}):
        by_target = {t: sorted((r for r in rows if r["width"] == width and r["target"] == t),
                               key=lambda r: r["l0"]) for t in TARGETS}
        for ref in by_target["error"]:
            fvu, dead = {}, {}
            for t, pts in by_target.items():
                l0 = np.log([p["l0"] for p in pts])
                inside = pts and l0[0] - 1e-9 <= np.log(ref["l0"]) <= l0[-1] + 1e-9
                fvu[t] = (
                    float(np.exp(np.interp(np.log(ref["l0"]), l0, np.log([p["fvu"] for p in pts]))))
                    if inside
                    else None
                )
                dead[t] = next(
                    (p["dead"] for p in pts if p.get("sparsity") == ref.get("sparsity")), None
                )
            out.append(
                {
                    "width": width,
                    "sparsity": ref.get("sparsity"),
                    "l0": ref["l0"],
                    "fvu": fvu,
                    "dead": dead,
                }
            )
    return out


def _default_base(decs: list[SavedDecomposition]) -> SavedDecomposition:
    ks = [d.k for d in decs if d.k is not None]
    median = float(np.median(ks)) if ks else 0.0
    return max(decs, key=lambda d: (d.width, -abs((d.k or 0) - median), -(d.k or 0)))


def error_sae_analysis(run_dir: RunDir | str | Path, *, cfg: ErrorSAEConfig | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Train and score SAEs on e, ê and e − ê of each chosen base SAE; write
    ``figures/error_saes.png``."""
    run, cfg = RunDir.of(run_dir), cfg or ErrorSAEConfig()
    device = resolve_device(cfg.train.device)  # the error SAEs' device: their inputs too
    t0 = time.perf_counter()
    store = run.store
    decs = run.decompositions
    names = {d.name: d for d in decs}
    missing = sorted(set(cfg.saes) - set(names))
    if missing:
        raise DarkMatterError(f"no decomposition for {missing}; available: {sorted(names)}")
    bases = [names[n] for n in cfg.saes] if cfg.saes else [_default_base(decs)]
    results = []
    for dec in bases:
        hook = dec.info["metrics"]["hook"]
        rows = dec.tokens["rows"].astype(np.int64)  # the probe-test tokens: unseen by the probe
        train_rows, eval_rows = split_by_context(
            rows, store.column("context")[rows], cfg.train_fraction, cfg.seed
        )
        log.info(
            "error SAEs of %s: %d training and %d evaluation tokens (probe-test split)",
            dec.name,
            train_rows.size,
            eval_rows.size,
        )
        sae = run.open_sae(dec, device)
        train, held_out = (
            error_targets(store, hook, r, sae, dec, chunk_rows=cfg.chunk_rows, device=device)
            for r in (train_rows, eval_rows)
        )
        grid, sse = train_on_targets(
            train, held_out, cfg, run.error_saes_path / dec.name, progress=progress,
            device=device,
        )
        matched = matched_l0(grid)
        mean_dev = {t: (held_out[t].double() - held_out[t].double().mean(0)).square().sum(1)
                    .numpy() for t in TARGETS}
        difference_intervals(matched, grid, sse, mean_dev, seed=cfg.seed)
        results.append(
            {
                "sae": dec.name,
                "width": dec.width,
                "k": dec.k,
                "hook": hook,
                "tokens": {
                    "train": int(train_rows.size),
                    "eval": int(eval_rows.size),
                    "source": "probe-test tokens of the decomposition "
                    "(never seen by the error probe), split by context",
                },
                "target_variance": {
                    t: _total_var(held_out[t]) / max(eval_rows.size, 1) for t in TARGETS
                },
                "grid": grid,
                "matched_l0": matched,
            }
        )
    table = [
        {
            "sae": b["sae"],
            "width": m["width"],
            "sparsity": m["sparsity"],
            "l0": m["l0"],
            **{f"fvu_{t}": m["fvu"][t] for t in TARGETS},
            **{f"dead_{t}": m["dead"][t] for t in TARGETS},
            "fvu_nonlinear_minus_linear_ci": m["fvu_nonlinear_minus_linear_ci"],
        }
        for b in results
        for m in b["matched_l0"]
    ]
    result = {"bases": results, "table": table, "config": to_dict(cfg)}
    result["figures"] = {
        "error_saes": str(error_sae_figure(result, run.path / FIGURE).relative_to(run.path))
    }
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def error_sae_figure(result: dict[str, Any], path: Path) -> Path:
    """Per base SAE, against L0: held-out FVU of each target, residual over the error's variance,
    dead latents."""
    bases = result["bases"]
    metrics = (
        ("fvu", "held-out FVU of its own target"),
        ("unexplained_over_error_var", "unexplained / error variance"),
        ("dead", "dead latents (held out)"),
    )
    fig, axes = plt.subplots(len(bases), 3, figsize=(14, 3.8 * len(bases)), squeeze=False)
    colours = dict(zip(TARGETS, ("black", "#e8a33d", "#2a6f97")))
    for row, base in zip(axes, bases):
        widths = sorted({r["width"] for r in base["grid"]})
        for target in TARGETS:
            for width, ls in zip(widths, ("-", "--", ":", "-.") * len(widths)):
                pts = sorted(
                    (r for r in base["grid"] if r["target"] == target and r["width"] == width),
                    key=lambda r: r["l0"],
                )
                for ax, (key, _) in zip(row, metrics):
                    ax.plot(
                        [p["l0"] for p in pts],
                        [p[key] for p in pts],
                        "o" + ls,
                        color=colours[target],
                        label=f"{target}, W={width:,}",
                        ms=4,
                    )
        for ax, (_, ylabel) in zip(row, metrics):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("L0")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        row[0].set_title(
            f"SAEs on the error of {base['sae']} ({base['tokens']['eval']:,} held-out tokens)",
            fontsize=9,
        )
        row[0].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def section(r: dict[str, Any], out_dir: Path) -> str:
    rows = "".join(
        f"<tr><td>{esc(t['sae'])}</td><td>{t['width']:,}</td><td>{t['l0']:.1f}</td>"
        + "".join(f"<td>{num(t[f'fvu_{p}'], '{:.3f}')}</td>" for p in TARGETS)
        + "".join(f"<td>{num(t[f'dead_{p}'], '{}')}</td>" for p in TARGETS)
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
        + _training_line(r) + figures_html(r["figures"], out_dir)
    )


def _training_line(r: dict[str, Any]) -> str:
    """How long the error SAEs trained and how much their last doubling of tokens still gained."""
    grid = [g for b in r["bases"] for g in b["grid"] if g.get("training")]
    if not grid:
        return ""
    parts = []
    for target in TARGETS:
        gains = [g["training"]["doubling_gain"] for g in grid if g["target"] == target
                 and g["training"].get("doubling_gain") is not None]
        if gains:
            parts.append(f"{esc(target)} {100 * min(gains):.1f}–{100 * max(gains):.1f} %")
    stopped = sorted({g["training"].get("stopped") for g in grid} - {None})
    tokens = sorted({g["tokens_seen"] for g in grid if g.get("tokens_seen")})
    seen = f"{tokens[0]:,}" if len(tokens) == 1 else f"{tokens[0]:,}–{tokens[-1]:,}"
    return (f"<p>Training: {seen} tokens each (stopped by: {', '.join(stopped)}); the last "
            f"doubling of tokens still lowered FVU by {'; '.join(parts) or '–'} (0 %: at the "
            f"plateau; <code>[error_saes.train] until = \"plateau\"</code> trains to it).</p>")


def _run(run: RunDir, cfg: RunConfig, results: Results, progress: bool) -> dict[str, Any]:
    return error_sae_analysis(run, cfg=cfg.error_saes, progress=progress)


ANALYSIS = Analysis(
    name="error_saes",
    title="SAEs trained on each part of the error",
    run=_run,
    section=section,
    settings=lambda cfg, results: (cfg.error_saes, VERSION),
    enabled=lambda cfg: cfg.error_saes.enabled,
)
