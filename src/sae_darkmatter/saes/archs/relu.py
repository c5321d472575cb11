"""``relu``: the L1-penalised ReLU SAE of Anthropic's April 2024 update ("Training SAEs").

Loss ``||x - x_hat||^2 + lambda * sum_i f_i ||W_dec_i||``, lambda warmed up linearly over the
first 5 % of steps, decoder rows initialised with norm 0.1 and unconstrained, gradient norm
clipped to 1, no resampling (dead latents are reported). The encoder sees ``x - b_dec``
(SAELens's default). Saved as SAELens ``standard`` (``ReLUSAE``), with the decoder norms
folded into the encoder (same outputs, unit-norm rows).
"""

from __future__ import annotations

import torch

from sae_darkmatter.saes.archs.base import (
    Architecture,
    Forward,
    TrainingSAE,
    penalized_loss,
    warmup,
)
from sae_darkmatter.saes.topk import AffineSAE
from sae_darkmatter.saes.train_kernels import Codes

RELU_DECODER_INIT_NORM = 0.1
RELU_WARMUP = 0.05


class ReLUSAE(AffineSAE):
    """SAELens architecture ``"standard"``: ``z = relu(pre)``."""

    saelens_architecture = "standard"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_activations(x).relu()


class ReLUTrainer(TrainingSAE):
    unit_norm_decoder = False
    max_grad_norm = 1.0
    decoder_init_norm = RELU_DECODER_INIT_NORM

    def select(self, pre: torch.Tensor) -> Codes | None:
        return self._mask_codes(pre > 0)

    def activate(self, p: torch.Tensor, cols: torch.Tensor | slice) -> tuple[
            torch.Tensor, torch.Tensor | None]:
        values = p.relu()
        return values, (values * self.W_dec.norm(dim=1)[cols]).sum()

    def loss(self, fw: Forward, total_var: torch.Tensor, dead: torch.Tensor, progress: float
             ) -> torch.Tensor:
        return penalized_loss(fw, self.sparsity * warmup(progress, RELU_WARMUP))

    def export(self, scale: float, out_scale: float | None = None) -> AffineSAE:
        norms = self.W_dec.detach().norm(dim=1).clamp_min(1e-12)
        sae = self._fill(self._shell(ReLUSAE), scale, out_scale)
        with torch.no_grad():  # relu(n * a) = n * relu(a): unit-norm rows, same outputs
            sae.W_enc.mul_(norms)
            sae.b_enc.mul_(norms)
            sae.W_dec.div_(norms[:, None])
        return sae


ARCHITECTURE = Architecture(
    name="relu", trainer=ReLUTrainer, sae_class=ReLUSAE, sparsity_field="l1_coefficients",
    sparsity_name="l1_coefficient", folder_tag="l1", algorithm="relu-l1-april2024-v1",
    base_lr=3.2e-3,
)
