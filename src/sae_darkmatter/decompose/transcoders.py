"""The store driver for transcoders: decompose ``e = y − ŷ`` into what ``x`` predicts linearly.

A transcoder reads ``x`` at ``hook_in`` (e.g. ``mlp_in.L``) and predicts ``y`` at ``hook_out``
(``mlp_out.L``). Its dark matter is decomposed as an SAE's (``from_store.decompose_rows``, the
same two passes, probe system and metrics), with two changes: the probe ``ê = [x, 1]·W`` reads
the input ``x`` while the error is ``y``'s, and every FVU is relative to ``y``'s variance (the
target, not ``x``). A store row is one token, so row ``i`` of both hooks pairs ``x`` with its
``y``.

A skip transcoder (``ŷ = decode(encode(x)) + x·W_skipᵀ``) is decomposed twice in the same
passes and probe system: as it is, and without its skip term. ``Decomposition.skip``
(``SkipAccount``) then says how much linear dark matter the skip term absorbs; the nonlinear
part is the same both ways, since the skip term is linear in ``x``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from sae_darkmatter._io import resolve_device
from sae_darkmatter.config import DecomposeConfig
from sae_darkmatter.decompose.checks import Locate, require_finite_at, sae_compute_dtype
from sae_darkmatter.decompose.core import N_BOOT
from sae_darkmatter.decompose.from_store import Errors, decompose_rows
from sae_darkmatter.decompose.results import DecompositionOutput, SkipAccount
from sae_darkmatter.errors import HookError, ShapeMismatchError
from sae_darkmatter.saes import latent_rows
from sae_darkmatter.saes.latents import encode_decode
from sae_darkmatter.saes.transcoder import Transcoder
from sae_darkmatter.splits import Splits
from sae_darkmatter.store import ActivationStore

WITHOUT_SKIP = "#without_skip"  # suffix of a skip transcoder's skip-less twin inside one call


def decompose_transcoders(
    store: ActivationStore,
    transcoders: Mapping[str, Transcoder],
    splits: Splits,
    cfg: DecomposeConfig = DecomposeConfig(),
    *,
    hook_in: str,
    hook_out: str,
    progress: bool = True,
) -> dict[str, DecompositionOutput]:
    """Decompose the errors of transcoders from ``hook_in`` to ``hook_out`` on ``store``.

    Probes are fit on ``splits.probe_train`` and scored on ``splits.probe_test``, sharing the
    reads and one factored XᵀX, as ``decompose_many`` does for SAEs; a skip transcoder's
    metrics carry ``skip`` (``SkipAccount``). Transcoders that do not fit the stored hooks are
    refused before any work.
    """
    dtypes = {name: check_transcoder(name, tc, store, hook_in, hook_out)
              for name, tc in transcoders.items()}
    errors = TranscoderErrors(transcoders, dtypes, hook_out, resolve_device(cfg.device))
    outputs = decompose_rows(store, errors, errors.widths(), splits, cfg,
                             hook=hook_in, hook_out=hook_out, progress=progress,
                             what=f"{len(transcoders)} transcoder(s)")
    return {name: _with_skip_account(outputs[name], outputs.get(name + WITHOUT_SKIP))
            for name in transcoders}


def check_transcoder(
    name: str, tc: Transcoder, store: ActivationStore, hook_in: str, hook_out: str
) -> torch.dtype | None:
    """Refuse a transcoder whose hooks the store lacks or whose widths do not fit them; return
    its compute dtype (``sae_compute_dtype``)."""
    missing = [h for h in dict.fromkeys((hook_in, hook_out)) if h not in store.hooks]
    if missing:
        raise HookError(
            f"transcoder {name!r} reads {hook_in!r} and predicts {hook_out!r}, but the store at "
            f"{store.path} lacks {', '.join(map(repr, missing))} (stored: "
            f"{', '.join(store.hooks)}); harvest both: darkmatter harvest --hook {hook_in} "
            f"--hook {hook_out}"
        )
    for side, width, hook in (("d_in", tc.d_in, hook_in), ("d_out", tc.d_out, hook_out)):
        if width != store.d(hook):
            raise ShapeMismatchError(
                f"transcoder {name!r} has {side} {width} but the store's {hook!r} activations "
                f"have width {store.d(hook)} ({store.path}); use a transcoder of these hooks"
            )
    return sae_compute_dtype(name, tc, hook_in)


class TranscoderErrors:
    """A chunk's ``(name, ŷ, e = y − ŷ, L0)`` of several transcoders of one pair of hooks,
    plus ``name + WITHOUT_SKIP`` (``ŷ`` without the skip term) after each skip transcoder.

    Each runs in its ``sae_compute_dtype`` on ``device``, ``latent_rows`` inputs at a time (as
    ``SAEErrors``); NaN or inf in an output raise ``NonFiniteError`` naming the tokens.
    """

    def __init__(self, transcoders: Mapping[str, Transcoder],
                 dtypes: Mapping[str, torch.dtype | None], hook_out: str,
                 device: torch.device) -> None:
        self.transcoders = {n: tc.to(device) for n, tc in transcoders.items()}
        self.dtypes = dict(dtypes)
        self.hook_out = hook_out

    def widths(self) -> dict[str, int]:
        """``d_sae`` of every result name, in the order ``__call__`` yields them."""
        out = {}
        for name, tc in self.transcoders.items():
            out[name] = tc.d_sae
            if tc.has_skip:
                out[name + WITHOUT_SKIP] = tc.d_sae
        return out

    def __call__(self, x: torch.Tensor, y: torch.Tensor, locate: Locate) -> Iterator[Errors]:
        for name, tc in self.transcoders.items():
            sparse, full, l0 = self._outputs(name, x, locate)
            yield name, full, y - full, l0
            if tc.has_skip:
                yield name + WITHOUT_SKIP, sparse, y - sparse, l0

    def _outputs(
        self, name: str, x: torch.Tensor, locate: Locate
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the sparse part, the full ``ŷ``, L0) of rows ``x``, in ``x``'s dtype."""
        tc, dtype = self.transcoders[name], self.dtypes[name]
        sparse, full, l0 = [], [], []
        with torch.inference_mode():
            for block in x.split(latent_rows(tc.d_sae)):
                block = block if dtype is None else block.to(dtype)
                part, latents = encode_decode(tc.sparse, block)
                sparse.append(part.to(x.dtype))
                full.append((part + tc.skip(block)).to(x.dtype) if tc.has_skip else sparse[-1])
                l0.append(latents.l0())
        y_hat = torch.cat(full)
        require_finite_at(y_hat, locate, what=f"transcoder {name!r} outputs at {self.hook_out!r}",
                          advice="the activations there are finite, so the transcoder's weights "
                                 "hold NaN/inf or its arithmetic overflowed")
        return torch.cat(sparse), y_hat, torch.cat(l0)


def _with_skip_account(
    full: DecompositionOutput, without: DecompositionOutput | None
) -> DecompositionOutput:
    """``full`` with ``metrics.skip`` filled from its skip-less twin (None: no skip term)."""
    if without is None:
        return full
    m, w = full.metrics, without.metrics
    absorbed = w.fvu_linear - m.fvu_linear
    share = absorbed / w.fvu_linear if w.fvu_linear != 0 else float("nan")
    account = SkipAccount(w, absorbed, share, {"fvu_absorbed": _absorbed_interval(
        full.tokens, without.tokens)})
    return dataclasses.replace(full, metrics=dataclasses.replace(m, skip=account))


def _absorbed_interval(
    full: Mapping[str, np.ndarray], without: Mapping[str, np.ndarray], *, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of ``fvu_absorbed`` over the held-out tokens: the
    pooled ratio Σ(linear error without − with) / Σ‖y − ȳ‖², tokens resampled (as
    ``bootstrap_intervals``)."""
    def linear(t: Mapping[str, np.ndarray]) -> np.ndarray:
        return t["err_sq"].astype(np.float64) - t["nonlinear_sq"].astype(np.float64)

    gain, total = linear(without) - linear(full), full["x_centered_sq"].astype(np.float64)
    n = gain.size
    if n < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(N_BOOT):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        draws.append(float((w @ gain) / (w @ total)))
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))
