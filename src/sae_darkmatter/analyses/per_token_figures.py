"""Figures of the per-token analysis: the predictability matrix and the token strip."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.plotting import plt, save_figure
from sae_darkmatter.run_dir import store_of
from sae_darkmatter.store import ActivationStore

if TYPE_CHECKING:
    from sae_darkmatter.analyses.per_token import PerTokenNorms

# For matplotlib labels: visible whitespace, and "$" escaped so token text is never parsed as math.
_PLAIN = str.maketrans({"\n": "↵", "\r": "␍", "\t": "⇥", "$": r"\$"})


def token_text(token: int, tokenizer: Any | None) -> str:
    return f"<{token}>" if tokenizer is None else tokenizer.decode([int(token)])


def _as_array(nested: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in nested], dtype=float)


def matrix_figure(result: dict[str, Any], path: str | Path) -> Path:
    """Two heatmaps: held-out R² of ‖e_j‖ from ‖e_i‖, and % improvement from adding
    ‖nonlinear_i‖."""
    names = result["names"]
    m = len(names)
    panels = [
        (_as_array(result["r2"]), "R² of ‖e_j‖ from ‖e_i‖", "viridis", "{:.2f}"),
        (
            _as_array(result["improvement"]),
            "% of unexplained variance removed\nby adding ‖nonlinear_i‖",
            "magma",
            "{:.0f}",
        ),
    ]
    size = 1.2 + 0.7 * m
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size))
    for ax, (mat, title, cmap, fmt) in zip(axes, panels):
        finite = mat[np.isfinite(mat)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        im = ax.imshow(
            np.ma.masked_invalid(mat), cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1e-9
        )
        for i in range(m):
            for j in range(i, m):
                if np.isfinite(mat[i, j]):
                    bright = (mat[i, j] - lo) / (hi - lo) > 0.6 if hi > lo else False
                    ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center", fontsize=8,
                            color="black" if bright else "white")
        labels = [n.translate(_PLAIN) for n in names]
        ax.set_xticks(range(m), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(m), labels, fontsize=8)
        ax.set_xlabel("target SAE j")
        ax.set_ylabel("predictor SAE i")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(
        f"Per-token error predictability (held-out, {result['n_score']:,} tokens)", fontsize=11
    )
    return save_figure(fig, Path(path))


def token_strip_figure(
    norms: PerTokenNorms,
    store: ActivationStore | str | Path,
    path: str | Path,
    *,
    start: int | None = None,
    length: int = 60,
    tokenizer: Any | None = None,
) -> Path:
    """‖e‖ of every SAE along up to ``length`` consecutive test tokens of one context.

    ``start`` indexes the test tokens (``norms.rows``); the strip stays inside that token's
    context. By default it starts at the first test token of the context with the most.
    """
    st = store_of(store)
    ctx = st.column("context")[norms.rows]
    if start is None:
        ids, counts = np.unique(ctx, return_counts=True)
        start = int(np.flatnonzero(ctx == ids[np.argmax(counts)])[0])
    if not 0 <= start < norms.rows.size:
        raise DarkMatterError(f"start must index the {norms.rows.size} test tokens, got {start}")
    sel = np.arange(start, min(start + length, norms.rows.size))
    sel = sel[ctx[sel] == ctx[start]]  # test rows are ascending, so one context is contiguous
    rows = norms.rows[sel]
    position = st.column("position")[rows]
    tokens = st.column("tokens")[rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * sel.size + 2.0), 4.0))
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(norms.names)))
    for name, row, color in zip(norms.names, norms.err[:, sel], colors):
        ax.plot(position, row, "o-", ms=2.5, lw=1.2, color=color, label=name.translate(_PLAIN))
    labels = [token_text(t, tokenizer).translate(_PLAIN) for t in tokens]
    ax.set_xticks(position, labels, rotation=90, fontsize=7)
    ax.set_xlabel(f"test tokens of context {int(ctx[start])} (by position)")
    ax.set_ylabel("‖e‖ (SAE error norm)")
    ax.set_title("Per-token SAE error norm across widths")
    ax.legend(frameon=False, fontsize=8, ncol=min(4, len(norms.names)))
    ax.grid(alpha=0.3)
    return save_figure(fig, Path(path))
