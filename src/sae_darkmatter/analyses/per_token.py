"""Per-token scaling of SAE error (paper Fig. 4–6).

Do larger SAEs fail on the same tokens as smaller ones? For every SAE of a run this reads the
per-token error norms of the shared probe-test tokens (``decompose/<name>.safetensors``) and

- predicts SAE j's ‖e_j‖ from SAE i's ‖e_i‖ (held-out R², upper triangle i <= j), and measures
  how much of the remaining variance ‖nonlinear_i‖ removes when added as a second regressor;
- finds the contexts with the largest mean nonlinear (or linear, or total) error norm and
  renders them as shaded token strips (HTML);
- plots ‖e‖ of all SAEs along a stretch of consecutive test tokens.

All norms are unsquared L2 norms, as in the paper. Test rows are a seeded random subset of the
store's tokens, so a context holds only some test tokens; the others are shown without a value.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sae_darkmatter.analyses.per_token_figures import matrix_figure, token_strip_figure, token_text
from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.config import RunConfig
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.linalg import bootstrap_counts, percentile_interval
from sae_darkmatter.markup import figures_html
from sae_darkmatter.run_dir import Decompositions, RunDir, decompositions_of, store_of
from sae_darkmatter.store import ActivationStore

log = logging.getLogger(__name__)

By = Literal["nonlinear", "linear", "total"]
# Below this unexplained variance (1 − R²) the % improvement is 0/0 and reported as missing.
_PERFECT = 1e-9
N_BOOT = 200  # bootstrap resamples of the score tokens for the R² intervals
VERSION = 2  # part of the cache key: 2 added the R² intervals
_VISIBLE = str.maketrans({"\n": "↵", "\r": "␍", "\t": "⇥"})


@dataclass(frozen=True)
class PerTokenNorms:
    """Unsquared per-token error norms of all SAEs of a run on their shared test tokens.

    ``err``, ``linear`` and ``nonlinear`` are float64 ``[n_sae, n_test]``, aligned with ``rows``
    (global store rows, ascending); SAEs are sorted by width, then k.
    """

    names: list[str]
    widths: list[int]
    ks: list[int | None]
    rows: np.ndarray
    err: np.ndarray
    linear: np.ndarray
    nonlinear: np.ndarray

    def of(self, by: By) -> np.ndarray:
        """The ``[n_sae, n_test]`` matrix for ``by``: "total" (‖e‖), "linear" or "nonlinear"."""
        table = {"total": self.err, "linear": self.linear, "nonlinear": self.nonlinear}
        if by not in table:
            raise DarkMatterError(f"unknown error kind {by!r}; choose one of {', '.join(table)}")
        return table[by]


def per_token_norms(decompose_dir: Decompositions) -> PerTokenNorms:
    """Load ‖e‖, ‖linear‖ and ‖nonlinear‖ per test token for every SAE in ``decompose_dir``.

    ``decompose_dir`` is a run's ``decompose/`` folder (a run folder holding one also works).
    All SAEs must share the same test rows; an SAE whose rows differ raises DarkMatterError.
    """
    decs = decompositions_of(decompose_dir)  # sorted by width, then k, then name
    rows = decs[0].tokens["rows"].astype(np.int64)
    for d in decs[1:]:
        if not np.array_equal(d.tokens["rows"], rows):
            raise DarkMatterError(
                f"SAE {d.name!r} was scored on different test rows than {decs[0].name!r}; "
                "decompose all SAEs of a run with the same store and split settings"
            )

    def norms(key: str) -> np.ndarray:
        return np.sqrt(
            np.clip(np.stack([d.tokens[key].astype(np.float64) for d in decs]), 0.0, None)
        )

    return PerTokenNorms(
        names=[d.name for d in decs],
        widths=[d.width for d in decs],
        ks=[d.k for d in decs],
        rows=rows,
        err=norms("err_sq"),
        linear=norms("linear_sq"),
        nonlinear=norms("nonlinear_sq"),
    )


# ------------------------------------------------------------------ predictability matrix


def _heldout_fit(
    features: Sequence[np.ndarray], y: np.ndarray, fit: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Residuals and targets on ``score`` of OLS ``y ~ [features, 1]`` fit on ``fit``."""
    design = np.column_stack([*features, np.ones_like(y)])
    coef, *_ = np.linalg.lstsq(design[fit], y[fit], rcond=None)
    return y[score] - design[score] @ coef, y[score]


def _r2(resid: np.ndarray, y: np.ndarray) -> float:
    total = y - y.mean()
    return float(1.0 - resid @ resid / (total @ total))


def _bootstrap_r2(resid: np.ndarray, y: np.ndarray, counts: np.ndarray) -> list[float]:
    """95 % percentile interval of the held-out R² over resamples of the score tokens
    (``counts``: ``bootstrap_counts``; the fit stays fixed)."""
    n = y.size
    sst = counts @ (y * y) - (counts @ y) ** 2 / n
    with np.errstate(invalid="ignore", divide="ignore"):
        return percentile_interval(1.0 - (counts @ (resid * resid)) / sst)


def _listify(a: np.ndarray) -> list[list[float | None]]:
    """Nested lists with NaN as None, so the result is strict JSON."""
    return [[None if math.isnan(v) else float(v) for v in row] for row in a]


def predictability_matrix(
    norms: PerTokenNorms, *, seed: int = 0, train_fraction: float = 0.5, n_boot: int = N_BOOT
) -> dict[str, Any]:
    """Held-out R² of predicting ‖e_j‖ from ‖e_i‖ (and from ‖e_i‖, ‖nonlinear_i‖), i <= j.

    Tokens are split by a seeded permutation into a fit part (``train_fraction``) and a score
    part. ``r2_ci``: 95 % bootstrap intervals of ``r2`` over the score tokens (the same
    ``n_boot`` draws for every pair). ``improvement`` = (R²_nl − R²)/(1 − R²)·100, the % of the
    unexplained variance that ‖nonlinear_i‖ removes; missing where R² is already ~1 (e.g. the
    diagonal). Entries below the diagonal are None.
    """
    n = norms.rows.size
    n_fit = int(round(n * train_fraction))
    if not 0.0 < train_fraction < 1.0 or n_fit < 3 or n - n_fit < 3:
        raise DarkMatterError(
            f"need at least 3 fit and 3 score tokens (have {n} test tokens, "
            f"train_fraction={train_fraction})"
        )
    perm = np.random.default_rng(seed).permutation(n)
    fit, score = perm[:n_fit], perm[n_fit:]
    m = len(norms.names)
    r2 = np.full((m, m), np.nan)
    r2_nl = np.full((m, m), np.nan)
    r2_ci: list[list[list[float] | None]] = [[None] * m for _ in range(m)]
    counts = bootstrap_counts(score.size, n_boot, [seed, 1])
    for i in range(m):
        for j in range(i, m):
            resid, y = _heldout_fit([norms.err[i]], norms.err[j], fit, score)
            r2[i, j] = _r2(resid, y)
            r2_ci[i][j] = _bootstrap_r2(resid, y, counts)
            r2_nl[i, j] = _r2(*_heldout_fit([norms.err[i], norms.nonlinear[i]], norms.err[j],
                                            fit, score))
    unexplained = 1.0 - r2
    with np.errstate(invalid="ignore", divide="ignore"):
        improvement = np.where(unexplained > _PERFECT, (r2_nl - r2) / unexplained * 100.0, np.nan)
    return {
        "names": list(norms.names),
        "widths": list(norms.widths),
        "r2": _listify(r2),
        "r2_ci": r2_ci,
        "r2_nl": _listify(r2_nl),
        "improvement": _listify(improvement),
        "n_fit": n_fit,
        "n_score": n - n_fit,
        "seed": seed,
    }


# ------------------------------------------------------------------ darkest contexts


def darkest_contexts(
    decompose_dir: str | Path | PerTokenNorms,
    store: ActivationStore | str | Path,
    *,
    sae: str | None = None,
    n: int = 5,
    by: By = "nonlinear",
    tokenizer: Any | None = None,
    min_tokens: int = 8,
) -> list[dict[str, Any]]:
    """The ``n`` contexts with the largest mean per-token error norm ``by`` over their test tokens.

    Only contexts with at least ``min_tokens`` test tokens compete (a mean over 1–2 tokens is
    noise). ``sae`` names the SAE (default: the widest). Each result holds ``context``,
    ``score``, ``n_test`` and ``tokens``: the whole context, each token as ``{"text",
    "position", "value"}`` with value None for tokens outside the test split. Returns [] when no
    context has enough test tokens. Already loaded norms may be passed instead of the folder.
    """
    norms = (
        decompose_dir
        if isinstance(decompose_dir, PerTokenNorms)
        else per_token_norms(decompose_dir)
    )
    idx = len(norms.names) - 1 if sae is None else _sae_index(norms, sae)
    values = norms.of(by)[idx]
    st = store_of(store)
    context = st.column("context")
    ctx_of_test = context[norms.rows]
    ids, inverse, counts = np.unique(ctx_of_test, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=values) / counts
    eligible = np.flatnonzero(counts >= min_tokens)
    if eligible.size == 0:
        log.warning("no context has %d or more test tokens; no darkest contexts", min_tokens)
        return []
    best = eligible[np.argsort(-means[eligible], kind="stable")[:n]]
    tokens, position = st.column("tokens"), st.column("position")
    value_of_row = dict(zip(norms.rows.tolist(), values.tolist()))
    out = []
    for b in best:
        rows = np.flatnonzero(context == ids[b])
        rows = rows[np.argsort(position[rows], kind="stable")]
        out.append({
            "context": int(ids[b]),
            "score": float(means[b]),
            "n_test": int(counts[b]),
            "sae": norms.names[idx],
            "by": by,
            "tokens": [
                {"text": token_text(int(tokens[r]), tokenizer), "position": int(position[r]),
                 "value": value_of_row.get(int(r))}
                for r in rows
            ],
        })
    return out


def _sae_index(norms: PerTokenNorms, name: str) -> int:
    if name not in norms.names:
        raise DarkMatterError(
            f"no decomposition for SAE {name!r}; available: {', '.join(norms.names)}"
        )
    return norms.names.index(name)


def darkest_html(contexts: Sequence[dict[str, Any]], *, title: str) -> str:
    """An HTML fragment: one line of shaded ``<span>`` tokens per context (white → red by value).

    Shading shares one scale (the largest value shown) across contexts; tokens without a value
    are grey. All text is escaped; newlines and tabs are drawn as ↵ and ⇥, spaces are kept.
    """
    vmax = max(
        (t["value"] for c in contexts for t in c["tokens"] if t["value"] is not None), default=0.0
    )
    parts = [f'<section class="darkest"><h3>{html.escape(title)}</h3>']
    if not contexts:
        parts.append("<p>No context has enough test tokens.</p>")
    for c in contexts:
        head = f"context {c['context']} · mean {c['score']:.4g} over {c['n_test']} test tokens"
        spans = []
        for t in c["tokens"]:
            text = html.escape(t["text"].translate(_VISIBLE))
            if t["value"] is None:
                style, tip = (
                    "color:#999;background:#eee",
                    f"position {t['position']}: not a test token",
                )
            else:
                a = t["value"] / vmax if vmax > 0 else 0.0
                g = round(255 * (1 - a))
                style, tip = (
                    f"background:rgb(255,{g},{g})",
                    f"position {t['position']}: {t['value']:.4g}",
                )
            spans.append(f'<span style="{style}" title="{html.escape(tip)}">{text}</span>')
        parts.append(
            '<div style="margin:0.6em 0">'
            f'<div style="font-size:0.8em;color:#555">{html.escape(head)}</div>'
            '<div style="white-space:pre-wrap;font-family:monospace;line-height:1.6">'
            f'{"".join(spans)}</div></div>'
        )
    parts.append("</section>")
    return "\n".join(parts)


# ------------------------------------------------------------------ token strip


# ------------------------------------------------------------------ the whole analysis


def per_token_analysis(
    decompose_dir: Decompositions,
    store: RunDir | ActivationStore | str | Path,
    out_dir: str | Path,
    *,
    tokenizer: Any | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the per-token analysis; write ``figures/per_token_{matrix,strip}.png`` under ``out_dir``.

    Returns a JSON-able summary: the predictability matrices, mean norms per SAE, figure paths
    and, for the widest SAE, the darkest contexts by nonlinear and by linear error (as HTML).
    """
    out = Path(out_dir)
    st = store_of(store)
    norms = per_token_norms(decompose_dir)
    matrix = predictability_matrix(norms, seed=seed)
    figures = {
        "matrix": str(matrix_figure(matrix, out / RunDir.figure_key("per_token_matrix"))),
        "strip": str(
            token_strip_figure(
                norms, st, out / RunDir.figure_key("per_token_strip"), tokenizer=tokenizer
            )
        ),
    }
    darkest = {}
    for by in ("nonlinear", "linear"):
        ctxs = darkest_contexts(norms, st, by=by, tokenizer=tokenizer)
        darkest[by] = {
            "sae": norms.names[-1],
            "contexts": [{k: c[k] for k in ("context", "score", "n_test")} for c in ctxs],
            "html": darkest_html(
                ctxs, title=f"Contexts with the largest {by} error ({norms.names[-1]})"
            ),
        }
    return {
        "names": norms.names,
        "widths": norms.widths,
        "ks": norms.ks,
        "n_test": int(norms.rows.size),
        "mean_norm": {
            "total": norms.err.mean(axis=1).tolist(),
            "linear": norms.linear.mean(axis=1).tolist(),
            "nonlinear": norms.nonlinear.mean(axis=1).tolist(),
        },
        "predictability": matrix,
        "figures": figures,
        "darkest": darkest,
    }


def section(p: dict[str, Any], out_dir: Path) -> str:
    parts = [
        "<p>Held-out R² of predicting SAE j's per-token ‖e‖ from SAE i's, and the share of "
        "the remaining variance removed by adding SAE i's ‖nonlinear error‖.</p>"
        + figures_html(p["figures"], out_dir)
    ]
    for kind in ("nonlinear", "linear"):
        d = p.get("darkest", {}).get(kind)
        if d and d.get("html"):
            parts.append(d["html"])  # titled "Contexts with the largest {kind} error"
    return "".join(parts)


def _run(run: RunDir, cfg: RunConfig, results: Results, progress: bool) -> dict[str, Any]:
    return per_token_analysis(run, run, run.path, tokenizer=run.tokenizer, seed=cfg.split.seed)


ANALYSIS = Analysis(name="per_token", title="Per-token scaling", run=_run, section=section,
                    settings=lambda cfg, results: (VERSION,))
