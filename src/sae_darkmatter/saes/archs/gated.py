"""``gated``: Gated SAEs (Rajamanoharan et al. 2024), loaded from SAELens and
dictionary_learning folders; not trained here (no ``Architecture`` record)."""

from __future__ import annotations

import torch
from torch import nn

from sae_darkmatter.saes.topk import AffineSAE


class GatedSAE(AffineSAE):
    """SAELens architecture ``"gated"``.

    ``b_enc`` is the gate bias (SAELens's ``b_gate``): with ``u = x - b_dec``,
    ``z = 1[u @ W_enc + b_enc > 0] * relu(u @ (W_enc * exp(r_mag)) + b_mag)``.
    """

    saelens_architecture = "gated"
    extra_tensors = ("r_mag", "b_mag")
    saelens_names = {"b_enc": "b_gate"}

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        d_out: int | None = None,
        apply_b_dec_to_input: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(d_in, d_sae, d_out=d_out, apply_b_dec_to_input=apply_b_dec_to_input,
                         generator=generator)
        self.r_mag = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder_input(x)
        gate = (x @ self.W_enc + self.b_enc > 0).to(x.dtype)
        return gate * (x @ (self.W_enc * self.r_mag.exp()) + self.b_mag).relu()
