"""Sparse autoencoders: the protocol the analyses use, TopK training, SAELens-format I/O."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from sae_darkmatter.saes.architectures import GatedSAE, JumpReLUSAE, ReLUSAE
from sae_darkmatter.saes.io import load_sae, load_sae_config, save_sae
from sae_darkmatter.saes.topk import AffineSAE, TopKSAE, latent_rows
from sae_darkmatter.saes.train import default_lr, sae_folder_name, train_grid, train_sae


@runtime_checkable
class SAE(Protocol):
    """What the error decomposition needs from any SAE: ``[n, d_in] <-> [n, d_sae]`` maps."""

    @property
    def d_in(self) -> int: ...

    @property
    def d_sae(self) -> int: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``[n, d_sae]``."""
        ...

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[n, d_in]`` from dense latents."""
        ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``x_hat``; the SAE error is ``x - x_hat``."""
        ...


__all__ = [
    "SAE",
    "AffineSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "TopKSAE",
    "default_lr",
    "latent_rows",
    "load_sae",
    "load_sae_config",
    "sae_folder_name",
    "save_sae",
    "train_grid",
    "train_sae",
]
