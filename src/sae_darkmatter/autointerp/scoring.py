"""Detection accuracy from the judge's verdicts: per quantile, on negatives, balanced, with CIs.

A judgement is one snippet: its quantile (1..Q for activating windows, Q the strongest; 0 for a
negative) and whether the judge said the latent activates. An activating snippet is judged
correctly when the judge says yes, a negative one when it says no. Per latent, judgements are
counted into ``correct`` / ``total`` arrays of length Q + 1 (column 0: negatives).

Pooled over latents: accuracy per column = Σ correct / Σ total; recall = pooled accuracy over
columns 1..Q; specificity = column 0 (the paper's "Not" point, 1 − false-positive rate);
balanced accuracy = (recall + specificity) / 2. Intervals: 95 % percentile bootstrap over
latents (latents are the independent units; a latent's snippets share its explanation), and,
per column, the paper's normal approximation p ± 1.96·√(p(1 − p)/n).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Judgement = tuple[int, bool]  # (quantile, 0 for a negative; judge said "activates")


def latent_counts(
    judgements: Iterable[Judgement], n_quantiles: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(correct, total)``, int arrays of length ``n_quantiles + 1`` (index 0: negatives)."""
    correct = np.zeros(n_quantiles + 1, np.int64)
    total = np.zeros(n_quantiles + 1, np.int64)
    for quantile, said_yes in judgements:
        if not 0 <= quantile <= n_quantiles:
            raise ValueError(f"quantile {quantile} outside 0..{n_quantiles}")
        total[quantile] += 1
        correct[quantile] += said_yes == (quantile > 0)
    return correct, total


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _stats(correct: np.ndarray, total: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled statistics of ``[..., L, Q+1]`` count arrays summed over latents (axis -2)."""
    c, t = correct.sum(-2), total.sum(-2)
    recall = _ratio(c[..., 1:].sum(-1), t[..., 1:].sum(-1))
    specificity = _ratio(c[..., 0], t[..., 0])
    return {"by_column": _ratio(c, t), "recall": recall, "specificity": specificity,
            "balanced": (recall + specificity) / 2}


def _value(v: Any) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


def _ci(draws: np.ndarray) -> list[float | None]:
    draws = draws[~np.isnan(draws)]
    if not draws.size:
        return [None, None]
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def _normal_ci(p: float | None, n: int) -> list[float | None]:
    if p is None or n == 0:
        return [None, None]
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    return [max(0.0, p - half), min(1.0, p + half)]


def summarize(
    correct: np.ndarray, total: np.ndarray, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Pooled detection scores of ``[L, Q+1]`` per-latent counts with bootstrap CIs over latents.

    Returns ``quantiles`` (one row per quantile 1..Q: accuracy, correct, total, ci, ci_normal),
    ``negatives`` (same fields; accuracy is the specificity), ``recall``, ``specificity``,
    ``balanced_accuracy`` (each ``{"value", "ci"}``) and ``n_latents``. Undefined values (no
    snippets) are None.
    """
    correct, total = np.asarray(correct, np.int64), np.asarray(total, np.int64)
    n_lat = correct.shape[0]
    point = _stats(correct, total)
    if n_lat:
        w = np.random.default_rng(seed).multinomial(n_lat, np.full(n_lat, 1.0 / n_lat), size=n_boot)
        boot = _stats(w[:, :, None] * correct[None], w[:, :, None] * total[None])
    else:
        boot = {k: np.full((n_boot, *np.shape(v)), np.nan) for k, v in point.items()}
    c, t = correct.sum(0), total.sum(0)

    def column(j: int) -> dict[str, Any]:
        p = _value(point["by_column"][j])
        return {"accuracy": p, "correct": int(c[j]), "total": int(t[j]),
                "ci": _ci(boot["by_column"][:, j]), "ci_normal": _normal_ci(p, int(t[j]))}

    return {
        "n_latents": int(n_lat),
        "quantiles": [{"quantile": j, **column(j)} for j in range(1, correct.shape[1])],
        "negatives": column(0),
        **{name: {"value": _value(point[key]), "ci": _ci(boot[key])}
           for name, key in (("recall", "recall"), ("specificity", "specificity"),
                             ("balanced_accuracy", "balanced"))},
    }


def latent_balanced_accuracy(
    correct: Sequence[int] | np.ndarray, total: Sequence[int] | np.ndarray
) -> float | None:
    """One latent's balanced accuracy (None without activating or without negative snippets)."""
    stats = _stats(np.asarray(correct)[None], np.asarray(total)[None])
    return _value(stats["balanced"])
