"""Sub-problems of one streamed least-squares system, and composing affine maps.

One ``StreamingLstsq`` over X -> Y holds the sums of every column pair of X (and X with Y), so
the system of any subset of X's columns mapped to any columns of [X, Y] is a slice of its state:
many fits on overlapping features share one pass over the rows and one Gram matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.linalg.lstsq import StreamingLstsq
from sae_darkmatter.linalg.solve import LinearProbe


def sub_lstsq(
    fit: StreamingLstsq | Mapping[str, Tensor],
    inputs: Sequence[int],
    outputs: Sequence[int],
    *,
    gemm_dtype: torch.dtype | None = None,
) -> StreamingLstsq:
    """The ``StreamingLstsq`` of columns ``inputs`` of X mapped to columns ``outputs`` of [X, Y].

    ``fit`` is an accumulator over X [n, d_in] -> Y [n, d_out], or its ``state_dict()`` (pass
    the state when slicing many sub-problems: ``state_dict`` copies every sum). Output indices
    below ``d_in`` name X's columns, the others Y's (``d_in + j`` is Y's column j); inputs must
    be X's (Y's own products are not accumulated). The result holds the same rows' sums about
    the same references, sliced, and the state's scalars (row count, bias, mode flags) as they
    are, so its ``solve`` is the fit an accumulator fed only those columns would give, up to
    float64 summation order. ``gemm_dtype`` (default: ``fit``'s, or float64 for a state) is
    what ``solve`` is told the sums were made with.
    """
    if isinstance(fit, StreamingLstsq):
        gemm_dtype = gemm_dtype or fit.gemm_dtype
        state: Mapping[str, Tensor] = fit.state_dict()
    else:
        state = fit
    d_in, d_out = state["sum_xy"].shape
    bad_in = [i for i in inputs if not 0 <= i < d_in]
    bad_out = [j for j in outputs if not 0 <= j < d_in + d_out]
    if not inputs or not outputs or bad_in or bad_out:
        raise DarkMatterError(
            f"sub_lstsq: inputs must be non-empty indices in [0, {d_in}) and outputs non-empty "
            f"indices in [0, {d_in + d_out}); out of range: inputs {bad_in[:5]}, "
            f"outputs {bad_out[:5]}"
        )
    device = state["sum_xx"].device
    i_in = torch.as_tensor(list(inputs), dtype=torch.long, device=device)
    i_out = torch.as_tensor(list(outputs), dtype=torch.long, device=device)
    sum_z = torch.cat([state["sum_x"], state["sum_y"]])
    shift_z = torch.cat([state["shift_x"], state["shift_y"]])
    rows_xx = state["sum_xx"].index_select(0, i_in)
    rows_xy = state["sum_xy"].index_select(0, i_in)
    from_x = i_out < d_in
    sum_xy = torch.empty(len(inputs), len(outputs), dtype=rows_xx.dtype, device=device)
    sum_xy[:, from_x] = rows_xx.index_select(1, i_out[from_x])
    sum_xy[:, ~from_x] = rows_xy.index_select(1, i_out[~from_x] - d_in)
    sub = StreamingLstsq(
        len(inputs),
        len(outputs),
        bias=bool(state["bias"]),
        device=device,
        gemm_dtype=gemm_dtype or torch.float64,
    )
    scalars = {k: v for k, v in state.items() if v.ndim == 0}  # n, bias, and any mode flags
    sub.load_state_dict({
        **scalars,
        "sum_x": state["sum_x"].index_select(0, i_in),
        "sum_y": sum_z.index_select(0, i_out),
        "sum_xx": rows_xx.index_select(1, i_in),
        "sum_xy": sum_xy,
        "shift_x": state["shift_x"].index_select(0, i_in),
        "shift_y": shift_z.index_select(0, i_out),
    })
    return sub


def compose(first: LinearProbe, then: LinearProbe) -> LinearProbe:
    """The affine map ``x ↦ then(first(x))`` in float64 (rank, cond and regularized: ``first``'s).

    Least squares is linear in the targets, so for targets ``y = then(t)`` the fit of ``y`` on
    some features is ``compose`` of the fit of ``t`` on them (ridge and pseudo-inverse alike).
    """
    if first.d_out != then.d_in:
        raise DarkMatterError(
            f"compose: the first map gives {first.d_out} outputs, the second takes {then.d_in}"
        )
    w = then.weight.to(first.weight)
    return LinearProbe(
        weight=first.weight @ w,
        bias=first.bias @ w + then.bias.to(first.bias),
        rank=first.rank,
        cond=first.cond,
        regularized=first.regularized,
    )
