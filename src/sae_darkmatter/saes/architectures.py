"""Inference-only SAE architectures besides TopK, as SAELens defines them.

Only what is needed to load pretrained SAEs and compute reconstructions: all share
``AffineSAE``'s parameters (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``) and maps.
"""

from __future__ import annotations

import torch
from torch import nn

from sae_darkmatter.saes.topk import AffineSAE


class ReLUSAE(AffineSAE):
    """SAELens architecture ``"standard"``: ``z = relu(pre)``."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_activations(x).relu()


class JumpReLUSAE(AffineSAE):
    """SAELens architecture ``"jumprelu"``: ``z = relu(pre) * (pre > threshold)``.

    The threshold is per latent (``[d_sae]``), as in Gemma Scope; a BatchTopK SAE's single
    inference threshold is the same value repeated.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        apply_b_dec_to_input: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            d_in, d_sae, apply_b_dec_to_input=apply_b_dec_to_input, generator=generator
        )
        self.threshold = nn.Parameter(torch.zeros(d_sae))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold).to(pre.dtype)


class GatedSAE(AffineSAE):
    """SAELens architecture ``"gated"`` (Rajamanoharan et al. 2024).

    ``b_enc`` is the gate bias (SAELens's ``b_gate``): with ``u = x - b_dec``,
    ``z = 1[u @ W_enc + b_enc > 0] * relu(u @ (W_enc * exp(r_mag)) + b_mag)``.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        apply_b_dec_to_input: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            d_in, d_sae, apply_b_dec_to_input=apply_b_dec_to_input, generator=generator
        )
        self.r_mag = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder_input(x)
        gate = (x @ self.W_enc + self.b_enc > 0).to(x.dtype)
        return gate * (x @ (self.W_enc * self.r_mag.exp()) + self.b_mag).relu()
