"""Statistics of the downstream splice: bootstrap intervals over contexts and the stopping rule.

Rows of the per-token arrays are evaluation contexts in the order they were spliced. Every
intervention ran on the first round's ``first`` rows; an SAE whose gap-closed intervals were
still wider than the target ran ``sae``, ``sae+linear`` and ``sae+nonlinear`` on more rows
(``contexts[name]``, always a leading block), so each statistic is bootstrapped over the rows
its interventions share.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

import numpy as np

from sae_darkmatter.analyses.splice import MAIN, PER_SAE, SHARED

PARTS = ("err_sq", "linear_sq", "nonlinear_sq")
TARGETED = ("sae+linear", "sae+nonlinear")  # the gap-closed shares the stopping rule targets


def _stat(v: np.ndarray) -> dict[str, Any]:
    """Row 0 is the point estimate, the rest bootstrap draws: mean and 95 % percentile interval."""
    lo, hi = float(np.nanpercentile(v[1:], 2.5)), float(np.nanpercentile(v[1:], 97.5))
    return {"mean": float(v[0]), "ci": [lo, hi]}


def half_width(stat: Mapping[str, Any]) -> float:
    """Half the width of a ``_stat`` interval (percentile intervals need not be symmetric)."""
    lo, hi = stat["ci"]
    return (hi - lo) / 2


def summarize(per_token: Mapping[str, np.ndarray], averaged: np.ndarray, names: list[str], *,
              first: int | None = None, contexts: Mapping[str, int] | None = None,
              n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Means with bootstrap CIs over contexts (rows of the ``[n, T]`` arrays).

    CE/KL are averaged over ``averaged`` tokens; squared norms are summed over spliced tokens.
    The shared interventions and the random controls cover the leading ``first`` rows (default
    all); SAE ``name``'s ``MAIN`` interventions and error parts the leading ``contexts[name]``
    (default all). Rows resample the same way for every statistic on the same rows, so
    differences such as ``ce_gap_closed_linear_minus_nonlinear`` are paired.
    """
    n_all = averaged.shape[0]
    n_first: int = n_all if first is None else first
    rows: Mapping[str, int] = contexts or {}

    @cache
    def weights(m: int) -> np.ndarray:  # row 0: the sample itself
        draws = np.random.default_rng([seed, m]).multinomial(m, np.full(m, 1.0 / m), size=n_boot)
        return np.vstack([np.ones(m), draws]).astype(np.float64)

    def sums(key: str, m: int, mask: np.ndarray = averaged) -> np.ndarray:
        v = np.where(mask[:m], per_token[key][:m].astype(np.float64), 0.0)
        return weights(m) @ v.sum(axis=1)

    def count(m: int) -> np.ndarray:
        return weights(m) @ averaged[:m].sum(axis=1)

    def loss_stats(ce: np.ndarray, kl: np.ndarray, clean: np.ndarray, m: int) -> dict[str, Any]:
        return {"ce": _stat(ce / count(m)), "ce_increase": _stat((ce - clean) / count(m)),
                "kl": _stat(kl / count(m))}

    clean0 = sums("clean/ce", n_first)
    out: dict[str, Any] = {"shared": {"clean": {"ce": _stat(clean0 / count(n_first))}},
                           "saes": {}}
    out["shared"] |= {i: loss_stats(sums(f"shared/{i}/ce", n_first),
                                    sums(f"shared/{i}/kl", n_first), clean0, n_first)
                      for i in SHARED}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name in names:
            n_sae = int(rows[name]) if name in rows else n_all
            m_of = {i: n_sae if i in MAIN else n_first for i in PER_SAE}
            stats, ce_gap, kl_gap = {}, {}, {}
            for i, m in m_of.items():
                ce, kl = sums(f"{name}/{i}/ce", m), sums(f"{name}/{i}/kl", m)
                ce_sae, kl_sae = sums(f"{name}/sae/ce", m), sums(f"{name}/sae/kl", m)
                clean = sums("clean/ce", m)
                stats[i] = loss_stats(ce, kl, clean, m)
                ce_gap[i] = (ce_sae - ce) / (ce_sae - clean)
                kl_gap[i] = (kl_sae - kl) / kl_sae
            m = m_of["sae"]
            sq = {p: sums(f"{name}/{p}", m, np.isfinite(per_token[f"{name}/{p}"])) for p in PARTS}
            share = {"linear": sq["linear_sq"] / sq["err_sq"],
                     "nonlinear": sq["nonlinear_sq"] / sq["err_sq"]}
            out["saes"][name] = {
                "contexts": m,
                **{key: {i: stats[i][key] for i in PER_SAE} for key in ("ce", "ce_increase", "kl")},
                "ce_gap_closed": {i: _stat(v) for i, v in ce_gap.items()},
                "ce_gap_closed_linear_minus_nonlinear": _stat(
                    ce_gap["sae+linear"] - ce_gap["sae+nonlinear"]),
                "kl_gap_closed": {i: _stat(v) for i, v in kl_gap.items()},
                "sq_norm_share": {p: _stat(v) for p, v in share.items()},
                "fvu_gap_closed": {
                    "linear": _stat(1 - share["nonlinear"]),
                    "nonlinear": _stat(1 - share["linear"]),
                },
            }
            out["saes"][name]["half_width"] = {
                i: half_width(out["saes"][name]["ce_gap_closed"][i]) for i in TARGETED}
    return out


def unfinished(summary: Mapping[str, Any], target: float) -> list[str]:
    """SAEs of ``summary`` with a targeted gap-closed half-width above ``target`` (or NaN)."""
    return [name for name, s in summary["saes"].items()
            if not all(h <= target for h in s["half_width"].values())]
