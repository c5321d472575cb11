"""Run any SAE over rows and keep its latents in the cheapest exact form.

A TopK SAE's latents are its k selected values per row: decoding them with ``embedding_bag``
skips the dense ``[n, d_sae]`` latents and the dense decoder product, which for the grid's
SAEs cost as much as the encoder itself. Other SAEs keep dense latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sae_darkmatter.saes.topk import TopKSAE

if TYPE_CHECKING:
    from sae_darkmatter.saes import SAE


@dataclass(frozen=True)
class Latents:
    """An SAE's latents of ``n`` rows: ``values [n, m]`` of latents ``indices [n, m]`` (TopK:
    the k selected, m = k), or dense ``values [n, d_sae]`` when ``indices`` is None."""

    values: torch.Tensor
    indices: torch.Tensor | None
    d_sae: int

    def l0(self) -> torch.Tensor:
        """Nonzero latents per row ``[n]`` (int64)."""
        return (self.values != 0).sum(dim=1)

    def fired(self) -> torch.Tensor:
        """Boolean ``[d_sae]``: the latents nonzero in some row."""
        if self.indices is None:
            return (self.values != 0).any(0)
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=self.values.device)
        fired[self.indices[self.values != 0]] = True
        return fired

    def counts(self) -> torch.Tensor:
        """Rows in which each latent is nonzero ``[d_sae]`` (int64)."""
        if self.indices is None:
            return (self.values != 0).sum(0)
        return torch.bincount(self.indices[self.values != 0], minlength=self.d_sae)

    def restricted(self, keep: torch.Tensor) -> Latents:
        """These latents with every latent outside ``keep`` (boolean ``[d_sae]``) set to 0."""
        inside = keep if self.indices is None else keep[self.indices]
        return Latents(self.values.masked_fill(~inside, 0), self.indices, self.d_sae)


def encode_decode(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, Latents]:
    """``(x_hat, latents)`` of rows ``x [n, d_in]`` in one piece (callers bound ``n`` with
    ``latent_rows`` for dense SAEs). Equal to ``decode(encode(x))`` up to float32 summation
    order."""
    latents = encode_latents(sae, x)
    return decode_latents(sae, latents), latents


def encode_latents(sae: SAE, x: torch.Tensor) -> Latents:
    """The latents of rows ``x [n, d_in]``: a TopK SAE's k selected, other SAEs' dense."""
    if isinstance(sae, TopKSAE):
        return Latents(*sae.encode_topk(x), sae.d_sae)
    return Latents(sae.encode(x), None, sae.d_sae)


def decode_latents(sae: SAE, latents: Latents) -> torch.Tensor:
    """The reconstruction from ``encode_latents``' latents (or a restriction of them)."""
    if latents.indices is not None:
        assert isinstance(sae, TopKSAE), "sparse latents come from a TopK SAE"
        return sae.decode_topk(latents.values, latents.indices)
    return sae.decode(latents.values)
