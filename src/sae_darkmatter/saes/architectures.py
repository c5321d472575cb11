"""Inference-only SAE architectures besides TopK, as SAELens defines them.

Only what is needed to load pretrained SAELens folders and compute reconstructions: both share
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

    The threshold is per latent (``[d_sae]``), as in Gemma Scope.
    """

    def __init__(self, d_in: int, d_sae: int, *, apply_b_dec_to_input: bool = True) -> None:
        super().__init__(d_in, d_sae, apply_b_dec_to_input=apply_b_dec_to_input)
        self.threshold = nn.Parameter(torch.zeros(d_sae))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold).to(pre.dtype)
