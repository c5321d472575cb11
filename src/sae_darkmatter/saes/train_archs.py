"""Training-time SAEs, one class per architecture: parameters, loss, constraints, export.

All train on inputs scaled to ``E||x|| = sqrt(d_in)`` (SAELens's ``expected_average_only_in``
units, so L1/L0 coefficients mean what they mean there); ``export`` folds the scale into the
weights of an inference SAE (``TopKSAE`` / ``JumpReLUSAE`` / ``ReLUSAE``) that takes raw
activations. The encoder pre-activations are one dense GEMM; everything after it touches only
the selected (or active) latents (``train_kernels``) unless a batch is too dense for that to pay.

- ``topk``: OpenAI TopK (Gao et al. 2024) as sparsify trains it: FVU + AuxK (1/32) on latents
  dead for ``dead_after`` tokens, unit-norm decoder (gradient parallel to rows removed).
- ``batchtopk``: Bussmann et al. 2024 / SAELens ``batchtopk``: the top ``k * n`` of ``relu(pre)``
  over the whole batch, loss, AuxK and decoder as TopK. The inference threshold is estimated as
  SAELens does, an EMA of each batch's smallest selected activation, but with rate 0.05 instead
  of 0.01 and bias-corrected as Adam does (our runs are ~10^2 steps, SAELens's ~10^4+). On
  SmolLM2 (k = 32, ~75-100 steps) the saved SAE's held-out L0 was 24.5 at rate 0.01 (W=2048),
  29 at 0.05 (W=1024). Saved as a JumpReLU SAE with that threshold for every latent.
- ``relu``: Anthropic's April 2024 update ("Training SAEs"): loss ``||x - x_hat||^2 +
  lambda * sum_i f_i ||W_dec_i||``, lambda warmed up linearly over the first 5 % of steps,
  decoder rows initialised with norm 0.1 and unconstrained, gradient norm clipped to 1, no
  resampling (dead latents are reported). The encoder sees ``x - b_dec`` (SAELens's default);
  decoder norms are folded into the encoder on export (same outputs, unit-norm rows).
- ``jumprelu``: Rajamanoharan et al. 2024 (JumpReLU SAEs; SAELens ``jumprelu``, "step" L0):
  ``f = pre * H(pre - theta)``, loss ``||x - x_hat||^2 + lambda * ||f||_0``; straight-through
  estimators with a rectangle kernel of bandwidth ``JUMPRELU_BANDWIDTH`` give the thresholds
  (and only them) the L0 gradient. Lambda warms up over the first 10 % of steps; unit-norm
  decoder (Gemma Scope); thresholds kept >= 0 (SAELens); gradient norm clipped to 1. The
  thresholds learn 10x faster than the weights: Adam moves a parameter by ~lr per step, and in
  ~100 steps at our lr they could not travel from 0.01 to the ~1 they need (L0 stayed at
  ~120 for every lambda from 0.3 to 3); with 10x, lambda 0.3 / 1 / 3 gave L0 64 / 17 / 6 and
  held-out FVU 0.176 / 0.254 / 0.318 (TopK k = 64 / 16: 0.186 / 0.252; W=1024, 300k tokens).
  No dead-latent loss: < 4 % of latents died in those runs.

Shapes: the encoder is held as ``W_enc_t = W_enc.T`` (``[width, d_in]``, one row per latent) so
the sparse kernels gather rows and Adam gets contiguous gradients (~4x faster optimizer step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sae_darkmatter.saes.architectures import JumpReLUSAE, ReLUSAE
from sae_darkmatter.saes.topk import AffineSAE, TopKSAE
from sae_darkmatter.saes.train_kernels import (
    Codes,
    dense_pre,
    gather_pre,
    sparse_decode,
)

AUXK_COEF = 1.0 / 32.0
THRESHOLD_EMA = 0.05  # SAELens's topk_threshold_lr is 0.01, for runs 100x longer than ours
RELU_DECODER_INIT_NORM = 0.1
RELU_WARMUP = 0.05
JUMPRELU_BANDWIDTH = 0.05  # SAELens's default, in the same input units
JUMPRELU_INIT_THRESHOLD = 0.01
JUMPRELU_WARMUP = 0.1
JUMPRELU_THRESHOLD_LR_SCALE = 10.0


@dataclass
class Forward:
    """One batch through a training SAE (tensors on the training graph where they need to be)."""

    xc: torch.Tensor  # encoder input (x - b_dec)
    pre: torch.Tensor  # dense pre-activations, no autograd
    codes: Codes | None  # selected latents; None: the dense path was taken
    values: torch.Tensor  # latent values: [nnz] with codes, else [n, width]
    penalty: torch.Tensor | None  # sparsity penalty summed over the batch
    residual: torch.Tensor  # x - x_hat

    def active(self) -> torch.Tensor:
        return self.values.detach() > 0

    def fired(self, width: int) -> torch.Tensor:
        """Boolean ``[width]``: latents with a positive value in this batch."""
        if self.codes is None:
            return self.active().any(0)
        fired = torch.zeros(width, dtype=torch.bool, device=self.values.device)
        fired[self.codes.cols[self.active()]] = True
        return fired


class TrainingSAE(nn.Module):
    """Parameters (SAELens's, encoder held transposed) and objective of one SAE being trained."""

    architecture: ClassVar[str]
    sparsity_name: ClassVar[str]
    unit_norm_decoder: ClassVar[bool] = True
    max_grad_norm: ClassVar[float | None] = None
    decoder_init_norm: ClassVar[float] = 1.0
    dense_above = 1 / 8  # selected fraction above which dense products win (~15 % at W=4096)

    def __init__(self, d_in: int, width: int, sparsity: float, *, b_dec: torch.Tensor,
                 seed: int) -> None:
        super().__init__()
        w_dec = torch.randn(width, d_in, generator=torch.Generator().manual_seed(seed))
        w_dec *= self.decoder_init_norm / w_dec.norm(dim=1, keepdim=True)
        self.W_enc_t = nn.Parameter(w_dec.clone())  # W_enc.T: one row per latent (kernels)
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(b_dec.detach().clone().float())
        self.sparsity = sparsity

    @property
    def width(self) -> int:
        return self.W_dec.shape[0]

    def param_groups(self) -> list[dict[str, Any]]:
        """Adam parameter groups; ``lr_scale`` multiplies the scheduled learning rate."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def select(self, pre: torch.Tensor) -> Codes | None:
        """The latents the step works on, or None for the dense path."""
        raise NotImplementedError

    def activate(self, p: torch.Tensor, cols: torch.Tensor | slice) -> tuple[
            torch.Tensor, torch.Tensor | None]:
        """Latent values and summed penalty from pre-activations ``p`` of latents ``cols``."""
        return p.relu(), None

    def loss(self, fw: Forward, total_var: torch.Tensor, dead: torch.Tensor, progress: float
             ) -> torch.Tensor:
        """Training loss; ``total_var`` is the batch's ``sum ||x - mean x||^2``, ``progress``
        the fraction of steps done (coefficient warm-up), ``dead`` the dead-latent mask."""
        raise NotImplementedError

    def forward(self, xb: torch.Tensor) -> Forward:
        xc = xb - self.b_dec
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xc, self.W_enc_t.T)
        codes = self.select(pre)
        if codes is None:
            values, penalty = self.activate(dense_pre(xc, self.W_enc_t, self.b_enc, pre),
                                            slice(None))
            x_hat = values @ self.W_dec
        else:
            p = gather_pre(xc, self.W_enc_t, self.b_enc, pre, codes)
            values, penalty = self.activate(p, codes.cols)
            x_hat = sparse_decode(values, codes, self.W_dec)
        return Forward(xc, pre, codes, values, penalty, xb - (x_hat + self.b_dec))

    def _mask_codes(self, mask: torch.Tensor) -> Codes | None:
        """Codes of a mask, or None when it is too dense for the sparse kernels to pay."""
        if int(mask.sum()) > self.dense_above * mask.numel():
            return None
        return Codes.from_mask(mask)

    @torch.no_grad()
    def before_step(self) -> None:
        """Constrain gradients (called between backward and the optimizer step)."""
        if self.unit_norm_decoder:
            w, g = self.W_dec, self.W_dec.grad
            g -= (g * w).sum(1, keepdim=True) * w
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.parameters(), self.max_grad_norm)

    @torch.no_grad()
    def after_step(self, fw: Forward) -> None:
        """Re-impose constraints and update running estimates after the optimizer step."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    def export(self, scale: float) -> AffineSAE:
        """The inference SAE for raw inputs (this SAE was trained on ``scale * x``)."""
        raise NotImplementedError

    def _fill(self, sae: AffineSAE, scale: float, **extra: torch.Tensor) -> AffineSAE:
        with torch.no_grad():
            sae.load_state_dict({"W_enc": self.W_enc_t.T * scale, "b_enc": self.b_enc,
                                 "W_dec": self.W_dec / scale, "b_dec": self.b_dec / scale,
                                 **extra})
        return sae

    def summary(self) -> dict[str, Any]:
        """Architecture-specific values for training.json."""
        return {}


def total_variance(y: torch.Tensor) -> torch.Tensor:
    """``sum ||y - mean(y)||^2`` over the batch (kept above 0 for constant batches)."""
    return (y - y.mean(0)).pow(2).sum().clamp_min(torch.finfo(y.dtype).tiny)


class TopKTrainer(TrainingSAE):
    architecture = "topk"
    sparsity_name = "k"

    def select(self, pre: torch.Tensor) -> Codes | None:
        return Codes.from_topk(pre.topk(int(self.sparsity), dim=1, sorted=False).indices)

    def loss(self, fw: Forward, total_var: torch.Tensor, dead: torch.Tensor, progress: float
             ) -> torch.Tensor:
        loss = fw.residual.pow(2).sum() / total_var
        n_dead = int(dead.sum())
        if n_dead:
            loss = loss + AUXK_COEF * self._auxk_loss(fw, dead, n_dead)
        return loss

    def _auxk_loss(self, fw: Forward, dead: torch.Tensor, n_dead: int) -> torch.Tensor:
        """Normalised MSE of the residual predicted by the top ``d_in // 2`` dead latents.

        As in OpenAI's TopK paper (no ``b_dec``: the residual already excludes it), scaled down
        by ``n_dead / k_aux`` when fewer latents are dead than ``k_aux`` (sparsify).
        """
        k_aux_max = max(self.W_dec.shape[1] // 2, 1)
        k_aux = min(k_aux_max, n_dead)
        dead_ids = dead.nonzero().squeeze(1)
        idx = dead_ids[fw.pre[:, dead_ids].topk(k_aux, dim=1, sorted=False).indices]
        codes = Codes.from_topk(idx)
        values = gather_pre(fw.xc, self.W_enc_t, self.b_enc, fw.pre, codes)
        residual = fw.residual.detach()
        e_hat = sparse_decode(values, codes, self.W_dec)
        scale = min(n_dead / k_aux_max, 1.0)
        return scale * (e_hat - residual).pow(2).sum() / total_variance(residual)

    def export(self, scale: float) -> AffineSAE:
        return self._fill(TopKSAE(self.W_dec.shape[1], self.width, int(self.sparsity)), scale)


class BatchTopKTrainer(TopKTrainer):
    architecture = "batchtopk"

    def __init__(self, d_in: int, width: int, sparsity: float, *, b_dec: torch.Tensor,
                 seed: int) -> None:
        super().__init__(d_in, width, sparsity, b_dec=b_dec, seed=seed)
        self.register_buffer("threshold_ema", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def select(self, pre: torch.Tensor) -> Codes | None:
        """The ``k * n`` largest pre-activations of the batch (relu zeroes negative ones).

        Exact two-stage search: the (k n)-th largest of the rows' top ``2k`` values is a lower
        bound of the batch's (k n)-th largest, so the cut is searched among the entries above
        it only (ties at the cut are all kept). Masks keep the indices ascending without a sort
        (``torch.sort`` is erratic on busy CPUs: 5-250 ms for 131k indices).
        """
        n, width = pre.shape
        total, per_row = int(self.sparsity * n), min(2 * math.ceil(self.sparsity), width)
        row_top = pre.topk(per_row, dim=1, sorted=False).values.view(-1)
        bound = row_top.kthvalue(row_top.numel() - total + 1).values
        candidates = (pre >= bound).view(-1).nonzero().squeeze(1)
        values = pre.view(-1)[candidates]
        cut = values.kthvalue(values.numel() - total + 1).values
        return Codes.from_flat(candidates[values >= cut], width, n)

    @torch.no_grad()
    def after_step(self, fw: Forward) -> None:
        super().after_step(fw)
        active = fw.active()
        if active.any():
            smallest = fw.values.detach()[active].min().double()
            self.threshold_ema.mul_(1 - THRESHOLD_EMA).add_(THRESHOLD_EMA * smallest)
            self.threshold_updates += 1

    def threshold(self) -> float:
        """Bias-corrected EMA of the smallest selected activation per batch."""
        updates = int(self.threshold_updates)
        return float(self.threshold_ema) / (1 - (1 - THRESHOLD_EMA) ** updates) if updates else 0.0

    def export(self, scale: float) -> AffineSAE:
        sae = JumpReLUSAE(self.W_dec.shape[1], self.width)
        return self._fill(sae, scale, threshold=torch.full((self.width,), self.threshold()))

    def summary(self) -> dict[str, Any]:
        return {"threshold": self.threshold()}


def _warmup(progress: float, fraction: float) -> float:
    return min(1.0, progress / fraction)


class ReLUTrainer(TrainingSAE):
    architecture = "relu"
    sparsity_name = "l1_coefficient"
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
        assert fw.penalty is not None
        coef = self.sparsity * _warmup(progress, RELU_WARMUP)
        return (fw.residual.pow(2).sum() + coef * fw.penalty) / fw.residual.shape[0]

    def export(self, scale: float) -> AffineSAE:
        norms = self.W_dec.detach().norm(dim=1).clamp_min(1e-12)
        sae = self._fill(ReLUSAE(self.W_dec.shape[1], self.width), scale)
        with torch.no_grad():  # relu(n * a) = n * relu(a): unit-norm rows, same outputs
            sae.W_enc *= norms
            sae.b_enc *= norms
            sae.W_dec /= norms[:, None]
        return sae


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``p * H(p - theta)``; d/dtheta by the straight-through estimator ``-(theta/eps) K``."""

    @staticmethod
    def forward(p, theta, eps):  # type: ignore[override]
        return p * (p > theta).to(p.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        p, theta, ctx.eps = inputs
        ctx.save_for_backward(p, theta)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        p, theta = ctx.saved_tensors
        grad_theta = -(theta / ctx.eps) * _rectangle((p - theta) / ctx.eps) * grad
        return (p > theta).to(grad.dtype) * grad, grad_theta, None


class _Step(torch.autograd.Function):
    """``H(p - theta)``; d/dtheta by the straight-through estimator ``-(1/eps) K``, none to p."""

    @staticmethod
    def forward(p, theta, eps):  # type: ignore[override]
        return (p > theta).to(p.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        p, theta, ctx.eps = inputs
        ctx.save_for_backward(p, theta)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        p, theta = ctx.saved_tensors
        return None, -_rectangle((p - theta) / ctx.eps) * grad / ctx.eps, None


class JumpReLUTrainer(TrainingSAE):
    architecture = "jumprelu"
    sparsity_name = "l0_coefficient"
    max_grad_norm = 1.0

    def __init__(self, d_in: int, width: int, sparsity: float, *, b_dec: torch.Tensor,
                 seed: int) -> None:
        super().__init__(d_in, width, sparsity, b_dec=b_dec, seed=seed)
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
        assert fw.penalty is not None
        coef = self.sparsity * _warmup(progress, JUMPRELU_WARMUP)
        return (fw.residual.pow(2).sum() + coef * fw.penalty) / fw.residual.shape[0]

    @torch.no_grad()
    def after_step(self, fw: Forward) -> None:
        super().after_step(fw)
        self.threshold.clamp_(min=0.0)

    def export(self, scale: float) -> AffineSAE:
        return self._fill(JumpReLUSAE(self.W_dec.shape[1], self.width), scale,
                          threshold=self.threshold.detach())


TRAINERS: dict[str, type[TrainingSAE]] = {
    cls.architecture: cls for cls in (TopKTrainer, BatchTopKTrainer, ReLUTrainer, JumpReLUTrainer)
}
