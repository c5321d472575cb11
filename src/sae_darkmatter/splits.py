"""Token selection and disjoint, seeded data splits of an activation store.

Statistics never use the first ``skip_positions`` positions of a context (nor those from
``stop_position`` on) or special tokens (attention sinks whose norms are ~100x the median).
The remaining tokens are split by
*context* into SAE-training and evaluation contexts, so the SAE never sees the evaluation
text; evaluation tokens are then permuted and split into probe-training and held-out probe-test
tokens, as in the paper (which permutes tokens, not contexts, for its regressions).

The token filter's rules (``rule_mask``, ``norm_outliers``) also serve the streaming
decomposition, which keeps no store and splits contexts instead (``split_contexts``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from sae_darkmatter import distributed
from sae_darkmatter.config import SplitConfig, TokenFilter
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.store import ActivationStore


@dataclass(frozen=True)
class Selection:
    """Rows kept by a ``TokenFilter`` and how many were excluded, and why."""

    rows: np.ndarray
    n_total: int
    n_excluded_position: int
    n_excluded_special: int
    n_excluded_norm: int = 0
    median_norm: float | None = None
    positions: tuple[int, int] | None = None  # the kept positions [from, before) of each context

    def summary(self) -> dict[str, int]:
        window = {} if self.positions is None else dict(zip(("positions_from", "positions_before"),
                                                            self.positions))
        return {
            "tokens_total": self.n_total,
            "tokens_kept": int(self.rows.size),
            **window,
            "excluded_positions": self.n_excluded_position,  # outside [from, before)
            "excluded_special_tokens": self.n_excluded_special,
            "excluded_norm_outliers": self.n_excluded_norm,
        }


@dataclass(frozen=True)
class Splits:
    """Sorted global row indices of the three disjoint splits."""

    selection: Selection
    sae_train: np.ndarray
    probe_train: np.ndarray
    probe_test: np.ndarray

    def summary(self) -> dict[str, int]:
        return {
            **self.selection.summary(),
            "sae_train_tokens": int(self.sae_train.size),
            "probe_train_tokens": int(self.probe_train.size),
            "probe_test_tokens": int(self.probe_test.size),
        }


def rule_mask(
    position: np.ndarray,
    tokens: Callable[[], np.ndarray],
    context_length: int,
    filt: TokenFilter,
    special_ids: Sequence[int] | np.ndarray = (),
) -> tuple[np.ndarray, int, int]:
    """Tokens passing ``filt``'s position and special-token rules, and how many each excluded.

    ``position`` and ``tokens()`` are aligned flat arrays (a store's columns, or a batch of
    contexts raveled); ``tokens`` is called only when the special-token rule applies (a store's
    column is a full read). The norm rule needs activations: ``norm_outliers``.
    """
    start, before = kept_window(filt, context_length)
    keep = (position >= start) & (position < before)
    n_position = int((~keep).sum())
    n_special = 0
    if filt.exclude_special and len(special_ids):
        special = np.isin(tokens(), np.asarray(special_ids)) & keep
        n_special = int(special.sum())
        keep &= ~special
    return keep, n_position, n_special


def kept_window(filt: TokenFilter, context_length: int) -> tuple[int, int]:
    """The positions [from, before) of a context that ``filt``'s position rules keep."""
    window = filt.kept_positions(context_length)
    return window.start, min(window.stop or context_length, context_length)


def norm_outliers(norms: np.ndarray, filt: TokenFilter, median: float) -> np.ndarray:
    """Which ``norms`` exceed ``filt.max_norm_ratio`` (not None) times ``median``."""
    ratio = filt.max_norm_ratio
    assert ratio is not None
    return norms > ratio * median


def select_rows(
    store: ActivationStore,
    filt: TokenFilter,
    special_ids: Sequence[int] = (),
    *,
    hook: str | None = None,
) -> Selection:
    """Apply a token filter to every stored row (norms are those of ``hook``, default the first)."""
    position = store.column("position")
    keep, n_pos, n_special = rule_mask(
        position, lambda: store.column("tokens"), store.context_length, filt, special_ids
    )
    rows = np.flatnonzero(keep).astype(np.int64)
    n_norm, median = 0, None
    if filt.max_norm_ratio is not None and rows.size:
        hook = hook or next(iter(store.hooks))
        part = rows[distributed.share(rows.size)]  # under torchrun each rank reads its share
        norms = distributed.concatenated(
            [x.norm(dim=1).numpy() for _, x in store.iter_chunks(hook, part, 65_536)]
        )
        median = float(np.median(norms))
        outlier = norm_outliers(norms, filt, median)
        n_norm = int(outlier.sum())
        rows = rows[~outlier]
    return Selection(
        rows, int(position.size), n_pos, n_special, n_norm, median,
        kept_window(filt, store.context_length),
    )


def make_splits(
    store: ActivationStore,
    cfg: SplitConfig,
    special_ids: Sequence[int] | None = None,
    *,
    hook: str | None = None,
) -> Splits:
    """Split a store's kept tokens into SAE-train / probe-train / probe-test rows.

    ``special_ids`` defaults to the ids recorded in the store's metadata at harvest time;
    ``hook`` (default: the first stored hook) is the one whose norms the outlier filter uses.
    """
    if not 0.0 <= cfg.sae_train_fraction < 1.0:
        raise DarkMatterError(
            f"sae_train_fraction must be in [0, 1) (0: pretrained SAEs, every context evaluates), "
            f"got {cfg.sae_train_fraction}"
        )
    if not 0.0 < cfg.probe_train_fraction < 1.0:
        raise DarkMatterError(
            f"probe_train_fraction must be strictly between 0 and 1, got {cfg.probe_train_fraction}"
        )
    if special_ids is None:
        special_ids = cast(list[int], store.meta.get("special_token_ids", []))
    sel = select_rows(store, cfg.filter, special_ids, hook=hook)
    rng = np.random.default_rng(cfg.seed)

    context = store.column("context")[sel.rows]
    contexts = np.unique(context)
    if contexts.size < 2:
        raise DarkMatterError(
            f"need at least 2 contexts with kept tokens to split, found {contexts.size}; "
            "harvest more contexts"
        )
    n_sae = 0 if cfg.sae_train_fraction == 0 else min(
        max(1, round(cfg.sae_train_fraction * contexts.size)), contexts.size - 1
    )
    sae_contexts = rng.permutation(contexts)[:n_sae]
    in_sae = np.isin(context, sae_contexts)
    sae_rows = sel.rows[in_sae]
    eval_rows = rng.permutation(sel.rows[~in_sae])
    n_probe = (cfg.probe_train_tokens if cfg.probe_train_tokens is not None
               else int(round(cfg.probe_train_fraction * eval_rows.size)))
    if n_probe == 0 or n_probe >= eval_rows.size:
        wanted = ("" if cfg.probe_train_tokens is None
                  else f" (split.probe_train_tokens = {cfg.probe_train_tokens:,} must be fewer)")
        raise DarkMatterError(
            f"too few evaluation tokens ({eval_rows.size:,}) for a probe train/test split{wanted}; "
            "harvest more contexts"
        )
    return Splits(
        selection=sel,
        sae_train=np.sort(sae_rows),
        probe_train=np.sort(eval_rows[:n_probe]),
        probe_test=np.sort(eval_rows[n_probe:]),
    )


def split_contexts(n_contexts: int, split: SplitConfig) -> tuple[np.ndarray, np.ndarray]:
    """(probe-train, probe-test) context indices, each in the seeded permuted order.

    The streaming decomposition's split: it keeps no tokens to permute, so it splits contexts
    (``split.sae_train_fraction`` unused; at least one context on each side).
    """
    frac = split.probe_train_fraction
    n_train = round(frac * n_contexts)
    if n_contexts < 2 or not 0 < n_train < n_contexts:
        side = "probe-train" if n_train == 0 else "probe-test"
        raise DarkMatterError(
            f"cannot split {n_contexts} context(s) by probe_train_fraction {frac}: no {side} "
            f"context would be left; use more contexts (n_contexts) or a fraction nearer 0.5"
        )
    order = np.random.default_rng(split.seed).permutation(n_contexts)
    return order[:n_train], order[n_train:]
