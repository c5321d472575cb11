"""Streaming least squares and fit metrics (FVU, R²) in float64.

Both accumulators keep only sums, so their memory does not grow with the number of rows, and
two accumulators (shards, ranks) merge exactly.

Numerics. Residual-stream activations have large mean components (norms ~170, cond(XᵀX) ~6e5
uncentred), so raw sums of squares cancel catastrophically. Every accumulator therefore sums
*shifted* data ``x − s``, where the reference row ``s`` is the per-dimension median of the first
4096 rows it sees (or one the caller passes): close to the mean, robust to outlier rows, made of
actual data values, so a constant dimension gives exactly zero spread. Means and centred
second moments are recovered from the shifted sums in float64, where the remaining cancellation
is harmless because ``s`` is near the mean.

Merging. Accumulators built with the *same* reference merge by plain addition of the tensors
named in ``ADDITIVE_KEYS`` (so ``torch.distributed.all_reduce(SUM)`` on those works). ``merge``
also accepts a different reference: it re-expresses the other's sums about its own reference
exactly. For an all-reduce across ranks, give every rank the same ``shift_*`` (e.g. broadcast
from rank 0) before the first update; ``load_state_dict`` then takes the reduced sums.
"""

from sae_darkmatter.linalg.lstsq import StreamingLstsq
from sae_darkmatter.linalg.r2 import (
    R2Accumulator,
    bootstrap_counts,
    fvu,
    percentile_interval,
    r2_score,
)
from sae_darkmatter.linalg.solve import LinearProbe

__all__ = ["LinearProbe", "R2Accumulator", "StreamingLstsq", "bootstrap_counts", "fvu",
           "percentile_interval", "r2_score"]
