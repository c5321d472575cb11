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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from scipy import stats

from sae_darkmatter._io import resolve_device
from sae_darkmatter.analyses.norm_figures import alignment_figure, baseline_figure, violin_figure
from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.config import RunConfig
from sae_darkmatter.decompose import SavedDecomposition
from sae_darkmatter.linalg import R2Accumulator, StreamingLstsq, r2_score
from sae_darkmatter.markup import esc, figures_html
from sae_darkmatter.run_dir import Decompositions, RunDir, decompositions_of, store_of
from sae_darkmatter.saes import AffineSAE, latent_rows
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
)
TOKEN_MIN_COUNT = 5  # token ids rarer than this in the fit half share one pooled column
MIN_ACTIVE = 5  # latents active fewer times are left out of the alignment correlations
_CHUNK_ROWS = 8192


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
    """Held-out R² of each SAE's ‖e‖² from every baseline (see the module docstring).

    Returns ``{sae_name: {baseline: r2}}`` plus ``"baselines"`` (names in order) and
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
        targets = np.stack([m.tokens["err_sq"].astype(np.float64) for m in members], axis=1)
        x_pred, x_sq = _stream_x_fit(store, hook, rows, targets, fit)
        x_r2 = _x_r2(targets, x_pred, score)
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
            scores = {"x (linear)": float(x_r2[j])}
            scores.update({name: r2_score(y[score], p[score]) for name, p in preds.items()})
            result[dec.name] = {name: scores[name] for name in BASELINES}
    return result


# ----------------------------------------------------------------------------- figures


# ----------------------------------------------------------------------------- Fig. 14


@torch.no_grad()
def reconstruction_norm_probe(
    sae: AffineSAE,
    store: ActivationStore,
    rows: np.ndarray,
    *,
    hook: str | None = None,
    max_rows: int = 20000,
) -> torch.Tensor:
    """The paper's a* (Fig. 14): least squares ``‖r‖² ≈ a*·r + b`` with ``r = Sae(x) − b_dec``.

    If every latent fires with a typical magnitude c_i on near-orthogonal directions d_i, then
    ‖r‖² = Σ w_i² ≈ Σ c_i w_i, which is linear in r with a* = Σ c_i d_i, so a*·d_i ≈ c_i.
    """
    hook = hook or next(iter(store.hooks))
    rows = np.asarray(rows, np.int64)
    if len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(np.int64)]
    fit = StreamingLstsq(store.d(hook), 1, bias=True)
    device = sae.W_dec.device
    with torch.inference_mode():
        for _, x in store.iter_chunks(hook, rows, 4096):
            r = sae(x.to(device)) - sae.b_dec  # forward splits rows by width (latent_rows)
            fit.update(r, r.square().sum(dim=1, keepdim=True))
    return fit.solve().weight[:, 0]


def latent_norm_alignment(
    sae: AffineSAE,
    norm_probe_weight: torch.Tensor | np.ndarray,
    store: ActivationStore,
    rows: np.ndarray,
    *,
    hook: str | None = None,
    max_rows: int = 20000,
) -> dict[str, Any]:
    """Each latent's mean activation when active vs ``a*·d_i`` (unit-norm decoder row d_i).

    The norm-is-linear argument predicts these agree when ‖·‖² ≈ a*·x with a* = Σ c_i d_i.
    ``rows`` (sorted) are thinned evenly to at most ``max_rows`` and encoded in chunks.
    Correlations use latents active >= 5 times; ``None`` when fewer than 3 such latents.
    """
    hook = hook or next(iter(store.hooks))
    rows = np.asarray(rows, np.int64)
    if len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(np.int64)]
    w_dec = sae.W_dec.detach().double().cpu()
    d_sae = w_dec.shape[0]
    total = torch.zeros(d_sae, dtype=torch.float64)
    count = torch.zeros(d_sae, dtype=torch.int64)
    device = sae.W_dec.device
    with torch.inference_mode():
        for _, x in store.iter_chunks(hook, rows, min(4096, latent_rows(d_sae))):
            z = sae.encode(x.to(device)).cpu()
            total += z.double().sum(0)
            count += (z > 0).sum(0)
    a = torch.as_tensor(np.asarray(norm_probe_weight), dtype=torch.float64).reshape(-1)
    proj = (w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-30)) @ a
    keep = (count >= MIN_ACTIVE).numpy()
    mean_act = (total / count.clamp_min(1)).numpy()[keep]
    projection = proj.numpy()[keep]
    enough = int(keep.sum()) >= 3
    # scipy's stubs leave the results' fields unsolved type variables: they are floats.
    pearson = float(cast(float, stats.pearsonr(mean_act, projection)[0])) if enough else None
    spearman = float(cast(float, stats.spearmanr(mean_act, projection)[0])) if enough else None
    return {
        "pearson": pearson,
        "spearman": spearman,
        "n_latents": int(keep.sum()),
        "n_rows": int(len(rows)),
        "latent_index": np.flatnonzero(keep).tolist(),
        "mean_activation": mean_act.tolist(),
        "projection": projection.tolist(),
    }


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
    body = "".join(
        f"<tr><td>{esc(name)}</td>"
        + "".join(f"<td>{b[name][x]:.3f}</td>" for x in b["baselines"])
        + "</tr>"
        for name in names
    )
    al = n.get("alignment", {})
    return (
        f"<p>Held-out R² of ‖e‖² ({b['n_fit']:,} fit / {b['n_score']:,} scored tokens).</p>"
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
    name="norms", title="Predicting the error norm: baselines", run=_run, section=section
)
