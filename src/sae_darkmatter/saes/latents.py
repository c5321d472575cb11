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


def encode_decode(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, Latents]:
    """``(x_hat, latents)`` of rows ``x [n, d_in]`` in one piece (callers bound ``n`` with
    ``latent_rows`` for dense SAEs). Equal to ``decode(encode(x))`` up to float32 summation
    order."""
    if isinstance(sae, TopKSAE):
        values, indices = sae.encode_topk(x)
        return sae.decode_topk(values, indices), Latents(values, indices, sae.d_sae)
    z = sae.encode(x)
    return sae.decode(z), Latents(z, None, sae.d_sae)
