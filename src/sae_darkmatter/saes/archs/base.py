"""What every SAE architecture module provides: a training SAE and an ``Architecture`` record.

Training SAEs train on inputs scaled to ``E||x|| = sqrt(d_in)`` (SAELens's
``expected_average_only_in`` units, so L1/L0 coefficients mean what they mean there);
``export`` folds the scale into the weights of an inference SAE that takes raw activations. The
encoder pre-activations are one dense GEMM; everything after it touches only the selected (or
active) latents (``train_kernels``) unless a batch is too dense for that to pay.

Shapes: the encoder is held as ``W_enc_t = W_enc.T`` (``[width, d_in]``, one row per latent) so
the sparse kernels gather rows and Adam gets contiguous gradients (~4x faster optimizer step).

A training SAE becomes a training transcoder when built with ``transcoder=True``: it reads ``x``
and predicts another hook's ``y`` (``b_dec`` is the ``[d_out]`` output bias and is not subtracted
from the input, as in SAELens's transcoders), and with ``skip=True`` it adds the dense term
``x @ W_skip.T`` (zeros at the start, as SAELens initialises it); ``export`` gives the sparse part
of the inference transcoder and the trainer adds the skip term (``saes.train``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sae_darkmatter.config import SAETrainConfig
from sae_darkmatter.saes.topk import AffineSAE
from sae_darkmatter.saes.train_kernels import (
    Codes,
    dense_pre,
    gather_pre,
    sparse_decode,
)


@dataclass(frozen=True)
class Architecture:
    """One trainable SAE architecture, as the trainer, the cache and the SAE folders see it.

    ``name`` is ``SAETrainConfig.architecture``; ``trainer`` the training SAE (loss, step
    constraints, export); ``sae_class`` the inference class it exports to, which says how the
    SAE is saved and loaded (its ``saelens_architecture`` is the name in ``cfg.json``).
    ``sparsity_field`` is the ``SAETrainConfig`` field of the grid's sparsity axis,
    ``sparsity_name`` its name in ``training.json`` and ``folder_tag`` in folder names.
    ``algorithm`` is part of the cache fingerprint: bump it when the training math changes.
    ``base_lr`` is the learning rate at width 2**14 (``train.default_lr``). ``options(cfg,
    width)`` are the trainer's own keyword arguments from the config (they enter the
    fingerprint too).
    """

    name: str
    trainer: type[TrainingSAE]
    sae_class: type[AffineSAE]
    sparsity_field: str
    sparsity_name: str
    folder_tag: str
    algorithm: str
    base_lr: float
    options: Callable[[SAETrainConfig, int], dict[str, Any]] = lambda cfg, width: {}

    @property
    def counts_latents(self) -> bool:
        """Whether the sparsity value is k, a whole number of latents below the width."""
        return self.sparsity_name == "k"


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

    unit_norm_decoder: ClassVar[bool] = True
    max_grad_norm: ClassVar[float | None] = None
    decoder_init_norm: ClassVar[float] = 1.0
    dense_above = 1 / 8  # selected fraction above which dense products win (~15 % at W=4096)

    W_skip: nn.Parameter | None

    def __init__(self, d_in: int, width: int, sparsity: float, *, b_dec: torch.Tensor,
                 seed: int, transcoder: bool = False, skip: bool = False) -> None:
        """``b_dec`` is the initial output bias (its length is ``d_out``); an SAE's encoder
        starts as its decoder's transpose, a transcoder's (``d_out`` may differ) as its own
        random unit rows."""
        super().__init__()
        if skip and not transcoder:
            raise ValueError("skip=True needs transcoder=True")
        d_out = b_dec.shape[0]
        if not transcoder and d_out != d_in:
            raise ValueError(f"an SAE's b_dec must have d_in = {d_in} entries, got {d_out}")
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(width, d_out, generator=gen)
        w_dec *= self.decoder_init_norm / w_dec.norm(dim=1, keepdim=True)
        w_enc = w_dec.clone() if not transcoder else torch.randn(width, d_in, generator=gen)
        if transcoder:
            w_enc /= w_enc.norm(dim=1, keepdim=True)
        self.W_enc_t = nn.Parameter(w_enc)  # W_enc.T: one row per latent (kernels)
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(b_dec.detach().clone().float())
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in)) if skip else None
        self.sparsity = sparsity
        self.transcoder = transcoder

    @property
    def width(self) -> int:
        return self.W_dec.shape[0]

    @property
    def d_in(self) -> int:
        return self.W_enc_t.shape[1]

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

    def forward(self, xb: torch.Tensor, yb: torch.Tensor | None = None) -> Forward:
        """``xb`` through the SAE; the residual is against ``yb`` (a transcoder's target), else
        against ``xb``."""
        xc = xb if self.transcoder else xb - self.b_dec
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
        y_hat = x_hat + self.b_dec
        if self.W_skip is not None:
            y_hat = y_hat + xb @ self.W_skip.T
        return Forward(xc, pre, codes, values, penalty,
                       (xb if yb is None else yb) - y_hat)

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
            assert g is not None  # called after backward
            g -= (g * w).sum(1, keepdim=True) * w
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.parameters(), self.max_grad_norm)

    @torch.no_grad()
    def after_step(self, fw: Forward) -> None:
        """Re-impose constraints and update running estimates after the optimizer step."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    def export(self, scale: float, out_scale: float | None = None) -> AffineSAE:
        """The inference SAE for raw inputs: it was trained on ``scale * x`` (and, for a
        transcoder, to predict ``out_scale * y``: the skip term is exported by the trainer)."""
        raise NotImplementedError

    def _shell(self, cls: type[AffineSAE], *args: Any) -> AffineSAE:
        """An untrained inference ``cls`` of this SAE's shapes (``args`` after ``d_sae``)."""
        return cls(self.d_in, self.width, *args, d_out=self.W_dec.shape[1],
                   apply_b_dec_to_input=not self.transcoder)

    def _fill(self, sae: AffineSAE, scale: float, out_scale: float | None,
              **extra: torch.Tensor) -> AffineSAE:
        out = scale if out_scale is None else out_scale
        with torch.no_grad():
            sae.load_state_dict({"W_enc": self.W_enc_t.T * scale, "b_enc": self.b_enc,
                                 "W_dec": self.W_dec / out, "b_dec": self.b_dec / out,
                                 **extra})
        return sae

    def summary(self) -> dict[str, Any]:
        """Architecture-specific values for training.json."""
        return {}

    def saelens_metadata(self) -> dict[str, Any]:
        """Entries for the saved ``cfg.json``'s ``metadata`` (what SAELens records there)."""
        return {}


def total_variance(y: torch.Tensor) -> torch.Tensor:
    """``sum ||y - mean(y)||^2`` over the batch (kept above 0 for constant batches)."""
    return (y - y.mean(0)).pow(2).sum().clamp_min(torch.finfo(y.dtype).tiny)


def warmup(progress: float, fraction: float) -> float:
    """Linear warm-up factor: 0 at the start, 1 from ``fraction`` of the steps on."""
    return min(1.0, progress / fraction)


def penalized_loss(fw: Forward, coef: float) -> torch.Tensor:
    """``(||x - x_hat||^2 + coef * penalty)`` per token, SAELens's L1 / L0 objective."""
    assert fw.penalty is not None
    return (fw.residual.pow(2).sum() + coef * fw.penalty) / fw.residual.shape[0]
