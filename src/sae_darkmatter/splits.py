"""Token selection and disjoint, seeded data splits of an activation store.

Statistics never use the first ``skip_positions`` positions of a context (nor those from
``stop_position`` on) or special tokens (attention sinks whose norms are ~100x the median).
The remaining tokens are split by
*context* into SAE-training and evaluation contexts, so the SAE never sees the evaluation
text; evaluation tokens are then permuted and split into probe-training and held-out probe-test
tokens, as in the paper (which permutes tokens, not contexts, for its regressions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def select_rows(
    store: ActivationStore,
    filt: TokenFilter,
    special_ids: Sequence[int] = (),
    *,
    hook: str | None = None,
) -> Selection:
    """Apply a token filter to every stored row (norms are those of ``hook``, default the first)."""
    window = filt.kept_positions(store.context_length)
    before = min(window.stop or store.context_length, store.context_length)
    position = store.column("position")
    keep = (position >= window.start) & (position < before)
    n_pos = int((~keep).sum())
    n_special = 0
    if filt.exclude_special and len(special_ids):
        special = np.isin(store.column("tokens"), np.asarray(special_ids)) & keep
        n_special = int(special.sum())
        keep &= ~special
    rows = np.flatnonzero(keep).astype(np.int64)
    n_norm, median = 0, None
    if filt.max_norm_ratio is not None and rows.size:
        hook = hook or next(iter(store.hooks))
        part = rows[distributed.share(rows.size)]  # under torchrun each rank reads its share
        norms = distributed.concatenated(
            [x.norm(dim=1).numpy() for _, x in store.iter_chunks(hook, part, 65_536)]
        )
        median = float(np.median(norms))
        outlier = norms > filt.max_norm_ratio * median
        n_norm = int(outlier.sum())
        rows = rows[~outlier]
    return Selection(
        rows, int(position.size), n_pos, n_special, n_norm, median, (window.start, before)
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
        special_ids = store.meta.get("special_token_ids", [])
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
