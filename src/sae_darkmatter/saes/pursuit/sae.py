"""``PursuitSAE``: any SAE's decoder with a pursuit encoder, behind the SAE protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import Tensor, nn

from sae_darkmatter.saes.pursuit.algorithms import (
    BATCH_ROWS,
    METHODS,
    Method,
    SparseCode,
    pursue,
)

if TYPE_CHECKING:
    from sae_darkmatter.saes import SAE


class PursuitSAE(nn.Module):
    """Any SAE's decoder (``W_dec [d_sae, d_in]``, ``b_dec``) with a pursuit encoder.

    Implements the SAE protocol, so ``decompose_many(store, {"gp": PursuitSAE(sae)}, splits)``
    decomposes the pursuit reconstruction's error. ``l0="match"``: each token gets the wrapped
    SAE's own L0 on it (its nonzero latents); an int fixes it. ``nonnegative`` defaults to True
    for gp/mp (SAE latents are nonnegative) and must be False for omp.
    """

    def __init__(
        self,
        sae: nn.Module,
        *,
        method: Method = "gp",
        l0: int | Literal["match"] = "match",
        nonnegative: bool | None = None,
        batch_size: int = BATCH_ROWS,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if l0 != "match" and (not isinstance(l0, int) or l0 < 0):
            raise ValueError(f"l0 must be 'match' or a nonnegative int, got {l0!r}")
        self.nonnegative = method != "omp" if nonnegative is None else nonnegative
        if method == "omp" and self.nonnegative:
            raise ValueError("orthogonal matching pursuit supports nonnegative=False only")
        self.sae = sae
        self.method: Method = method
        self.l0: int | Literal["match"] = l0
        self.batch_size = batch_size

    @property
    def d_in(self) -> int:
        return self._W_dec().shape[1]

    @property
    def d_sae(self) -> int:
        return self._W_dec().shape[0]

    def _W_dec(self) -> Tensor:
        return cast(Tensor, self.sae.W_dec)

    def _b_dec(self) -> Tensor | None:
        return getattr(self.sae, "b_dec", None)

    def target_l0(self, x: Tensor) -> Tensor:
        """Atoms per token: the wrapped SAE's L0 on each token, or the fixed ``l0``."""
        if self.l0 == "match":
            with torch.no_grad():
                return (cast("SAE", self.sae).encode(x) != 0).sum(dim=1)
        return torch.full((x.shape[0],), self.l0, dtype=torch.int64, device=x.device)

    def encode_sparse(self, x: Tensor) -> SparseCode:
        return pursue(x, self._W_dec(), self._b_dec(), self.target_l0(x), method=self.method,
                      nonnegative=self.nonnegative, batch_size=self.batch_size)

    def encode(self, x: Tensor) -> Tensor:
        """Dense pursuit latents ``[n, d_sae]``."""
        return self.encode_sparse(x).to_dense(self.d_sae)

    def decode(self, z: Tensor) -> Tensor:
        """``z @ W_dec + b_dec`` (the objective the pursuit minimises)."""
        W_dec = self._W_dec()
        out = z.to(W_dec.dtype) @ W_dec
        b = self._b_dec()
        return out if b is None else out + b

    def forward(self, x: Tensor) -> Tensor:
        return self.encode_sparse(x).decode(self._W_dec(), self._b_dec())

    def extra_repr(self) -> str:
        return f"method={self.method}, l0={self.l0}, nonnegative={self.nonnegative}"
