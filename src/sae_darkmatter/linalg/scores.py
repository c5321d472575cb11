"""Held-out R² of many predictions of the same few targets, with jackknife intervals.

``SharedTargetR2`` takes each target's sums once per chunk and, per prediction, only its float64
per-dimension SSE (one ``R2Accumulator`` per prediction would redo the target's copies, sums and
reference row for every predictor). Rows carry a group id so that every prediction's mean
per-dimension R² gets a delete-one-group jackknife interval (``jackknife_interval``), as the
decomposition's error probe does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.linalg.numerics import F64
from sae_darkmatter.linalg.r2 import R2Accumulator


def jackknife_interval(thetas: Sequence[float], full: float) -> tuple[float, float]:
    """95 % normal-approximation interval from delete-one-group estimates ``thetas``."""
    t = np.asarray(thetas, dtype=np.float64)
    g = t.size
    se = float(np.sqrt((g - 1) / g * np.sum((t - t.mean()) ** 2)))
    return (full - 1.96 * se, full + 1.96 * se)


class SharedTargetR2:
    """Per-dimension SSE of predictions of named targets, per row group (``n_groups``)."""

    def __init__(self, d: int, device: torch.device, n_groups: int = 16) -> None:
        self.d, self.device, self.n_groups = d, device, n_groups
        self.sums: dict[str, R2Accumulator] = {}
        self.group_n: dict[str, Tensor] = {}  # target -> rows per group [G]
        self.group_sums: dict[str, Tensor] = {}  # target -> [2, G, d]: Σ(y − s), Σ(y − s)²
        self.sse: dict[tuple[str, str], tuple[str, Tensor]] = {}  # key -> (target, [G, d])
        self._y: dict[str, Tensor] = {}
        self._groups = torch.zeros(0, dtype=torch.int64)

    def targets(self, groups: Tensor, **ys: Tensor) -> None:
        """This chunk's targets by name, and each row's group in ``[0, n_groups)``."""
        self._groups = groups.to(self.device, torch.int64)
        for t, y in ys.items():
            acc = self.sums.setdefault(t, R2Accumulator(self.d, device=self.device))
            acc.update(y, y)
            y64 = y.to(self.device, F64)
            assert acc.shift is not None  # set by the update
            dy = y64 - acc.shift
            n = self.group_n.setdefault(t, torch.zeros(self.n_groups, dtype=F64,
                                                       device=self.device))
            n += torch.bincount(self._groups, minlength=self.n_groups)
            sums = self.group_sums.setdefault(
                t, torch.zeros(2, self.n_groups, self.d, dtype=F64, device=self.device))
            sums[0].index_add_(0, self._groups, dy)
            sums[1].index_add_(0, self._groups, dy.square_())
            self._y[t] = y64

    def add(self, key: tuple[str, str], target: str, pred: Tensor) -> None:
        """Add the SSE of ``pred``, a prediction of this chunk's ``target``, under ``key``."""
        sq = (self._y[target] - pred.to(self.device, F64)).square_()
        if not bool(torch.isfinite(sq).all()):
            raise DarkMatterError(f"the prediction {key} of {target} is not finite")
        sse = torch.zeros(self.n_groups, self.d, dtype=F64, device=self.device)
        sse.index_add_(0, self._groups, sq)
        self.sse[key] = (target, self.sse[key][1] + sse if key in self.sse else sse)

    def accumulator(self, key: tuple[str, str]) -> R2Accumulator:
        """All rows' scores of prediction ``key``."""
        target, sse = self.sse[key]
        acc = R2Accumulator(self.d, device=self.device)
        acc.load_state_dict({**self.sums[target].state_dict(), "sse": sse.sum(0)})
        return acc

    def r2_mean_dim_interval(self, key: tuple[str, str]) -> tuple[float, float] | None:
        """Jackknife 95 % interval of ``key``'s mean per-dimension R² (None with < 2 groups
        holding rows)."""
        target, sse = self.sse[key]
        n, (sdy, sdy2) = self.group_n[target], self.group_sums[target]
        if int((n > 0).sum()) < 2:
            return None
        thetas = []
        for g in range(self.n_groups):
            if not bool(n[g] > 0):
                continue
            keep = (n > 0) & (torch.arange(self.n_groups, device=n.device) != g)
            rows = n[keep].sum()
            a, b = sdy[keep].sum(0), sdy2[keep].sum(0)
            sst = (b - a * a / rows).clamp_min(0.0)
            ok = sst > 0
            r2 = 1.0 - sse[keep].sum(0)[ok] / sst[ok]
            thetas.append(float(r2.mean()) if r2.numel() else math.nan)
        return jackknife_interval(thetas, self.accumulator(key).r2_mean_dim())
