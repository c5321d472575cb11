"""The batched pursuits (``pursue``): per-token sparse codes over a fixed decoder.

See the package docstring for the algorithms; everything here is deterministic and works on
``BATCH_ROWS`` tokens (fewer for wide dictionaries) at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes.topk import latent_rows

Method = Literal["gp", "mp", "omp"]
METHODS: tuple[str, ...] = ("gp", "mp", "omp")
BATCH_ROWS = 1024  # tokens per batch: bounds the [b, d_sae] correlations (and OMP's [b, l0, d])
_ROUNDING = 1e3  # an atom qualifies when its correlation exceeds this many eps times ‖x − b_dec‖


@dataclass(frozen=True)
class SparseCode:
    """Per-token codes as slots: ``values [n, L]`` and ``indices [n, L]`` (int64).

    Unused slots hold value 0 (index 0); the indices of a row's nonzero values are distinct.
    """

    values: Tensor
    indices: Tensor

    @property
    def l0(self) -> Tensor:
        """Active latents per token ``[n]``."""
        return (self.values != 0).sum(dim=1)

    def to_dense(self, d_sae: int) -> Tensor:
        """Dense latents ``[n, d_sae]``."""
        z = self.values.new_zeros(self.values.shape[0], d_sae)
        return z.scatter_add_(1, self.indices, self.values)

    def decode(self, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
        """``Σ values · W_dec[indices] (+ b_dec)`` without materialising dense latents."""
        out = _combine(self.indices, self.values, W_dec.detach().to(self.values.dtype))
        return out if b_dec is None else out + b_dec.detach().to(out.dtype)


def _combine(idx: Tensor, weights: Tensor, W: Tensor) -> Tensor:
    """``Σ_k weights[:, k] · W[idx[:, k]]`` per row, ``[m, d]`` (``embedding_bag``)."""
    if idx.shape[1] == 0:
        return W.new_zeros(idx.shape[0], W.shape[1])
    return F.embedding_bag(idx, W, per_sample_weights=weights, mode="sum")


def _targets(l0: int | Tensor, n: int, d_sae: int, device: torch.device) -> Tensor:
    """Per-token L0 ``[n]`` (int64, clamped to ``d_sae``) from an int or a per-token tensor."""
    if isinstance(l0, int):
        t = torch.full((n,), l0, dtype=torch.int64, device=device)
    else:
        t = torch.as_tensor(l0).to(device=device, dtype=torch.int64).reshape(-1)
        if t.numel() != n:
            raise ShapeMismatchError(f"l0 has {t.numel()} entries for {n} tokens")
    if n and int(t.min()) < 0:
        raise ValueError("l0 must be >= 0")
    return t.clamp(max=d_sae)


def _working(W_dec: Tensor) -> Tensor:
    """The decoder in at least float32 (half-precision pursuit would drift)."""
    return W_dec.detach().to(torch.promote_types(W_dec.dtype, torch.float32))


def _signal(x: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """``x − b_dec`` in the decoder's dtype, after shape and finiteness checks."""
    if x.ndim != 2 or x.shape[1] != W_dec.shape[1]:
        raise ShapeMismatchError(f"x must be [n, {W_dec.shape[1]}], got {tuple(x.shape)}")
    x = x.to(W_dec.dtype)
    if not bool(torch.isfinite(x).all()):
        raise DarkMatterError("pursuit: x contains NaN or Inf values")
    return x if b_dec is None else x - b_dec.detach().to(x.dtype)


def _floor(s: Tensor) -> Tensor:
    """Per-token correlation threshold: residuals at rounding level have nothing left to add."""
    return _ROUNDING * torch.finfo(s.dtype).eps * s.norm(dim=1)


def _atoms(W: Tensor) -> tuple[Tensor, Tensor]:
    """Row norms and unit rows (zero rows stay zero, so they are never selected)."""
    norms = W.norm(dim=1)
    return norms, W / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]


@torch.no_grad()
def pursue(
    x: Tensor,
    W_dec: Tensor,
    b_dec: Tensor | None,
    l0: int | Tensor,
    *,
    method: Method = "gp",
    nonnegative: bool = True,
    batch_size: int = BATCH_ROWS,
) -> SparseCode:
    """Sparse codes of ``x [n, d_in]`` over ``W_dec [d_sae, d_in]`` (``x ≈ z @ W_dec + b_dec``).

    ``l0``: an int or a per-token ``[n]`` tensor of atoms to add. ``b_dec`` may be None.
    Rows are coded ``batch_size`` at a time, fewer for wide dictionaries (``latent_rows``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "omp" and nonnegative:
        raise ValueError("orthogonal matching pursuit supports nonnegative=False only")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    W = _working(W_dec)
    s = _signal(x, W, b_dec)
    n = s.shape[0]
    target = _targets(l0, n, W.shape[0], s.device)
    width = int(target.max()) if n else 0
    values = s.new_zeros(n, width)
    indices = torch.zeros(n, width, dtype=torch.int64, device=s.device)
    norms, unit = _atoms(W)
    order = torch.argsort(target, descending=True, stable=True)  # active tokens form a prefix
    step = min(
        batch_size, latent_rows(W.shape[0])
    )  # [step, d_sae] correlations, whatever the width
    for lo in range(0, n, step):
        rows = order[lo : lo + step]
        v, i = _batch(method, s[rows], target[rows], W, unit, norms, nonnegative)
        values[rows, : v.shape[1]] = v
        indices[rows, : i.shape[1]] = i
    return SparseCode(values, indices)


def gradient_pursuit(
    x: Tensor, W_dec: Tensor, b_dec: Tensor | None, l0: int | Tensor, *,
    nonnegative: bool = True, batch_size: int = BATCH_ROWS,
) -> SparseCode:
    """Batched gradient pursuit (see the module docstring)."""
    return pursue(x, W_dec, b_dec, l0, method="gp", nonnegative=nonnegative, batch_size=batch_size)


def matching_pursuit(
    x: Tensor, W_dec: Tensor, b_dec: Tensor | None, l0: int | Tensor, *,
    nonnegative: bool = True, batch_size: int = BATCH_ROWS,
) -> SparseCode:
    """Batched matching pursuit, one new atom per step (see the module docstring)."""
    return pursue(x, W_dec, b_dec, l0, method="mp", nonnegative=nonnegative, batch_size=batch_size)


def orthogonal_matching_pursuit(
    x: Tensor, W_dec: Tensor, b_dec: Tensor | None, l0: int | Tensor, *,
    batch_size: int = BATCH_ROWS,
) -> SparseCode:
    """Batched OMP: least squares on the support after each new atom (signed coefficients)."""
    return pursue(x, W_dec, b_dec, l0, method="omp", nonnegative=False, batch_size=batch_size)


def _batch(
    method: str, s: Tensor, target: Tensor, W: Tensor, unit: Tensor, norms: Tensor,
    nonnegative: bool,
) -> tuple[Tensor, Tensor]:
    """One batch, ``target`` sorted descending; returns (values, indices) ``[b, max target]``."""
    b, steps = s.shape[0], int(target[0]) if s.shape[0] else 0
    vals = s.new_zeros(b, steps)
    idx = torch.zeros(b, steps, dtype=torch.int64, device=s.device)
    filled = torch.zeros(b, steps, dtype=torch.bool, device=s.device)
    omp = _OMPState(b, steps, s) if method == "omp" else None
    floor = _floor(s)
    for t in range(steps):
        m = int((target > t).sum())
        sup, sup_vals = idx[:m, :t], vals[:m, :t]
        r = s[:m] - _combine(sup, sup_vals, W)
        score = r @ unit.T  # [m, d_sae] correlations with unit atoms: the one dense product
        g_sup = score.gather(1, sup) * norms[sup]  # gradient <r, d_k> on the support
        j, ok, g_new = _select(score, sup, filled[:m, :t], floor[:m], nonnegative)
        norm_j = norms[j]
        if omp is not None:
            ok = omp.add(t, m, W[j], ok)
        idx[:m, t] = torch.where(ok, j, 0)
        filled[:m, t] = ok
        if method == "mp":
            coef = g_new / torch.where(ok, norm_j, torch.ones_like(norm_j))
            vals[:m, t] = torch.where(ok, coef, 0)
        elif method == "gp":
            g = torch.cat([g_sup, (g_new * norm_j)[:, None]], dim=1)
            vals[:m, : t + 1] = _gp_step(r, g, idx[:m, : t + 1], vals[:m, : t + 1],
                                         filled[:m, : t + 1], W, nonnegative)
        else:
            assert omp is not None
            vals[:m, : t + 1] = omp.solve(t, m)
    return vals, idx


def _select(
    score: Tensor, sup: Tensor, filled: Tensor, floor: Tensor, nonnegative: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Best unused atom per row: (index, qualifies (above ``floor``), its unit-atom correlation).

    Support atoms are masked with ``scatter_reduce(amin)``: filled slots write -inf, empty
    slots +inf (a no-op), so duplicate indices cannot race. Modifies ``score`` when
    ``nonnegative``.
    """
    cand = score if nonnegative else score.abs()
    if sup.shape[1]:
        inf = torch.full(sup.shape, float("inf"), dtype=score.dtype, device=score.device)
        cand.scatter_reduce_(1, sup, torch.where(filled, -inf, inf), reduce="amin")
    best, j = cand.max(dim=1)
    ok = best > floor
    signed = torch.where(ok, best, 0) if nonnegative else score.gather(1, j[:, None])[:, 0]
    return j, ok, signed


def _gp_step(
    r: Tensor, g: Tensor, idx: Tensor, w: Tensor, filled: Tensor, W: Tensor, nonnegative: bool
) -> Tensor:
    """One exact line-search step along the (projected) support gradient ``g``; new weights."""
    keep = filled & ((w > 0) | (g > 0)) if nonnegative else filled
    direction = torch.where(keep, g, 0)
    c = _combine(idx, direction, W)  # the direction in activation space
    cc, cr = (c * c).sum(dim=1), (c * r).sum(dim=1)
    alpha = torch.where(cc > 0, cr / torch.where(cc > 0, cc, torch.ones_like(cc)), 0).clamp_min(0)
    if not nonnegative:
        return w + alpha[:, None] * direction
    shrink = direction < 0
    ratio = torch.where(
        shrink, w / torch.where(shrink, -direction, torch.ones_like(w)), float("inf")
    )
    alpha = torch.minimum(alpha, ratio.min(dim=1).values)  # stop where a coefficient hits zero
    new = (w + alpha[:, None] * direction).clamp_min(0)
    return torch.where(shrink & (ratio <= alpha[:, None]), 0, new)


class _OMPState:
    """Support rows, the Cholesky factor of their Gram matrix, and ``<s, d_k>``, per token.

    A slot without a new atom gets a unit diagonal, a zero row and a zero right-hand side, so
    its coefficient is exactly 0 and the batched triangular solves stay nonsingular.
    """

    def __init__(self, b: int, steps: int, s: Tensor) -> None:
        self.s = s
        self.rows = s.new_zeros(b, steps, s.shape[1])
        self.chol = s.new_zeros(b, steps, steps)
        self.rhs = s.new_zeros(b, steps, 1)
        self.tol = 1e3 * torch.finfo(s.dtype).eps  # relative pivot below which an atom is dependent

    def add(self, t: int, m: int, d_new: Tensor, ok: Tensor) -> Tensor:
        """Append ``d_new [m, d]`` where ``ok``; returns ``ok`` minus linearly dependent atoms."""
        prev = self.rows[:m, :t]
        v = torch.bmm(prev, d_new[:, :, None])  # [m, t, 1] Gram entries with the support
        w = torch.linalg.solve_triangular(self.chol[:m, :t, :t], v, upper=False)[:, :, 0]
        sq = d_new.square().sum(dim=1)
        pivot = sq - w.square().sum(dim=1)
        ok = ok & (pivot > self.tol * sq)
        self.rows[:m, t] = torch.where(ok[:, None], d_new, 0)
        self.chol[:m, t, :t] = torch.where(ok[:, None], w, 0)
        self.chol[:m, t, t] = torch.where(ok, pivot.clamp_min(0).sqrt(), 1)
        self.rhs[:m, t, 0] = torch.where(ok, (self.s[:m] * d_new).sum(dim=1), 0)
        return ok

    def solve(self, t: int, m: int) -> Tensor:
        """Least-squares coefficients on slots ``0..t``: ``(L Lᵀ) a = D_S s``."""
        return torch.cholesky_solve(self.rhs[:m, : t + 1], self.chol[:m, : t + 1, : t + 1])[:, :, 0]
