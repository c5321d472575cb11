"""How predictable is the SAE error norm ‖e‖², and from what? (paper Fig. 7, Fig. 13, Fig. 14)

Every baseline is an ordinary least-squares fit *with a bias column*, fit on a seeded half of
the probe-test tokens of a decomposition and scored (R², centred on the scored half's mean) on
the other half. Baselines (regressors besides the bias):

- ``"x (linear)"``: all d activation dims, streamed from the store (StreamingLstsq/R2Accumulator).
- ``"‖x‖"``: both ‖x‖ and ‖x‖² (a quadratic in the norm).
- ``"L0"``: the SAE's per-token number of active latents.
- ``"position"``: one-hot context position (= per-position mean of the target on the fit half;
  positions absent from the fit half get the global fit mean).
- ``"token identity"``: one-hot token id for ids seen >= 5 times in the fit half, all other ids
  pooled into one column (= per-id means; rare and unseen ids get the pooled rare-id mean).
- ``"‖x‖ + L0 + position"``: ‖x‖, ‖x‖², L0 and one-hot position, solved exactly by
  Frisch–Waugh (demean within position groups, then regress).
- ``"x + token identity"``: two-stage (not a joint fit): the x-fit's prediction plus the
  per-token-id mean (as in "token identity") of the x-fit's residual on the fit half.

Besides ‖e‖² (the paper's target), ``"x (linear) → ‖e‖"`` fits the norm itself on x: the
squared norm is heavier-tailed, so the choice of target alone moves the R².
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_darkmatter._io import resolve_device
from sae_darkmatter.analyses.norm_alignment import (
    latent_norm_alignment,
    reconstruction_norm_probe,
)
from sae_darkmatter.analyses.norm_figures import alignment_figure, baseline_figure, violin_figure
from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.config import RunConfig
from sae_darkmatter.decompose import SavedDecomposition
from sae_darkmatter.linalg import (
    R2Accumulator,
    StreamingLstsq,
    bootstrap_counts,
    percentile_interval,
    r2_score,
)
from sae_darkmatter.markup import esc, figures_html
from sae_darkmatter.run_dir import Decompositions, RunDir, decompositions_of, store_of
from sae_darkmatter.store import ActivationStore

log = logging.getLogger(__name__)

BASELINES = (
    "x (linear)",
    "‖x‖",
    "L0",
    "position",
    "token identity",
    "‖x‖ + L0 + position",
    "x + token identity",
    "x (linear) → ‖e‖",
)
TOKEN_MIN_COUNT = 5  # token ids rarer than this in the fit half share one pooled column
_CHUNK_ROWS = 8192
VERSION = 2  # part of the cache key: 2 added the ‖e‖ target and the x fits' intervals
N_BOOT = 200  # token resamples for the x fits' 95 % intervals


# ----------------------------------------------------------------------------- inputs


def fit_mask(n: int, seed: int) -> np.ndarray:
    """Boolean [n]: the seeded random half (floor(n/2) rows) used for fitting; the rest is
    scored."""
    perm = np.random.default_rng(seed).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[perm[: n // 2]] = True
    return mask


def _resolve_hook(
    store: ActivationStore, decomps: list[SavedDecomposition], hook: str | None
) -> str:
    if hook is not None:
        return hook
    named = decomps[0].info.get("metrics", {}).get("hook")
    return named if named in store.hooks else next(iter(store.hooks))


# ----------------------------------------------------------------------------- small OLS


def _group_codes(groups: np.ndarray, fit: np.ndarray, min_count: int) -> tuple[np.ndarray, int]:
    """Codes 0..K-1 for values seen >= min_count times in the fit rows; every other value gets K."""
    values, counts = np.unique(groups[fit], return_counts=True)
    kept = values[counts >= min_count]
    if len(kept) == 0:
        return np.zeros(len(groups), np.int64), 1
    idx = np.minimum(np.searchsorted(kept, groups), len(kept) - 1)
    return np.where(kept[idx] == groups, idx, len(kept)).astype(np.int64), len(kept) + 1


def grouped_ols_predict(
    features: np.ndarray,
    y: np.ndarray,
    fit: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    min_count: int = 1,
) -> np.ndarray:
    """Predictions for all rows of OLS ``y ~ features + one-hot(groups)`` fit on ``fit`` rows.

    ``groups=None`` means a plain bias column. Solved by Frisch–Waugh: features and target are
    demeaned within groups on the fit rows, then regressed without bias; a group with no fit
    rows (e.g. the pooled group when nothing is rare) predicts with the global fit means.
    """
    y = np.asarray(y, np.float64)
    f = np.asarray(features, np.float64).reshape(len(y), -1)
    codes, k = (
        (np.zeros(len(y), np.int64), 1) if groups is None else _group_codes(groups, fit, min_count)
    )
    cf = codes[fit]
    count = np.bincount(cf, minlength=k).astype(np.float64)
    present = count > 0

    def group_mean(v: np.ndarray) -> np.ndarray:
        s = np.bincount(cf, weights=v[fit], minlength=k)
        return np.where(present, s / np.maximum(count, 1.0), v[fit].mean())

    y_mean = group_mean(y)[codes]
    f_mean = np.stack([group_mean(col)[codes] for col in f.T], axis=1) if f.shape[1] else f
    if f.shape[1] == 0:
        return y_mean
    fd = f - f_mean
    beta, *_ = np.linalg.lstsq(fd[fit], (y - y_mean)[fit], rcond=None)
    return y_mean + fd @ beta


# ----------------------------------------------------------------------------- baselines


def _stream_x_fit(
    store: ActivationStore, hook: str, rows: np.ndarray, targets: np.ndarray, fit: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fit targets [n, s] on x (with bias) over the fit rows, streaming; return (predictions, ‖x‖²).

    Two passes over the rows: accumulate the normal equations, then predict every row. Memory
    is O(d²) plus O(n·s) scalars.
    """
    d = store.d(hook)
    lstsq = StreamingLstsq(d, targets.shape[1])
    x_sq = np.empty(len(rows), np.float64)
    start = 0
    for chunk_rows, x in store.iter_chunks(hook, rows, _CHUNK_ROWS):
        sl = slice(start, start + len(chunk_rows))
        x_sq[sl] = x.double().square().sum(1).numpy()
        m = fit[sl]
        if m.any():
            lstsq.update(x[torch.from_numpy(m)], torch.from_numpy(targets[sl][m]))
        start += len(chunk_rows)
    probe = lstsq.solve()
    pred = np.empty(targets.shape, np.float64)
    start = 0
    for chunk_rows, x in store.iter_chunks(hook, rows, _CHUNK_ROWS):
        sl = slice(start, start + len(chunk_rows))
        pred[sl] = probe.predict(x.double()).numpy()
        start += len(chunk_rows)
    return pred, x_sq


def _x_r2(targets: np.ndarray, pred: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Held-out R² per target column, from the streaming accumulator."""
    acc = R2Accumulator(targets.shape[1])
    acc.update(torch.from_numpy(targets[score]), torch.from_numpy(pred[score]))
    return acc.r2_per_dim().numpy()


def r2_interval(counts: np.ndarray, y: np.ndarray, pred: np.ndarray) -> list[float]:
    """95 % percentile interval of held-out R² over token resamples (``counts`` [n_boot, n],
    the scored rows; the fit is held fixed)."""
    n = len(y)
    sse = counts @ np.square(y - pred)
    mean = (counts @ y) / n
    sst = counts @ np.square(y) - n * np.square(mean)
    return percentile_interval(1.0 - sse / sst)


def _feature_predictions(
    y: np.ndarray,
    x_pred: np.ndarray,
    norm_feats: np.ndarray,
    l0: np.ndarray,
    positions: np.ndarray,
    tokens: np.ndarray,
    fit: np.ndarray,
) -> dict[str, np.ndarray]:
    """Predictions (all rows) of every baseline except "x (linear)", fit on the ``fit`` rows."""
    none = np.empty((len(y), 0))
    return {
        "‖x‖": grouped_ols_predict(norm_feats, y, fit),
        "L0": grouped_ols_predict(l0, y, fit),
        "position": grouped_ols_predict(none, y, fit, positions),
        "token identity": grouped_ols_predict(none, y, fit, tokens, min_count=TOKEN_MIN_COUNT),
        "‖x‖ + L0 + position": grouped_ols_predict(
            np.column_stack([norm_feats, l0]), y, fit, positions
        ),
        "x + token identity": x_pred
        + grouped_ols_predict(none, y - x_pred, fit, tokens, min_count=TOKEN_MIN_COUNT),
    }


def norm_baselines(
    decompose_dir: Decompositions, store: ActivationStore, *, hook: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """Held-out R² of each SAE's ‖e‖² (and ‖e‖) from every baseline (see the module docstring).

    Returns ``{sae_name: {baseline: r2, "intervals": {x baseline: [lo, hi]}}}`` (95 % token
    bootstrap intervals of the two x fits) plus ``"baselines"`` (names in order) and
    ``"n_fit"`` / ``"n_score"`` (token counts of the halves, from the first SAE).
    """
    decomps = decompositions_of(decompose_dir)
    hook = _resolve_hook(store, decomps, hook)
    tokens_all, positions_all = store.column("tokens"), store.column("position")
    result: dict[str, Any] = {"baselines": list(BASELINES)}
    # SAEs sharing test rows (the usual case) share the x passes.
    groups: list[tuple[np.ndarray, list[SavedDecomposition]]] = []
    for dec in decomps:
        rows = dec.tokens["rows"]
        match = next((g for g in groups if np.array_equal(g[0], rows)), None)
        if match is None:
            groups.append((rows, [dec]))
        else:
            match[1].append(dec)
    for rows, members in groups:
        fit = fit_mask(len(rows), seed)
        score = ~fit
        result.setdefault("n_fit", int(fit.sum()))
        result.setdefault("n_score", int(score.sum()))
        sq = np.stack([m.tokens["err_sq"].astype(np.float64) for m in members], axis=1)
        targets = np.concatenate([sq, np.sqrt(sq)], axis=1)  # ‖e‖² then ‖e‖, one x pass
        x_pred, x_sq = _stream_x_fit(store, hook, rows, targets, fit)
        x_r2 = _x_r2(targets, x_pred, score)
        n = len(members)
        counts = bootstrap_counts(int(score.sum()), N_BOOT, [seed, 3])
        tokens, positions = tokens_all[rows], positions_all[rows]
        norm_feats = np.stack([np.sqrt(x_sq), x_sq], axis=1)
        for j, dec in enumerate(members):
            y = targets[:, j]
            preds = _feature_predictions(
                y,
                x_pred[:, j],
                norm_feats,
                dec.tokens["l0"].astype(np.float64),
                positions,
                tokens,
                fit,
            )
            scores = {"x (linear)": float(x_r2[j]), "x (linear) → ‖e‖": float(x_r2[n + j])}
            scores.update({name: r2_score(y[score], p[score]) for name, p in preds.items()})
            result[dec.name] = {name: scores[name] for name in BASELINES}
            result[dec.name]["intervals"] = {
                name: r2_interval(counts, targets[score, col], x_pred[score, col])
                for name, col in (("x (linear)", j), ("x (linear) → ‖e‖", n + j))
            }
    return result


# ----------------------------------------------------------------------------- all together


def norm_analysis(
    decompose_dir: RunDir | str | Path,
    store: RunDir | ActivationStore | str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Baselines, violins and (for the widest SAE, run on ``device``) latent/norm-probe
    alignment, with figures.

    Writes ``figures/norm_baselines.png``, ``figures/norm_violins.png`` and
    ``figures/norm_alignment.png`` under ``out_dir``; returns a JSON-able summary.
    The alignment uses the paper's a* (``reconstruction_norm_probe``) on the widest SAE's
    probe-test rows.
    """
    run = decompose_dir if isinstance(decompose_dir, RunDir) else RunDir(Path(decompose_dir).parent)
    store = store_of(store)
    out = Path(out_dir)
    baselines = norm_baselines(decompose_dir, store, seed=seed)
    decomps = decompositions_of(decompose_dir)
    widest = max(decomps, key=lambda d: d.width)
    hook = _resolve_hook(store, decomps, None)
    sae = run.open_sae(widest, device)  # a folder or a registry spec
    rows = widest.tokens["rows"]
    align = latent_norm_alignment(
        sae, reconstruction_norm_probe(sae, store, rows, hook=hook), store, rows, hook=hook
    )
    paths = {
        "baselines": baseline_figure(baselines, out / RunDir.figure_key("norm_baselines")),
        "violins": violin_figure(decompose_dir, out / RunDir.figure_key("norm_violins"), seed=seed),
        "alignment": alignment_figure(align, out / RunDir.figure_key("norm_alignment")),
    }
    summary_align = {k: align[k] for k in ("pearson", "spearman", "n_latents", "n_rows")}
    return {
        "baselines": baselines,
        "alignment": {"sae": widest.name, **summary_align},
        "figures": {k: str(v) for k, v in paths.items()},
    }


def section(n: dict[str, Any], out_dir: Path) -> str:
    b = n["baselines"]
    names = [k for k in b if k not in ("baselines", "n_fit", "n_score")]
    head = "".join(f"<th>{esc(x)}</th>" for x in b["baselines"])

    def cell(name: str, x: str) -> str:
        ci = b[name].get("intervals", {}).get(x)
        return f"{b[name][x]:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    body = "".join(
        f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{cell(name, x)}</td>" for x in b["baselines"])
        + "</tr>"
        for name in names
    )
    al = n.get("alignment", {})
    return (
        f"<p>Held-out R² of ‖e‖² (last column: of ‖e‖) ({b['n_fit']:,} fit / "
        f"{b['n_score']:,} scored tokens).</p>"
        f"<table><tr><th>SAE</th>{head}</tr>{body}</table>"
        f"<p>Latent mean activation vs norm-probe projection on its decoder direction "
        f"({esc(str(al.get('sae')))}): Pearson {al.get('pearson') or float('nan'):.3f}, "
        f"Spearman {al.get('spearman') or float('nan'):.3f} over {al.get('n_latents')} "
        f"latents.</p>" + figures_html(n["figures"], out_dir)
    )


def _run(run: RunDir, cfg: RunConfig, results: Results, progress: bool) -> dict[str, Any]:
    return norm_analysis(run, run, run.path, seed=cfg.split.seed,
                         device=resolve_device(cfg.decompose.device))


ANALYSIS = Analysis(
    name="norms", title="Predicting the error norm: baselines", run=_run, section=section,
    settings=lambda cfg, results: (VERSION,),
)
