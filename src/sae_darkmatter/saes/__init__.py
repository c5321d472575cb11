"""Sparse autoencoders: the protocol the analyses use, SAELens-format I/O, training.

The training names (``train_sae``, ``train_grid``, ``default_lr``, ``sae_folder_name``) are
imported on first use, so code that only loads and runs SAEs never imports the trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from sae_darkmatter.saes.archs.gated import GatedSAE
from sae_darkmatter.saes.archs.jumprelu import JumpReLUSAE
from sae_darkmatter.saes.archs.relu import ReLUSAE
from sae_darkmatter.saes.io import load_sae, load_sae_config, save_sae
from sae_darkmatter.saes.topk import AffineSAE, TopKSAE, latent_rows

if TYPE_CHECKING:
    from sae_darkmatter.saes.train import default_lr, sae_folder_name, train_grid, train_sae

_TRAINING = ("default_lr", "sae_folder_name", "train_grid", "train_sae")


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)``, as ``nn.Module`` calls it."""
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


def __getattr__(name: str) -> Any:
    if name not in _TRAINING:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("sae_darkmatter.saes.train"), name)
    globals()[name] = value
    return value
