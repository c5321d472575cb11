"""Nested prefixes of one SAE: its error decomposed with only its first ``m`` latents, per ``m``.

The prefix of width ``m`` keeps the first ``m`` latents of a latent order and zeroes the rest:
its latents are the full SAE's latents restricted to the prefix, decoded with the SAE's decoder
and bias. Where each latent is a function of its own pre-activation alone (ReLU, JumpReLU,
Gated; SAELens saves a Matryoshka BatchTopK SAE as a JumpReLU SAE) that is exactly the SAE made
of those ``m`` latents. For a TopK SAE it is truncation *after* the top-k: a prefix keeps those
of the full SAE's k selected latents that fall inside it (its L0 is below k and falls with
``m``); it is not a top-k re-run over the ``m`` latents, which would be a different SAE. This
is how a Matryoshka SAE's nested reconstructions are defined in training (each group decodes
the leading latents of the one full encoding), and it needs one encode per chunk for all
prefixes.

Latent orders (``order``):

- ``"stored"``: the SAE's own order; right for a Matryoshka SAE, whose groups are its leading
  latents. An ordinary SAE's stored order comes from its initialisation: its prefixes are
  random subsets of its latents.
- ``"frequency"``: firing frequency on the probe-train rows, most frequent first (ties by
  index), a data-based nesting for ordinary SAEs. Those rows are the probes' fitting rows and
  disjoint from the held-out tokens everything is scored on; unlike the SAE-training rows they
  exist for pretrained SAEs too.
- a permutation of ``range(d_sae)``.

All prefixes share the store reads and one least-squares system (their error targets side by
side, as ``decompose_many`` puts several SAEs'), so XᵀX is accumulated and factored once. Each
prefix's ``metrics.d_sae`` is its width ``m``, so the scaling-law fit
(``analyses.scaling.fit_scaling``) reads the prefixes as a width sweep of one SAE.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from sae_darkmatter import distributed
from sae_darkmatter._io import resolve_device
from sae_darkmatter.config import DecomposeConfig
from sae_darkmatter.decompose.checks import Locate, check_sae, require_finite, require_finite_at
from sae_darkmatter.decompose.core import chunk_size
from sae_darkmatter.decompose.from_store import Errors, decompose_rows
from sae_darkmatter.decompose.results import DecompositionOutput
from sae_darkmatter.errors import ConfigError
from sae_darkmatter.saes import SAE, TopKSAE, latent_rows
from sae_darkmatter.saes.latents import decode_latents, encode_latents
from sae_darkmatter.splits import Splits
from sae_darkmatter.store import ActivationStore

log = logging.getLogger(__name__)

LatentOrder = Literal["stored", "frequency"]
ORDERS: tuple[LatentOrder, ...] = ("stored", "frequency")
DEFAULT_DIVISORS = (16, 8, 4, 2, 1)  # default prefixes: W/16, W/8, W/4, W/2, W


def decompose_prefixes(
    store: ActivationStore,
    sae: SAE,
    splits: Splits,
    cfg: DecomposeConfig = DecomposeConfig(),
    *,
    widths: Sequence[int] | None = None,
    order: LatentOrder | Sequence[int] | np.ndarray = "stored",
    hook: str | None = None,
    progress: bool = True,
) -> dict[int, DecompositionOutput]:
    """Decompose ``sae`` cut to each prefix width (default ``default_prefix_widths``), keyed
    by width, ascending.

    Probes are fit on ``splits.probe_train`` and scored on ``splits.probe_test`` as in
    ``decompose``; the full width's result is ``decompose(store, sae, splits, cfg)``'s (the
    same errors; the probes up to the rounding of the joint solve). The widths, the order and
    the SAE are checked before any work (``check_prefix_widths``, ``check_order``,
    ``check_sae``); ``plan_prefixes`` adds a Matryoshka SAE's widths as the default and warns
    about prefixes that are not the SAE's trained nesting (the CLI goes through it).
    """
    hook = hook or next(iter(store.hooks))
    dtype = check_sae("sae", sae, store, hook)
    chosen = check_prefix_widths(default_prefix_widths(sae.d_sae) if widths is None else widths,
                                 sae.d_sae)
    perm = check_order(order, sae.d_sae)
    device = resolve_device(cfg.device)
    if perm is None:
        perm = firing_order(store, sae, splits.probe_train, cfg, hook=hook, progress=progress)
    errors = PrefixErrors(sae, dtype, perm, chosen, hook, device)
    outputs = decompose_rows(store, errors, errors.widths, splits, cfg, hook=hook,
                             progress=progress, what=f"{len(chosen)} prefixes")
    return {m: outputs[prefix_name(m)] for m in chosen}


def prefix_name(width: int) -> str:
    """The result name of a prefix (the CLI writes ``<sae>__prefix<width>``)."""
    return f"prefix{width}"


def default_prefix_widths(d_sae: int, nested: Sequence[int] | None = None) -> tuple[int, ...]:
    """A Matryoshka SAE's ``nested`` widths (its ``cfg.json``'s, plus ``d_sae`` if missing),
    else ``d_sae`` // 16, 8, 4, 2, 1 with those below 1 (and repeats) left out."""
    if nested:
        return tuple(dict.fromkeys([*nested, d_sae]))
    return tuple(dict.fromkeys(d_sae // q for q in DEFAULT_DIVISORS if d_sae // q >= 1))


def plan_prefixes(
    name: str,
    sae: SAE,
    nested: Sequence[int] | None,
    widths: Sequence[int] | None,
    order: str | Sequence[int] | np.ndarray,
) -> tuple[int, ...]:
    """The checked prefix widths of SAE ``name`` (``widths``, else ``default_prefix_widths``
    with its ``nested`` Matryoshka widths), after checking ``order``; warns where the prefixes
    are not nested groups the SAE was trained with: the stored order of an SAE without
    ``nested`` widths is arbitrary, and a TopK SAE's prefixes are truncations (module doc)."""
    if widths is None and nested:
        try:
            chosen = check_prefix_widths(default_prefix_widths(sae.d_sae, nested), sae.d_sae)
        except ConfigError as err:
            raise ConfigError(f"SAE {name!r} records Matryoshka widths {list(nested)} that do not "
                              f"fit it ({err}); give the prefix widths") from None
    else:
        chosen = check_prefix_widths(default_prefix_widths(sae.d_sae) if widths is None
                                     else widths, sae.d_sae)
    check_order(order, sae.d_sae)
    if nested:
        return chosen
    if isinstance(order, str) and order == "stored":
        log.warning("SAE %r records no nested (Matryoshka) widths: its stored latent order comes "
                    "from its initialisation, so its prefixes are arbitrary subsets of its "
                    "latents; order them by firing frequency instead (--latent-order frequency)",
                    name)
    if isinstance(sae, TopKSAE):
        log.warning("SAE %r is a TopK SAE: each prefix keeps those of its k selected latents that "
                    "fall inside it (truncation after the top-k), so the prefixes' L0 falls below "
                    "k and they are not TopK SAEs of their widths", name)
    return chosen


def check_prefix_widths(widths: Sequence[int], d_sae: int) -> tuple[int, ...]:
    """``widths`` ascending, after refusing an empty list, non-integers, repeats and widths
    outside ``1..d_sae`` (``ConfigError`` naming them)."""
    values = list(widths)
    if not values:
        raise ConfigError("prefix widths: none given; give at least one width in 1..d_sae")
    odd = [w for w in values if isinstance(w, bool) or not isinstance(w, int | np.integer)]
    if odd:
        raise ConfigError(f"prefix widths must be whole numbers of latents, got {odd}")
    outside = [int(w) for w in values if not 1 <= w <= d_sae]
    if outside:
        raise ConfigError(f"prefix widths {outside} are outside 1..{d_sae} (the SAE's "
                               f"d_sae): a prefix keeps between 1 and all of its latents")
    repeated = sorted({int(w) for w in values if values.count(w) > 1})
    if repeated:
        raise ConfigError(f"prefix widths {repeated} are given more than once")
    return tuple(sorted(int(w) for w in values))


def check_order(order: str | Sequence[int] | np.ndarray, d_sae: int) -> np.ndarray | None:
    """The latent order as a permutation array; None for ``"frequency"`` (it needs the data).

    Refuses a name not in ``ORDERS`` and an array that is not a permutation of
    ``range(d_sae)`` (wrong length, non-integers, repeated or missing latents).
    """
    if isinstance(order, str):
        if order not in ORDERS:
            raise ConfigError(f"latent order {order!r} is not one of {', '.join(ORDERS)} "
                                   "(or a permutation of the latents)")
        return np.arange(d_sae) if order == "stored" else None
    perm = np.asarray(order)
    if perm.ndim != 1 or perm.size != d_sae:
        raise ConfigError(f"a latent order must list all {d_sae} latents once, got shape "
                               f"{perm.shape}")
    if perm.dtype == np.bool_ or not np.issubdtype(perm.dtype, np.integer):
        raise ConfigError(f"a latent order must hold latent indices (integers), got "
                               f"{perm.dtype}")
    seen = np.bincount(perm[(perm >= 0) & (perm < d_sae)], minlength=d_sae)
    if not (seen == 1).all():
        missing = np.flatnonzero(seen == 0)[:8].tolist()
        raise ConfigError(f"a latent order must be a permutation of 0..{d_sae - 1}: "
                               f"latents {missing} are missing (others repeated or out of range)")
    return perm.astype(np.int64)


def firing_order(
    store: ActivationStore,
    sae: SAE,
    rows: np.ndarray,
    cfg: DecomposeConfig = DecomposeConfig(),
    *,
    hook: str | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Latents by descending firing count on ``rows`` (ties: lower index first), as ``"frequency"``
    orders them. Under torchrun each rank counts a share of the rows."""
    hook = hook or next(iter(store.hooks))
    dtype = check_sae("sae", sae, store, hook)
    device = resolve_device(cfg.device)
    sae = sae.to(device) if isinstance(sae, torch.nn.Module) else sae
    counts = torch.zeros(sae.d_sae, dtype=torch.int64, device=device)
    mine = rows[distributed.share(rows.size)]
    with torch.inference_mode():
        for r, x in store.iter_chunks(hook, mine, chunk_size(cfg, 1, store.d(hook))):
            require_finite(x, r, store, hook)
            x = x.to(device)
            for block in x.split(latent_rows(sae.d_sae)):
                counts += encode_latents(sae, block if dtype is None else block.to(dtype)).counts()
    total = distributed.summed(counts).cpu().numpy()
    return np.argsort(-total, kind="stable")


class PrefixErrors:
    """A chunk's ``(name, x̂, e = x − x̂, L0)`` of each prefix of one SAE (``prefix_name``):
    the SAE encodes each block of rows once, then every prefix decodes its restriction.

    ``widths`` maps the names to their widths, in the order they are yielded. The SAE runs in
    ``dtype`` on ``device`` (as ``SAEErrors``); NaN or inf in a reconstruction raise
    ``NonFiniteError`` naming the tokens. The full width decodes the latents as they are, so
    its ``x̂`` is ``SAEErrors``' bit for bit.
    """

    def __init__(self, sae: SAE, dtype: torch.dtype | None, order: np.ndarray,
                 widths: Sequence[int], hook: str, device: torch.device) -> None:
        self.sae = sae.to(device) if isinstance(sae, torch.nn.Module) else sae
        self.dtype, self.hook = dtype, hook
        self.widths = {prefix_name(m): m for m in widths}
        position = torch.empty(sae.d_sae, dtype=torch.int64)
        position[torch.from_numpy(np.asarray(order, dtype=np.int64))] = torch.arange(sae.d_sae)
        self.keep = {name: None if m == sae.d_sae else (position < m).to(device)
                     for name, m in self.widths.items()}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, locate: Locate) -> Iterator[Errors]:
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.widths}
        l0: dict[str, list[torch.Tensor]] = {name: [] for name in self.widths}
        with torch.inference_mode():
            for block in x.split(latent_rows(self.sae.d_sae)):
                latents = encode_latents(self.sae, block if self.dtype is None
                                         else block.to(self.dtype))
                for name, keep in self.keep.items():
                    kept = latents if keep is None else latents.restricted(keep)
                    parts[name].append(decode_latents(self.sae, kept).to(x.dtype))
                    l0[name].append(kept.l0())
        for name in self.widths:
            x_hat = torch.cat(parts[name])
            require_finite_at(x_hat, locate, what=f"reconstructions of the SAE's {name} at hook "
                              f"{self.hook!r}", advice="the activations there are finite, so "
                              "the SAE's weights hold NaN/inf or its arithmetic overflowed")
            yield name, x_hat, x - x_hat, torch.cat(l0[name])

