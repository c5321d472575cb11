"""Shared pieces of the float64 accumulators: input checks, reference rows, shifted sums."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError

F64 = torch.float64
# Rows per block product in StreamingLstsq.update (bounds its scratch buffer and the float32
# rounding growth). Measured with float32 products, d_in = d_out + 1 = 576, 100k rows in chunks
# of 8192: 1024 rows 2.6x, 2048 1.6x, 4096 1.1x and 16384 1.2x the time of 8192.
GEMM_ROWS = 8192
# Column parts of XᵀX whose upper blocks are multiplied (the rest mirrored). With d_out = 577,
# float32, one thread: 2, 3 or 4 parts took ~0.85x the time of 1 (2,308 outputs: ~0.97x);
# two threads on a busy machine: 2 parts 1.03-1.07x, 3 parts 1.14-1.19x (smaller products
# split worse across threads). 2 is the compromise.
SYMMETRIC_PARTS = 2
PREDICT_ROWS = 16384  # rows per float64 block in predict / R² updates (bounds float64 copies)
REFERENCE_ROWS = 4096  # rows whose median becomes the reference (shift) of an accumulator


def as_2d(t: Tensor, d: int, name: str) -> Tensor:
    """Return ``t`` as [n, d]; a 1-D tensor is accepted when ``d == 1`` (scalar targets)."""
    if t.ndim == 1 and d == 1:
        t = t.unsqueeze(1)
    if t.ndim != 2 or t.shape[1] != d:
        raise ShapeMismatchError(f"{name} must have shape [n, {d}], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def reference_row(t: Tensor) -> Tensor:
    """Per-dimension lower median of a chunk's first rows (float64): a data value near the mean.

    Taken in ``t``'s dtype (a median picks an element: the same value, 1.6x as fast)."""
    return t[:REFERENCE_ROWS].median(dim=0).values.to(F64)


def check_finite(name: str, sums: Tensor | tuple[Tensor, ...], **inputs: Tensor) -> None:
    """Refuse non-finite inputs, naming which input and rows.

    ``sums`` are small reductions of the inputs (one cheap test; NaN/inf in any row propagates
    into them); only when they are not finite are the ``inputs`` scanned for the bad rows.
    """
    if all(bool(torch.isfinite(t).all()) for t in (sums if isinstance(sums, tuple) else (sums,))):
        return
    for label, t in inputs.items():
        bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1).nonzero()[:, 0].tolist()
        if bad:
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise DarkMatterError(
                f"{name}: {label} holds NaN or inf in {len(bad)} of {t.shape[0]} rows "
                f"({'row' if len(bad) == 1 else 'rows'} {shown} of this chunk)"
            )
    raise DarkMatterError(f"{name}: the sums overflowed to inf (inputs of magnitude near "
                          f"{torch.finfo(torch.float32).max:.1e}?)")


def shift_or_nan(shift: Tensor | None, d: int, device: torch.device) -> Tensor:
    """A reference row for ``state_dict``; NaN marks "not chosen yet" (no rows seen)."""
    if shift is None:
        return torch.full((d,), math.nan, dtype=F64, device=device)
    return shift.clone()


def shift_from_state(t: Tensor, device: torch.device) -> Tensor | None:
    return None if bool(torch.isnan(t).any()) else t.to(dtype=F64, device=device).clone()


def moved_cross(
    sum_uv: Tensor, sum_u: Tensor, sum_v: Tensor, du: Tensor, dv: Tensor, n: float | Tensor
) -> Tensor:
    """Σ(u + du)(v + dv)ᵀ from Σuvᵀ, Σu, Σv over n rows (constant offsets du, dv)."""
    return sum_uv + torch.outer(sum_u, dv) + torch.outer(du, sum_v) + n * torch.outer(du, dv)
