"""``jumprelu``: JumpReLU SAEs (Rajamanoharan et al. 2024; SAELens ``jumprelu``, "step" L0).

``f = pre * H(pre - theta)``, loss ``||x - x_hat||^2 + lambda * ||f||_0``; straight-through
estimators with a rectangle kernel of bandwidth ``JUMPRELU_BANDWIDTH`` give the thresholds (and
only them) the L0 gradient. Lambda warms up over the first 10 % of steps; unit-norm decoder
(Gemma Scope); thresholds kept >= 0 (SAELens); gradient norm clipped to 1. The thresholds learn
10x faster than the weights: Adam moves a parameter by ~lr per step, and in ~100 steps at our lr
they could not travel from 0.01 to the ~1 they need (L0 stayed at ~120 for every lambda from
0.3 to 3); with 10x, lambda 0.3 / 1 / 3 gave L0 64 / 17 / 6 and held-out FVU 0.176 / 0.254 /
0.318 (TopK k = 64 / 16: 0.186 / 0.252; W=1024, 300k tokens). No dead-latent loss: < 4 % of
latents died in those runs. Saved as SAELens ``jumprelu`` (``JumpReLUSAE``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sae_darkmatter.saes.archs.base import (
    Architecture,
    Forward,
    TrainingSAE,
    penalized_loss,
    warmup,
)
from sae_darkmatter.saes.topk import AffineSAE
from sae_darkmatter.saes.train_kernels import Codes

JUMPRELU_BANDWIDTH = 0.05  # SAELens's default, in the same input units
JUMPRELU_INIT_THRESHOLD = 0.01
JUMPRELU_WARMUP = 0.1
JUMPRELU_THRESHOLD_LR_SCALE = 10.0


class JumpReLUSAE(AffineSAE):
    """SAELens architecture ``"jumprelu"``: ``z = relu(pre) * (pre > threshold)``.

    The threshold is per latent (``[d_sae]``), as in Gemma Scope; a BatchTopK SAE's single
    inference threshold is the same value repeated.
    """

    saelens_architecture = "jumprelu"
    extra_tensors = ("threshold",)

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
        self.threshold = nn.Parameter(torch.zeros(d_sae))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold).to(pre.dtype)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``p * H(p - theta)``; d/dtheta by the straight-through estimator ``-(theta/eps) K``."""

    @staticmethod
    def forward(p, theta, eps):
        return p * (p > theta).to(p.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, theta, ctx.eps = inputs
        ctx.save_for_backward(p, theta)

    @staticmethod
    def backward(ctx, grad):
        p, theta = ctx.saved_tensors
        grad_theta = -(theta / ctx.eps) * _rectangle((p - theta) / ctx.eps) * grad
        return (p > theta).to(grad.dtype) * grad, grad_theta, None


class _Step(torch.autograd.Function):
    """``H(p - theta)``; d/dtheta by the straight-through estimator ``-(1/eps) K``, none to p."""

    @staticmethod
    def forward(p, theta, eps):
        return (p > theta).to(p.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, theta, ctx.eps = inputs
        ctx.save_for_backward(p, theta)

    @staticmethod
    def backward(ctx, grad):
        p, theta = ctx.saved_tensors
        return None, -_rectangle((p - theta) / ctx.eps) * grad / ctx.eps, None


class JumpReLUTrainer(TrainingSAE):
    max_grad_norm = 1.0

    def __init__(self, d_in: int, width: int, sparsity: float, *, b_dec: torch.Tensor,
                 seed: int, transcoder: bool = False, skip: bool = False) -> None:
        super().__init__(d_in, width, sparsity, b_dec=b_dec, seed=seed, transcoder=transcoder,
                         skip=skip)
        self.threshold = nn.Parameter(torch.full((width,), JUMPRELU_INIT_THRESHOLD))

    def param_groups(self) -> list[dict[str, Any]]:
        weights = [p for name, p in self.named_parameters() if name != "threshold"]
        return [{"params": weights, "lr_scale": 1.0},
                {"params": [self.threshold], "lr_scale": JUMPRELU_THRESHOLD_LR_SCALE}]

    def select(self, pre: torch.Tensor) -> Codes | None:
        """Latents above ``theta - eps/2``: the active ones and those the estimators reach."""
        return self._mask_codes(pre > self.threshold.detach() - JUMPRELU_BANDWIDTH / 2)

    def activate(self, p: torch.Tensor, cols: torch.Tensor | slice) -> tuple[
            torch.Tensor, torch.Tensor | None]:
        theta = self.threshold[cols].expand_as(p)
        values = _JumpReLU.apply(p, theta, JUMPRELU_BANDWIDTH)
        return values, _Step.apply(p, theta, JUMPRELU_BANDWIDTH).sum()

    def loss(self, fw: Forward, total_var: torch.Tensor, dead: torch.Tensor, progress: float
             ) -> torch.Tensor:
        return penalized_loss(fw, self.sparsity * warmup(progress, JUMPRELU_WARMUP))

    @torch.no_grad()
    def after_step(self, fw: Forward) -> None:
        super().after_step(fw)
        self.threshold.clamp_(min=0.0)

    def export(self, scale: float, out_scale: float | None = None) -> AffineSAE:
        return self._fill(self._shell(JumpReLUSAE), scale, out_scale,
                          threshold=self.threshold.detach())


ARCHITECTURE = Architecture(
    name="jumprelu", trainer=JumpReLUTrainer, sae_class=JumpReLUSAE,
    sparsity_field="l0_coefficients", sparsity_name="l0_coefficient", folder_tag="l0",
    algorithm="jumprelu-l0-v1", base_lr=1.6e-3,
)
