"""Held-out fit scores: ``R2Accumulator`` (streaming SSE and SST in float64), ``fvu`` and
``r2_score`` (R² of in-memory arrays)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae_darkmatter.errors import ShapeMismatchError
from sae_darkmatter.linalg.numerics import (
    F64,
    PREDICT_ROWS,
    as_2d,
    check_finite,
    reference_row,
    shift_from_state,
    shift_or_nan,
)


class R2Accumulator:
    """Streaming held-out scores of a prediction ŷ of Y [n, d]: per-dimension SSE and SST.

    SST is centred on the mean of the rows seen (the held-out mean, as in the paper). It is
    computed from sums about a reference row (the median of the first chunk), so it is stable
    (no Σy² − nȳ² cancellation) and a constant dimension has SST exactly 0. Such dimensions get
    NaN in ``r2_per_dim`` and are left out of ``r2_mean_dim``.
    """

    ADDITIVE_KEYS = ("n", "sse", "sum_dy", "sum_dy2")

    def __init__(
        self, d: int, *, device: str | torch.device = "cpu", shift: Tensor | None = None
    ) -> None:
        if d < 1:
            raise ValueError(f"d must be positive, got {d}")
        self.d = d
        self.device = torch.device(device)
        z: dict[str, Any] = dict(dtype=F64, device=self.device)
        self._n = torch.zeros((), dtype=torch.int64, device=self.device)
        self.sse_dim = torch.zeros(d, **z)
        self.sum_dy = torch.zeros(d, **z)
        self.sum_dy2 = torch.zeros(d, **z)
        self.shift = None if shift is None else as_2d(shift.reshape(1, -1), d, "shift")[0].to(**z)

    @property
    def n(self) -> int:
        return int(self._n)

    def update(self, y: Tensor, y_hat: Tensor) -> None:
        """Add rows of targets ``y`` and predictions ``y_hat`` [n, d] (summed in float64 blocks)."""
        y = as_2d(y, self.d, "y").to(self.device)
        y_hat = as_2d(y_hat, self.d, "y_hat").to(self.device)
        if y.shape[0] != y_hat.shape[0]:
            raise ShapeMismatchError(f"y has {y.shape[0]} rows but y_hat has {y_hat.shape[0]}")
        if y.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = reference_row(y)
        sums = torch.zeros(3, self.d, dtype=F64, device=self.device)
        for i in range(0, y.shape[0], PREDICT_ROWS):
            block = y[i : i + PREDICT_ROWS].to(F64, copy=True)
            sums[0] += (block - y_hat[i : i + PREDICT_ROWS].to(F64)).square_().sum(0)
            block -= self.shift
            sums[1] += block.sum(0)
            sums[2] += block.square_().sum(0)
        check_finite("R2Accumulator.update", sums, y=y, y_hat=y_hat)
        self.sse_dim += sums[0]
        self.sum_dy += sums[1]
        self.sum_dy2 += sums[2]
        self._n += y.shape[0]

    def merge(self, other: R2Accumulator) -> None:
        """Add another accumulator's rows (exact; references may differ)."""
        if other.d != self.d:
            raise ShapeMismatchError(f"cannot merge d={other.d} into d={self.d}")
        if other.n == 0:
            return
        o = {k: v.to(self.device) for k, v in other.state_dict().items()}
        if self.shift is None:
            self.shift = o["shift"]
        # y − a = (y − b) + delta about our reference a, from sums about theirs b.
        delta, n = o["shift"] - self.shift, o["n"].to(F64)
        self.sse_dim += o["sse"]
        self.sum_dy += o["sum_dy"] + n * delta
        self.sum_dy2 += o["sum_dy2"] + 2 * delta * o["sum_dy"] + n * delta * delta
        self._n += o["n"]

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "n": self._n.clone(),
            "sse": self.sse_dim.clone(),
            "sum_dy": self.sum_dy.clone(),
            "sum_dy2": self.sum_dy2.clone(),
            "shift": shift_or_nan(self.shift, self.d, self.device),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if tuple(state["sse"].shape) != (self.d,):
            raise ShapeMismatchError(
                f"sse has shape {tuple(state['sse'].shape)}, expected ({self.d},)"
            )
        z: dict[str, Any] = dict(dtype=F64, device=self.device)
        self._n = state["n"].to(dtype=torch.int64, device=self.device).clone()
        self.sse_dim = state["sse"].to(**z).clone()
        self.sum_dy = state["sum_dy"].to(**z).clone()
        self.sum_dy2 = state["sum_dy2"].to(**z).clone()
        self.shift = shift_from_state(state["shift"], self.device)

    def sst_per_dim(self) -> Tensor:
        """Σ_t (y_tj − ȳ_j)² per dimension (clamped at 0 against rounding)."""
        if self.n == 0:
            return torch.zeros(self.d, dtype=F64, device=self.device)
        return (self.sum_dy2 - self.sum_dy * self.sum_dy / self.n).clamp_min(0.0)

    def sse(self) -> float:
        """Σ‖y − ŷ‖² over all entries."""
        return float(self.sse_dim.sum())

    def sst(self) -> float:
        """Σ‖y − ȳ‖² over all entries, ȳ the per-dimension mean of the rows seen."""
        return float(self.sst_per_dim().sum())

    def fvu(self) -> float:
        """Pooled fraction of variance unexplained, sse/sst (NaN when sst is 0)."""
        sst = self.sst()
        return self.sse() / sst if sst > 0 else math.nan

    def r2_pooled(self) -> float:
        return 1.0 - self.fvu()

    def r2_per_dim(self) -> Tensor:
        """1 − sse_j/sst_j per dimension, float64; NaN where sst_j == 0 (constant dimension)."""
        sst = self.sst_per_dim()
        r2 = 1.0 - self.sse_dim / sst
        return torch.where(sst > 0, r2, torch.full_like(r2, math.nan))

    def r2_mean_dim(self) -> float:
        """Mean per-dimension R² (the paper's vector-prediction score) over non-constant dims."""
        r2 = self.r2_per_dim()
        ok = ~torch.isnan(r2)
        return float(r2[ok].mean()) if bool(ok.any()) else math.nan


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² over all entries, in float64 (x̄ the per-dimension mean)."""
    if x.shape != x_hat.shape:
        raise ShapeMismatchError(f"x has shape {tuple(x.shape)} but x_hat {tuple(x_hat.shape)}")
    d = 1 if x.ndim == 1 else x.shape[-1]
    acc = R2Accumulator(d, device=x.device)
    acc.update(x.reshape(-1, d), x_hat.reshape(-1, d))
    return acc.fvu()


def r2_score(y: np.ndarray, y_hat: np.ndarray) -> float:
    """1 − Σ(y − ŷ)² / Σ(y − ȳ)² in float64 (ȳ the mean of these rows); NaN for constant y."""
    y, y_hat = np.asarray(y, np.float64), np.asarray(y_hat, np.float64)
    sst = float(np.square(y - y.mean()).sum())
    return 1.0 - float(np.square(y - y_hat).sum()) / sst if sst > 0 else float("nan")


def bootstrap_counts(n: int, n_boot: int, seed: Any) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``n_boot`` resamples with replacement,
    ``[n_boot, n]`` float64: ``counts @ v`` is ``v``'s resampled sums (one draw shared by every
    statistic, so differences are paired). ``seed`` seeds ``np.random.default_rng``."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]
                    ).astype(np.float64) if n else np.zeros((n_boot, 0))


def percentile_interval(draws: np.ndarray) -> list[float]:
    """The 95 % percentile interval of bootstrap draws (NaN draws left out)."""
    return [float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))]

