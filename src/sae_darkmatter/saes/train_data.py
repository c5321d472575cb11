"""The data side of SAE training: checks and statistics of the activations, seeded batches."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from sae_darkmatter.errors import DarkMatterError


def data_summary(x: torch.Tensor) -> dict[str, Any]:
    """Rows, width and mean token norm (float64); rejects non-finite values."""
    total = 0.0
    for chunk in x.split(65_536):
        chunk = chunk.double()
        if not torch.isfinite(chunk).all():
            raise DarkMatterError("training activations contain NaN or infinite values")
        total += float(chunk.norm(dim=1).sum())
    mean_norm = total / x.shape[0]
    if not mean_norm > 0:
        raise DarkMatterError("training activations are all zero")
    return {"rows": x.shape[0], "d_in": x.shape[1], "mean_norm": mean_norm}


def column_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-dimension mean of ``x`` (accumulated in float64)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in x.split(65_536):
        total += chunk.double().sum(0)
    return (total / x.shape[0]).float()


class BatchStream:
    """Row indices of batch ``step``: slices of a stream of seeded per-epoch permutations."""

    def __init__(self, n_rows: int, batch_size: int, seed: int) -> None:
        self.n, self.b, self.seed = n_rows, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            digest = hashlib.sha256(f"{self.seed}:{epoch}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def rows(self, step: int) -> torch.Tensor:
        parts, pos, end = [], step * self.b, (step + 1) * self.b
        while pos < end:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, end - pos)
            parts.append(self._perm(epoch)[offset : offset + take])
            pos += take
        return torch.cat(parts)
