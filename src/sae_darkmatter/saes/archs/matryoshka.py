"""``matryoshka_batchtopk``: BatchTopK with nested reconstruction losses (Bussmann et al. 2025,
*Learning Multi-Level Features with Matryoshka SAEs*; SAELens ``matryoshka_batchtopk``), saved
as a JumpReLU SAE whose ``cfg.json`` records its prefix widths.

Besides BatchTopK's loss, the first ``m`` latents must reconstruct the input on their own for
every inner prefix width ``m``: the loss adds the normalised squared error of the batch's
selected latents with index ``< m`` (plus ``b_dec``), one term per inner width, as SAELens adds
one inner MSE per level. The latents then order themselves from general (early) to specific,
and ``darkmatter decompose --prefixes auto`` decomposes each prefix
(``metadata.training_architecture_details.matryoshka_widths``, SAELens's key).
"""

from __future__ import annotations

from typing import Any

import torch

from sae_darkmatter.config import SAETrainConfig
from sae_darkmatter.saes.archs.base import Architecture, Forward
from sae_darkmatter.saes.archs.batchtopk import BatchTopKTrainer
from sae_darkmatter.saes.archs.jumprelu import JumpReLUSAE
from sae_darkmatter.saes.train_kernels import sparse_decode


def prefix_widths(width: int, fractions: tuple[float, ...]) -> tuple[int, ...]:
    """The inner prefix widths of a ``width``-latent SAE: ``fractions`` of it, rounded, kept
    between 1 and ``width - 1``, ascending and distinct."""
    return tuple(sorted({min(max(round(f * width), 1), width - 1) for f in fractions}
                        - {width}))


class MatryoshkaTrainer(BatchTopKTrainer):
    def __init__(self, d_in: int, width: int, sparsity: float, *, b_dec: torch.Tensor,
                 seed: int, transcoder: bool = False, skip: bool = False,
                 prefixes: tuple[int, ...] = ()) -> None:
        super().__init__(d_in, width, sparsity, b_dec=b_dec, seed=seed, transcoder=transcoder,
                         skip=skip)
        if any(not 0 < m < width for m in prefixes) or list(prefixes) != sorted(set(prefixes)):
            raise ValueError(f"prefix widths must ascend strictly within (0, {width}), got "
                             f"{list(prefixes)}")
        self.prefixes = tuple(prefixes)

    def loss(self, fw: Forward, total_var: torch.Tensor, dead: torch.Tensor, progress: float
             ) -> torch.Tensor:
        loss = super().loss(fw, total_var, dead, progress)
        assert fw.codes is not None  # batchtopk always selects
        for m in self.prefixes:
            # target - prefix reconstruction = the full residual + the latents from m on
            beyond = fw.values * (fw.codes.cols >= m).to(fw.values.dtype)
            inner = fw.residual + sparse_decode(beyond, fw.codes, self.W_dec)
            loss = loss + inner.pow(2).sum() / total_var
        return loss

    def saelens_metadata(self) -> dict[str, Any]:
        return {"training_architecture_details": {
            "matryoshka_widths": [*self.prefixes, self.width]}}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "matryoshka_widths": [*self.prefixes, self.width]}


def _options(cfg: SAETrainConfig, width: int) -> dict[str, Any]:
    return {"prefixes": prefix_widths(width, cfg.matryoshka_fractions)}


ARCHITECTURE = Architecture(
    name="matryoshka_batchtopk", trainer=MatryoshkaTrainer, sae_class=JumpReLUSAE,
    sparsity_field="ks", sparsity_name="k", folder_tag="k", algorithm="matryoshka-batchtopk-v1",
    base_lr=1.6e-3, options=_options,
)
