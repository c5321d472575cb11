"""Sparse re-encoding over a fixed SAE decoder: gradient pursuit, matching pursuit and OMP.

How much of an SAE's error is its encoder's fault? The paper (§6, ``encoder_pursuit.py``)
re-encodes every token with a sparse-approximation algorithm over the SAE's decoder at the SAE's
own per-token L0 and decomposes that reconstruction's error like the SAE's. Here every algorithm
adds one new atom per step (the unused decoder row best correlated with the residual, correlation
divided by the row norm; with ``nonnegative`` only positive correlations qualify), so after
``l0`` steps a token has at most ``l0`` active latents:

- ``"mp"``  matching pursuit: the new atom gets its projection coefficient; older ones stay.
- ``"gp"``  gradient pursuit (Blumensath & Davies 2008): one exact line-search step along the
  gradient restricted to the support. With ``nonnegative`` the direction is projected (a zero
  coefficient with a negative gradient is held) and the step stops where a coefficient reaches
  zero, so the residual never grows (the paper's code clamps after the step, which can).
- ``"omp"`` orthogonal matching pursuit: exact least squares on the support (batched incremental
  Cholesky factor of the support's Gram matrix); signed coefficients only.

Selection needs the dense correlations ``residual @ W_decᵀ`` ([b, d_sae]) each step; coefficient
updates, step sizes and reconstructions use only the support (gathered rows, ``embedding_bag``).
Tokens are sorted by their L0 so finished tokens drop out of later steps. A step with nothing to
add (no qualifying atom, zero gradient, an atom dependent on the support) leaves the token as it
is: no division by zero, no NaN. Everything is deterministic.

Modules: ``algorithms`` (the batched pursuits), ``sae`` (``PursuitSAE``, a pursuit encoder
behind the SAE protocol), ``dense`` (the straightforward dense reference, for tests and
benchmarks).
"""

from __future__ import annotations

from sae_darkmatter.saes.pursuit.algorithms import (
    BATCH_ROWS,
    METHODS,
    Method,
    SparseCode,
    gradient_pursuit,
    matching_pursuit,
    orthogonal_matching_pursuit,
    pursue,
)
from sae_darkmatter.saes.pursuit.dense import gradient_pursuit_dense
from sae_darkmatter.saes.pursuit.sae import PursuitSAE

__all__ = [
    "BATCH_ROWS",
    "METHODS",
    "Method",
    "PursuitSAE",
    "SparseCode",
    "gradient_pursuit",
    "gradient_pursuit_dense",
    "matching_pursuit",
    "orthogonal_matching_pursuit",
    "pursue",
]
