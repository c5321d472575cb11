"""Activating and non-activating example windows of SAE latents, streamed from an activation store.

Every context is cut into windows of ``window`` positions; a window's activation for a latent is
the largest activation on one of its *kept* tokens (the run's token filter: no leading
positions, special tokens or norm outliers). Contexts are split (seeded) into explanation and
scoring contexts, so no text the explainer saw is scored.

Two streaming passes over the kept rows, in chunks of whole windows (memory: one chunk of SAE
inputs and latents, plus a fixed number of windows per sampled latent):

1. count the windows each latent is active in (explanation / scoring contexts); sample latents
   (seeded) among those active in at least ``n_quantiles`` scoring windows and one explanation
   window; dead and rarer latents are counted and skipped;
2. per sampled latent keep the ``n_explain`` top explanation windows, a uniform sample of
   ``pool`` active scoring windows (the windows with the smallest seeded hashes: independent of
   the chunking) and ``n_negatives`` random scoring windows where it is silent.

Activating scoring windows are ranked by activation and cut into ``n_quantiles`` equal-count
quantiles (quantile Q the strongest); ``n_per_quantile`` are drawn from each. A last pass over
the chosen windows reads each token's activation to mark the activating tokens ``<<like this>>``.

SAEs that read inputs derived from the same rows (e.g. the SAEs trained on the three error parts
of one base SAE) are collected together: their inputs are computed once per chunk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from sae_darkmatter.autointerp.config import AutoInterpConfig
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.saes import SAE
from sae_darkmatter.store import ActivationStore

PartsFn = Callable[
    [np.ndarray], Mapping[str, torch.Tensor]
]  # sorted store rows -> {input name: [rows, d]}
Member = tuple[SAE, str]  # an SAE and the name of its input in the parts
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Windows:
    """Windows of the kept rows of a store, and what is needed to show their text.

    ``rows`` are the kept rows (ascending); window ``w`` holds ``rows[starts[w]:starts[w + 1]]``.
    ``key`` is each window's ``context * stride + position // window``; ``all_keys`` the same for
    every store row (to show excluded tokens too); ``explain`` marks explanation windows.
    """

    rows: np.ndarray
    starts: np.ndarray
    key: np.ndarray
    explain: np.ndarray
    all_keys: np.ndarray
    tokens: np.ndarray
    size: int

    @property
    def n(self) -> int:
        return int(self.key.size)

    def bounds(self, w: int) -> tuple[int, int]:
        """Positions in ``rows`` of window ``w``'s kept rows."""
        return int(self.starts[w]), int(self.starts[w + 1]) if w + 1 < self.n else int(
            self.rows.size
        )

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, int]]:
        """``(first, end)`` window ranges of about ``chunk_rows`` kept rows each."""
        cuts = np.unique(np.searchsorted(self.starts, np.arange(0, self.rows.size, chunk_rows)))
        edges = [*cuts.tolist(), self.n]
        for a, b in pairwise(edges):
            if b > a:
                yield a, b

    def token_ids(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(store rows, token ids) of every token of window ``w``, kept or not."""
        a, b = np.searchsorted(self.all_keys, [self.key[w], self.key[w] + 1])
        return np.arange(a, b), self.tokens[a:b]


def make_windows(store: ActivationStore, rows: np.ndarray, *, window: int, explain_fraction: float,
                 seed: int) -> Windows:
    """Cut the kept ``rows`` into windows and split their contexts into explanation / scoring."""
    context = store.column("context")
    position = store.column("position")
    stride = -(-store.context_length // window) + 1
    all_keys = context.astype(np.int64) * stride + position // window
    if np.any(np.diff(all_keys) < 0):
        raise DarkMatterError(f"{store.path}: rows are not grouped by context in position order")
    rows = np.sort(np.asarray(rows, np.int64))
    if rows.size == 0:
        raise DarkMatterError("no kept tokens to draw examples from (check the run's token filter)")
    key, starts = np.unique(all_keys[rows], return_index=True)
    contexts = np.unique(context[rows])
    if contexts.size < 2:
        raise DarkMatterError(
            f"need >= 2 contexts for explanation and scoring contexts, have {contexts.size}"
        )
    n_explain = min(max(1, round(explain_fraction * contexts.size)), contexts.size - 1)
    chosen = np.random.default_rng(seed).permutation(contexts)[:n_explain]
    return Windows(
        rows=rows,
        starts=starts.astype(np.int64),
        key=key,
        explain=np.isin(key // stride, chosen),
        all_keys=all_keys,
        tokens=store.column("tokens"),
        size=window,
    )


def _window_max(members: Sequence[Member], parts: PartsFn, windows: Windows, a: int, b: int,
                latents: Sequence[np.ndarray | None]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per member: activations ``[rows, L]`` of ``latents`` (None: all) on the kept rows of
    windows ``a:b``, and their per-window maxima ``[b − a, L]``. The inputs are computed once."""
    lo, hi = windows.bounds(a)[0], windows.bounds(b - 1)[1]
    inputs = parts(windows.rows[lo:hi])
    for (sae, name), chosen in zip(members, latents, strict=True):
        with torch.inference_mode():
            z = sae.encode(inputs[name])
        z = (z if chosen is None else z[:, torch.from_numpy(chosen)]).float().numpy()
        yield z, np.maximum.reduceat(z, windows.starts[a:b] - lo, axis=0)


def firing_counts(members: Sequence[Member], parts: PartsFn, windows: Windows,
                  chunk_rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per member, per latent: the number of explanation and of scoring windows it is active in."""
    counts = [(np.zeros(sae.d_sae, np.int64), np.zeros(sae.d_sae, np.int64)) for sae, _ in members]
    for a, b in windows.chunks(chunk_rows):
        explain = windows.explain[a:b]
        for (n_explain, n_score), (_, wmax) in zip(
            counts, _window_max(members, parts, windows, a, b, [None] * len(members))
        ):
            active = wmax > 0
            n_explain += active[explain].sum(0)
            n_score += active[~explain].sum(0)
    return counts


def _hash(ids: np.ndarray, salt: int) -> np.ndarray:
    """A seeded splitmix64 hash of window ids: the same value whatever the chunking."""
    x = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt & _MASK64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _salt(seed: int, latent: int, kind: int) -> int:
    return (seed * 1_000_003 + latent) * 4 + kind


class _Smallest:
    """The ``m`` entries with the smallest ``(key, id)`` seen so far (ties broken by id)."""

    def __init__(self, m: int, key_dtype: Any):
        self.m = m
        self.keys = np.empty(0, key_dtype)
        self.ids = np.empty(0, np.int64)
        self.values = np.empty(0, np.float32)

    def offer(self, keys: np.ndarray, ids: np.ndarray, values: np.ndarray) -> None:
        if not keys.size:
            return
        k, i, v = (
            np.concatenate(p) for p in ((self.keys, keys), (self.ids, ids), (self.values, values))
        )
        keep = np.lexsort((i, k))[: self.m]
        self.keys, self.ids, self.values = k[keep], i[keep], v[keep]


@dataclass(frozen=True)
class Example:
    """One window: ``quantile`` 1..Q for scored activating windows (Q strongest), 0 for a
    negative, -1 for an explanation example; ``text`` is plain, ``highlighted`` marks the
    activating tokens with ``<<`` ``>>``."""

    window: int
    activation: float
    quantile: int
    text: str
    highlighted: str


@dataclass(frozen=True)
class LatentExamples:
    """A sampled latent's explanation examples (strongest first) and scored windows."""

    latent: int
    active_windows_explain: int
    active_windows_score: int
    explain: tuple[Example, ...]
    scored: tuple[Example, ...]


@dataclass(frozen=True)
class ExampleSet:
    """Examples of the sampled latents of one SAE, and why other latents were not sampled."""

    latents: list[LatentExamples]
    d_sae: int
    n_dead: int
    n_rare: int
    n_eligible: int


def sample_latents(
    n_explain: np.ndarray, n_score: np.ndarray, cfg: AutoInterpConfig
) -> tuple[np.ndarray, int, int]:
    """Seeded sample of eligible latents (sorted), the number of dead and of too rare latents."""
    dead = (n_explain + n_score) == 0
    eligible = np.flatnonzero((n_score >= cfg.n_quantiles) & (n_explain >= 1))
    n = min(cfg.n_latents, eligible.size)
    chosen = (
        np.sort(np.random.default_rng(cfg.seed).choice(eligible, n, replace=False))
        if n
        else eligible[:0]
    )
    return chosen, int(dead.sum()), int((~dead).sum() - eligible.size)


def _draw(
    members: Sequence[Member],
    parts: PartsFn,
    windows: Windows,
    latents: Sequence[np.ndarray],
    cfg: AutoInterpConfig,
) -> list[list[dict[str, _Smallest]]]:
    """Pass 2, per member and sampled latent: top explanation windows, a uniform pool of active
    scoring windows, and one of silent scoring windows."""
    kept = [[{"top": _Smallest(cfg.n_explain, np.float32), "pool": _Smallest(cfg.pool, np.uint64),
              "neg": _Smallest(cfg.n_negatives, np.uint64)} for _ in lat] for lat in latents]
    for a, b in windows.chunks(cfg.chunk_rows):
        ids = np.arange(a, b)
        explain = windows.explain[a:b]
        for m, (_, wmax) in enumerate(_window_max(members, parts, windows, a, b, latents)):
            for j, latent in enumerate(latents[m]):
                act = wmax[:, j]
                on = act > 0
                e, s, n = on & explain, on & ~explain, ~on & ~explain
                kept[m][j]["top"].offer(-act[e], ids[e], act[e])
                kept[m][j]["pool"].offer(
                    _hash(ids[s], _salt(cfg.seed, int(latent), 1)), ids[s], act[s]
                )
                kept[m][j]["neg"].offer(
                    _hash(ids[n], _salt(cfg.seed, int(latent), 2)), ids[n], act[n]
                )
    return kept


def _quantile_picks(
    pool: _Smallest, cfg: AutoInterpConfig, latent: int
) -> list[tuple[int, float, int]]:
    """(window, activation, quantile) drawn from equal-count activation quantiles of the pool."""
    order = np.lexsort((pool.ids, pool.values))
    rng = np.random.default_rng([cfg.seed, latent])
    picks = []
    for q, part in enumerate(np.array_split(order, cfg.n_quantiles), 1):
        for i in np.sort(rng.choice(part, min(cfg.n_per_quantile, part.size), replace=False)):
            picks.append((int(pool.ids[i]), float(pool.values[i]), q))
    return picks


def token_activations(members: Sequence[Member], parts: PartsFn, windows: Windows,
                      latents: Sequence[np.ndarray], chosen: np.ndarray,
                      chunk_rows: int) -> list[dict[int, np.ndarray]]:
    """Per member: window -> ``[kept rows of the window, L]`` activations of its ``latents``, for
    the ``chosen`` windows."""
    chosen = np.unique(chosen)
    out: list[dict[int, np.ndarray]] = [{} for _ in members]
    if not chosen.size:
        return out
    sizes = [np.subtract(b[1], b[0]) for b in map(windows.bounds, chosen)]
    sub = Windows(
        rows=np.concatenate([windows.rows[slice(*windows.bounds(w))] for w in chosen]),
        starts=np.cumsum([0, *sizes[:-1]]),
        key=windows.key[chosen],
        explain=windows.explain[chosen],
        all_keys=windows.all_keys,
        tokens=windows.tokens,
        size=windows.size,
    )
    for a, b in sub.chunks(chunk_rows):
        lo = sub.bounds(a)[0]
        for m, (z, _) in enumerate(_window_max(members, parts, sub, a, b, latents)):
            for w in range(a, b):
                s, e = sub.bounds(w)
                out[m][int(chosen[w])] = z[s - lo : e - lo]
    return out


def render(windows: Windows, w: int, acts: np.ndarray, tokenizer: Any) -> tuple[str, str]:
    """(plain, highlighted) text of window ``w``; ``acts`` are its kept tokens' activations.

    Runs of activating tokens are wrapped in ``<<`` ``>>`` (leading spaces stay outside);
    newlines are shown as ``\\n`` so each snippet stays on one line.
    """
    all_rows, ids = windows.token_ids(w)
    active = np.zeros(all_rows.size, bool)
    kept = windows.rows[slice(*windows.bounds(w))]
    active[np.searchsorted(all_rows, kept)] = acts > 0
    plain, marked = [], []
    edges = np.flatnonzero(np.diff(active.astype(np.int8))) + 1
    for a, b in zip([0, *edges.tolist()], [*edges.tolist(), all_rows.size]):
        text = tokenizer.decode(ids[a:b].tolist())
        plain.append(text)
        if active[a]:
            space = re.match(r"\s*", text)
            assert space is not None  # \s* matches every string
            lead = space.end()
            text = f"{text[:lead]}<<{text[lead:]}>>"
        marked.append(text)

    def one_line(parts: list[str]) -> str:
        return "".join(parts).replace("\r", "").replace("\n", "\\n")

    return one_line(plain), one_line(marked)


def _picks(
    kept: list[dict[str, _Smallest]], latents: np.ndarray, cfg: AutoInterpConfig
) -> list[tuple[list[tuple[int, float, int]], list[tuple[int, float, int]]]]:
    """Per latent: (explanation windows, scored windows) as (window, activation, quantile)."""
    out = []
    for k, latent in zip(kept, latents, strict=True):
        explain = [(int(i), float(v), -1) for i, v in zip(k["top"].ids, k["top"].values)]
        negatives = [(int(i), 0.0, 0) for i in np.sort(k["neg"].ids)]
        out.append((explain, _quantile_picks(k["pool"], cfg, int(latent)) + negatives))
    return out


def collect_examples(
    members: Sequence[Member],
    parts: PartsFn,
    windows: Windows,
    cfg: AutoInterpConfig,
    tokenizer: Any,
) -> list[ExampleSet]:
    """Sample latents of each member SAE and collect their explanation and scoring windows.

    ``members`` are (SAE, input name) pairs; ``parts(rows)`` gives every input they name, computed
    once per chunk for all of them (e.g. the three error parts of one base SAE).
    """
    counts = firing_counts(members, parts, windows, cfg.chunk_rows)
    sampled = [sample_latents(n_explain, n_score, cfg) for n_explain, n_score in counts]
    latents = [lat for lat, _, _ in sampled]
    kept = _draw(members, parts, windows, latents, cfg)
    picks = [_picks(k, lat, cfg) for k, lat in zip(kept, latents, strict=True)]
    chosen = np.array([w for p in picks for e, s in p for w, _, _ in e + s], np.int64)
    acts = token_activations(members, parts, windows, latents, chosen, cfg.chunk_rows)
    sets = []
    for m, ((sae, _), (lat, n_dead, n_rare)) in enumerate(zip(members, sampled, strict=True)):
        n_explain, n_score = counts[m]
        out = []
        for j, (latent, (explain, scored)) in enumerate(zip(lat, picks[m], strict=True)):
            def example(w: int, value: float, q: int, m: int = m, j: int = j) -> Example:
                return Example(w, value, q, *render(windows, w, acts[m][w][:, j], tokenizer))

            out.append(
                LatentExamples(
                    int(latent),
                    int(n_explain[latent]),
                    int(n_score[latent]),
                    tuple(example(*p) for p in explain),
                    tuple(example(*p) for p in scored),
                )
            )
        sets.append(ExampleSet(out, sae.d_sae, n_dead, n_rare, int(lat.size)))
    return sets
