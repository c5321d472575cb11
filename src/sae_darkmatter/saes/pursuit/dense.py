"""Reference gradient pursuit with dense ``[n, d_sae]`` weights, as the paper's code does it.

For tests and benchmarks: ``algorithms.gradient_pursuit`` must give the same codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_darkmatter.saes.pursuit.algorithms import _atoms, _floor, _signal, _targets, _working


@torch.no_grad()
def gradient_pursuit_dense(
    x: Tensor, W_dec: Tensor, b_dec: Tensor | None, l0: int | Tensor, *, nonnegative: bool = True
) -> Tensor:
    """Reference: ``gradient_pursuit`` done the straightforward way, with dense ``[n, d_sae]``
    weights, support mask and products every step (as the paper's code). Dense codes out."""
    W = _working(W_dec)
    s = _signal(x, W, b_dec)
    n, d_sae = s.shape[0], W.shape[0]
    target = _targets(l0, n, d_sae, s.device)
    norms, unit = _atoms(W)
    floor = _floor(s)
    w = s.new_zeros(n, d_sae)
    support = torch.zeros(n, d_sae, dtype=torch.bool, device=s.device)
    for t in range(int(target.max()) if n else 0):
        active = target > t
        r = s - w @ W
        score = r @ unit.T
        g = score * norms
        cand = (score if nonnegative else score.abs()).masked_fill(support, float("-inf"))
        best, j = cand.max(dim=1)
        add = active & (best > floor)
        support.scatter_(1, j[:, None], support.gather(1, j[:, None]) | add[:, None])
        keep = support & ((w > 0) | (g > 0)) if nonnegative else support
        direction = torch.where(keep, g, 0)
        c = direction @ W
        cc, cr = (c * c).sum(dim=1), (c * r).sum(dim=1)
        alpha = torch.where(cc > 0, cr / torch.where(cc > 0, cc, torch.ones_like(cc)), 0).clamp_min(
            0
        )
        if nonnegative:
            shrink = direction < 0
            ratio = torch.where(shrink, w / torch.where(shrink, -direction, torch.ones_like(w)),
                                float("inf"))
            alpha = torch.minimum(alpha, ratio.min(dim=1).values)
            new = (w + alpha[:, None] * direction).clamp_min(0)
            new = torch.where(shrink & (ratio <= alpha[:, None]), 0, new)
        else:
            new = w + alpha[:, None] * direction
        w = torch.where(active[:, None], new, w)
    return w
