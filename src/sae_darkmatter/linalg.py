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

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError

log = logging.getLogger(__name__)

F64 = torch.float64
_GEMM_ROWS = (
    8192  # rows per block product in update (bounds temporaries and float32 rounding growth)
)
_PREDICT_ROWS = 16384  # rows per float64 block in predict / R² updates (bounds float64 copies)
_FLOAT32_MAX_COND = 1e6  # above this, float32 chunk GEMMs noticeably move the fit (measured)
# Above this (estimated) cond of the scaled XᵀX, eps·cond > 2 %: float64 normal equations no
# longer give a usable fit. Below it the Cholesky fit matches numpy's lstsq (cross-layer
# predictors reach cond ~1e12 and agree to 2e-5 in held-out R²), so it is not regularized.
_CHOLESKY_MAX_COND = 1e14
_REFERENCE_ROWS = 4096  # rows whose median becomes the reference (shift) of an accumulator


def _as_2d(t: Tensor, d: int, name: str) -> Tensor:
    """Return ``t`` as [n, d]; a 1-D tensor is accepted when ``d == 1`` (scalar targets)."""
    if t.ndim == 1 and d == 1:
        t = t.unsqueeze(1)
    if t.ndim != 2 or t.shape[1] != d:
        raise ShapeMismatchError(f"{name} must have shape [n, {d}], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def _reference_row(t: Tensor) -> Tensor:
    """Per-dimension lower median of a chunk's first rows, in float64: a data value near the centre."""
    return t[:_REFERENCE_ROWS].to(F64).median(dim=0).values


def _check_finite(name: str, sums: Tensor | tuple[Tensor, ...], **inputs: Tensor) -> None:
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


def _shift_or_nan(shift: Tensor | None, d: int, device: torch.device) -> Tensor:
    """A reference row for ``state_dict``; NaN marks "not chosen yet" (no rows seen)."""
    if shift is None:
        return torch.full((d,), math.nan, dtype=F64, device=device)
    return shift.clone()


def _shift_from_state(t: Tensor, device: torch.device) -> Tensor | None:
    return None if bool(torch.isnan(t).any()) else t.to(dtype=F64, device=device).clone()


@dataclass(frozen=True)
class LinearProbe:
    """An affine map ``y ≈ x @ weight + bias`` in float64.

    ``rank`` is the numerical rank of the solved system (``d_in`` when it was well
    conditioned; smaller when the solver fell back to a pseudo-inverse). ``cond`` is the
    condition number of XᵀX (centred when fit with a bias) scaled to unit diagonal: an
    estimate on the Cholesky path, exact on the pseudo-inverse path, ``inf`` when singular.
    ``regularized`` says that the pseudo-inverse replaced the plain solve (see
    ``StreamingLstsq.solve``).
    """

    weight: Tensor
    bias: Tensor
    rank: int | None = None
    cond: float | None = None
    regularized: bool = False

    @property
    def d_in(self) -> int:
        return self.weight.shape[0]

    @property
    def d_out(self) -> int:
        return self.weight.shape[1]

    def predict(self, x: Tensor) -> Tensor:
        """``x @ weight + bias`` computed in float64 (in row blocks), returned in x's dtype.

        float64 avoids the cancellation between a large ``mean(x) @ weight`` and the bias.
        A 1-D ``x`` is one row; a single output column is kept as [n, 1].
        """
        single = x.ndim == 1
        x2 = _as_2d(x.unsqueeze(0) if single else x, self.d_in, "x")
        w = self.weight.to(x2.device)
        b = self.bias.to(x2.device)
        out = torch.empty(x2.shape[0], self.d_out, dtype=x2.dtype, device=x2.device)
        for i in range(0, x2.shape[0], _PREDICT_ROWS):
            block = x2[i : i + _PREDICT_ROWS].to(F64)
            out[i : i + _PREDICT_ROWS] = torch.addmm(b, block, w).to(x2.dtype)
        return out[0] if single else out


class StreamingLstsq:
    """Least squares Y ≈ [X, 1] W accumulated over chunks in float64.

    Memory is O((d_in + 1)·(d_in + d_out)), independent of the number of rows. Sums are taken
    over shifted data (see the module docstring) in blocks of 8192 rows and added in float64.
    ``bias=False`` fits ``Y ≈ X W`` instead (same statistics, different solve).

    ``gemm_dtype``: the block products run in float64 by default (exact to ~1e-16·cond).
    ``torch.float32`` is 1.3-2x faster on CPU and accurate while the centred, scaled XᵀX is
    well conditioned. Measured on residual-like data (d=576, 100k rows) against float64:
    cond 2e4 (real activations) -> held-out FVU changes by 3e-9, predictions by 3e-6
    (relative); cond 1e6 -> 9e-8 / 6e-5; cond 1e8 -> 1e-5 / 4e-3. ``solve`` warns above 1e6.
    On CUDA keep TF32 off (``torch.backends.cuda.matmul.allow_tf32``) for float32 mode.
    """

    ADDITIVE_KEYS = ("n", "sum_x", "sum_y", "sum_xx", "sum_xy")

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        bias: bool = True,
        device: str | torch.device = "cpu",
        gemm_dtype: torch.dtype = torch.float64,
        shift_x: Tensor | None = None,
        shift_y: Tensor | None = None,
    ) -> None:
        if d_in < 1 or d_out < 1:
            raise ValueError(f"d_in and d_out must be positive, got {d_in}, {d_out}")
        if gemm_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"gemm_dtype must be float32 or float64, got {gemm_dtype}")
        self.d_in, self.d_out, self.bias = d_in, d_out, bias
        self.device = torch.device(device)
        self.gemm_dtype = gemm_dtype
        z = dict(dtype=F64, device=self.device)
        self._n = torch.zeros((), dtype=torch.int64, device=self.device)
        self.sum_x = torch.zeros(d_in, **z)
        self.sum_y = torch.zeros(d_out, **z)
        self.sum_xx = torch.zeros(d_in, d_in, **z)
        self.sum_xy = torch.zeros(d_in, d_out, **z)
        self.shift_x = None if shift_x is None else self._given_shift(shift_x, d_in, "shift_x")
        self.shift_y = None if shift_y is None else self._given_shift(shift_y, d_out, "shift_y")

    def _representable(self, shift: Tensor) -> Tensor:
        """Round a reference to the GEMM dtype, so the sums are exactly about the stored one."""
        return shift.to(self.gemm_dtype).to(F64)

    def _given_shift(self, shift: Tensor, d: int, name: str) -> Tensor:
        shift = _as_2d(shift.reshape(1, -1), d, name)[0].to(dtype=F64, device=self.device)
        return self._representable(shift)

    @property
    def n(self) -> int:
        return int(self._n)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add rows ``x`` [n, d_in] and targets ``y`` [n, d_out] (any float dtype)."""
        x = _as_2d(x, self.d_in, "x").to(self.device)
        y = _as_2d(y, self.d_out, "y").to(self.device)
        if x.shape[0] != y.shape[0]:
            raise ShapeMismatchError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        if x.shape[0] == 0:
            return
        if self.shift_x is None:
            self.shift_x = self._representable(_reference_row(x))
        if self.shift_y is None:
            self.shift_y = self._representable(_reference_row(y))
        sx, sy = self.shift_x.to(self.gemm_dtype), self.shift_y.to(self.gemm_dtype)
        acc = [torch.zeros_like(t) for t in (self.sum_x, self.sum_y, self.sum_xx, self.sum_xy)]
        for i in range(0, x.shape[0], _GEMM_ROWS):
            u = x[i : i + _GEMM_ROWS].to(self.gemm_dtype, copy=True).sub_(sx)
            v = y[i : i + _GEMM_ROWS].to(self.gemm_dtype, copy=True).sub_(sy)
            acc[0] += u.sum(0).to(F64)  # a float32 block sum of centred values is ~1e-6-accurate
            acc[1] += v.sum(0).to(F64)
            acc[2] += (u.T @ u).to(F64)
            acc[3] += (u.T @ v).to(F64)
        _check_finite("StreamingLstsq.update", (acc[2], acc[3], acc[1]), x=x, y=y)
        self.sum_x += acc[0]
        self.sum_y += acc[1]
        self.sum_xx += acc[2]
        self.sum_xy += acc[3]
        self._n += x.shape[0]

    def merge(self, other: StreamingLstsq) -> None:
        """Add another accumulator's rows to this one (exact; references may differ)."""
        if (other.d_in, other.d_out) != (self.d_in, self.d_out):
            raise ShapeMismatchError(
                f"cannot merge a ({other.d_in}, {other.d_out}) accumulator into "
                f"({self.d_in}, {self.d_out})"
            )
        if other.n == 0:
            return
        o = {k: v.to(self.device) for k, v in other.state_dict().items()}
        if self.shift_x is None or self.shift_y is None:
            self.shift_x = self._representable(o["shift_x"])
            self.shift_y = self._representable(o["shift_y"])
        o = _recentred(o, self.shift_x, self.shift_y)
        self._n += o["n"]
        for key in ("sum_x", "sum_y", "sum_xx", "sum_xy"):
            getattr(self, key).add_(o[key])

    def state_dict(self) -> dict[str, Tensor]:
        """All state as tensors; the ``ADDITIVE_KEYS`` entries are sums (all-reducible)."""
        return {
            "n": self._n.clone(),
            "sum_x": self.sum_x.clone(),
            "sum_y": self.sum_y.clone(),
            "sum_xx": self.sum_xx.clone(),
            "sum_xy": self.sum_xy.clone(),
            "shift_x": _shift_or_nan(self.shift_x, self.d_in, self.device),
            "shift_y": _shift_or_nan(self.shift_y, self.d_out, self.device),
            "bias": torch.tensor(self.bias),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = {"sum_xx": (self.d_in, self.d_in), "sum_xy": (self.d_in, self.d_out)}
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ShapeMismatchError(
                    f"{key} has shape {tuple(state[key].shape)}, expected {shape}"
                )
        z = dict(dtype=F64, device=self.device)
        state = {k: v.to(device=self.device) for k, v in state.items()}
        shift_x = _shift_from_state(state["shift_x"], self.device)
        shift_y = _shift_from_state(state["shift_y"], self.device)
        if shift_x is not None and shift_y is not None:
            # Later float32 updates subtract the rounded reference: keep the sums about it.
            shift_x, shift_y = self._representable(shift_x), self._representable(shift_y)
            state = _recentred({k: v.to(F64) for k, v in state.items()}, shift_x, shift_y)
        self._n = state["n"].to(dtype=torch.int64).clone()
        for key in ("sum_x", "sum_y", "sum_xx", "sum_xy"):
            setattr(self, key, state[key].to(**z).clone())
        self.shift_x, self.shift_y = shift_x, shift_y
        self.bias = bool(state["bias"])

    def _normal_equations(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A, B, mean_x, mean_y): A W = B is the system for the non-bias weights.

        With a bias A, B are the centred (co)variance sums; without, the raw sums rebuilt
        from the shifted ones.
        """
        n = float(self.n)
        sx, sy = self.shift_x, self.shift_y
        mean_u, mean_v = self.sum_x / n, self.sum_y / n
        if self.bias:
            a = self.sum_xx - torch.outer(self.sum_x, mean_u)
            b = self.sum_xy - torch.outer(self.sum_x, mean_v)
        else:
            a = _moved_cross(self.sum_xx, self.sum_x, self.sum_x, sx, sx, n)
            b = _moved_cross(self.sum_xy, self.sum_x, self.sum_y, sx, sy, n)
        return (a + a.T) / 2, b, sx + mean_u, sy + mean_v

    def solve(self, ridge: float = 0.0, *, rcond: float = 1e-10) -> LinearProbe:
        """Solve the normal equations in float64; ``ridge`` adds ``ridge·I`` to the non-bias block.

        Cholesky on the Jacobi-scaled system (unit diagonal), whose condition number is then
        estimated (power and inverse iteration, O(d²) per step). When the factorisation fails,
        a pivot falls below ``rcond`` (a constant or all-zero dimension, duplicated or collinear
        columns, fewer rows than dimensions) or the estimated condition number exceeds 1e14
        (where float64 normal equations stop being accurate), the solver warns, naming the
        degenerate dimensions and the condition number, and falls back to an
        eigen-decomposition pseudo-inverse that drops scaled eigenvalues below ``rcond·λ_max``. Its predictions are those of the minimum-norm least-squares fit on
        standardized x (centred, unit variance; singular values below ``sqrt(rcond)·σ_max``
        dropped), and the probe records ``regularized=True``, its rank and cond.
        """
        if self.n == 0:
            raise DarkMatterError("StreamingLstsq.solve: no rows were added")
        if not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
        a, b, mean_x, mean_y = self._normal_equations()
        a = a + ridge * torch.eye(self.d_in, dtype=F64, device=a.device)
        diag = a.diagonal()
        scale = torch.where(
            diag > 0, diag.clamp_min(torch.finfo(F64).tiny).rsqrt(), torch.zeros_like(diag)
        )
        a_s = a * torch.outer(scale, scale)
        b_s = b * scale[:, None]
        chol, info = torch.linalg.cholesky_ex(a_s)
        cond = math.inf
        if int(info) == 0 and float(chol.diagonal().square().min()) >= rcond:
            lam_max, lam_min = _extreme_eigenvalues(a_s, chol)
            cond = lam_max / lam_min if lam_min > 0 else math.inf
        if cond <= _CHOLESKY_MAX_COND:
            weight, rank, regularized = torch.cholesky_solve(b_s, chol), self.d_in, False
            if self.gemm_dtype == torch.float32 and cond > _FLOAT32_MAX_COND:
                log.warning(
                    "cond(XᵀX) ≈ %.1e after centring and scaling: float32 GEMMs may change the "
                    "fit noticeably; use gemm_dtype=torch.float64", cond)
        else:
            weight, rank, cond = _pinv_solve(a_s, b_s, rcond, diag, self.bias)
            regularized = True
        weight = weight * scale[:, None]
        bias = (
            mean_y - mean_x @ weight
            if self.bias
            else torch.zeros(self.d_out, dtype=F64, device=a.device)
        )
        return LinearProbe(weight=weight, bias=bias, rank=rank, cond=cond, regularized=regularized)


def _extreme_eigenvalues(a: Tensor, chol: Tensor, iters: int = 30) -> tuple[float, float]:
    """Estimates of λ_max and λ_min of SPD ``a`` (Cholesky factor ``chol``): O(d²) per step.

    Power iteration on ``a`` and inverse iteration through the factor, then Rayleigh quotients
    (λ_max is underestimated, λ_min overestimated, both converge fast when the extreme
    eigenvalue is well separated, as a near-collinear direction is). A full eigvalsh is avoided
    on this path: LAPACK's eigensolvers with 2 OpenMP threads took 3-8 s for d=576 on a busy
    2-core machine (0.02 s single-threaded).
    """
    g = torch.Generator(device=a.device).manual_seed(0)
    v = torch.randn(a.shape[0], 1, generator=g, dtype=F64, device=a.device)
    w = v.clone()
    for _ in range(iters):
        v = a @ v
        v /= v.norm()
        # two triangular solves: ~10 ms for d=576, where cholesky_solve on one column took ~0.5 s
        w = torch.linalg.solve_triangular(chol, w, upper=False)
        w = torch.linalg.solve_triangular(chol.mT, w, upper=True)
        w /= w.norm()
    return float(v.T @ a @ v), float(w.T @ a @ w)


def _moved_cross(
    sum_uv: Tensor, sum_u: Tensor, sum_v: Tensor, du: Tensor, dv: Tensor, n: float | Tensor
) -> Tensor:
    """Σ(u + du)(v + dv)ᵀ from Σuvᵀ, Σu, Σv over n rows (constant offsets du, dv)."""
    return sum_uv + torch.outer(sum_u, dv) + torch.outer(du, sum_v) + n * torch.outer(du, dv)


def _recentred(state: dict[str, Tensor], shift_x: Tensor, shift_y: Tensor) -> dict[str, Tensor]:
    """A StreamingLstsq state's sums re-expressed about new references (exact algebra).

    With b the old and a the new reference, x − a = (x − b) + dx where dx = b − a.
    """
    dx, dy = state["shift_x"] - shift_x, state["shift_y"] - shift_y
    n, sum_x, sum_y = state["n"].to(F64), state["sum_x"], state["sum_y"]
    out = dict(state)
    out["sum_xx"] = _moved_cross(state["sum_xx"], sum_x, sum_x, dx, dx, n)
    out["sum_xy"] = _moved_cross(state["sum_xy"], sum_x, sum_y, dx, dy, n)
    out["sum_x"] = sum_x + n * dx
    out["sum_y"] = sum_y + n * dy
    out["shift_x"], out["shift_y"] = shift_x, shift_y
    return out


def _pinv_solve(
    a: Tensor, b: Tensor, rcond: float, diag: Tensor, bias: bool
) -> tuple[Tensor, int, float]:
    """Pseudo-inverse solve of a W = b (a symmetric PSD, unit or zero diagonal).

    Drops eigenvalues below ``rcond·λ_max`` and warns, naming the degenerate dimensions.
    Returns (W, rank, cond) with cond = λ_max / λ_min (inf when λ_min <= 0).
    """
    evals, evecs = torch.linalg.eigh(a)
    lam_max, lam_min = float(evals[-1]), float(evals[0])
    keep = evals > rcond * max(lam_max, 0.0)
    rank = int(keep.sum())
    cond = lam_max / lam_min if lam_min > 0 else math.inf
    log.warning(
        "least squares is rank deficient: %s",
        _degeneracy(evecs[:, ~keep], diag, bias, rank, cond, rcond),
    )
    if rank == 0:
        return torch.zeros_like(b), 0, cond
    v = evecs[:, keep]
    return v @ ((v.T @ b) / evals[keep, None]), rank, cond


def _degeneracy(
    null: Tensor, diag: Tensor, bias: bool, rank: int, cond: float, rcond: float
) -> str:
    """Which x dimensions make XᵀX singular: constant (or all-zero) ones, and the dimensions
    that carry the dropped eigenvectors (linear combinations of others)."""
    dead = (diag <= 0).nonzero()[:, 0].tolist()
    v = null.clone()
    v[dead] = 0
    big = v.abs() >= 0.1 * v.abs().amax(dim=0, keepdim=True).clamp_min(1e-300)
    tied = sorted(set((big & (v.abs() > 1e-12)).any(dim=1).nonzero()[:, 0].tolist()) - set(dead))
    parts = [f"rank {rank} of {diag.numel()}", f"cond(XᵀX) = {cond:.2e} (centred, scaled to unit "
             f"diagonal)" if bias else f"cond(XᵀX) = {cond:.2e} (scaled to unit diagonal)"]
    if dead:
        parts.append(f"{'constant' if bias else 'all-zero'} x dimensions {_list(dead)}")
    if tied:
        parts.append(f"linearly dependent x dimensions {_list(tied)} (collinear within "
                     f"{math.sqrt(rcond):.0e} of their spread)")
    return "; ".join(parts) + (
        f"; using a pseudo-inverse that drops eigenvalues below {rcond:g}·λ_max (the "
        "minimum-norm fit on standardized x); the probe records regularized=True")


def _list(items: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return f"[{shown}, ... ({len(items)} in all)]" if len(items) > limit else f"[{shown}]"


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
        z = dict(dtype=F64, device=self.device)
        self._n = torch.zeros((), dtype=torch.int64, device=self.device)
        self.sse_dim = torch.zeros(d, **z)
        self.sum_dy = torch.zeros(d, **z)
        self.sum_dy2 = torch.zeros(d, **z)
        self.shift = None if shift is None else _as_2d(shift.reshape(1, -1), d, "shift")[0].to(**z)

    @property
    def n(self) -> int:
        return int(self._n)

    def update(self, y: Tensor, y_hat: Tensor) -> None:
        """Add rows of targets ``y`` and predictions ``y_hat`` [n, d] (summed in float64 blocks)."""
        y = _as_2d(y, self.d, "y").to(self.device)
        y_hat = _as_2d(y_hat, self.d, "y_hat").to(self.device)
        if y.shape[0] != y_hat.shape[0]:
            raise ShapeMismatchError(f"y has {y.shape[0]} rows but y_hat has {y_hat.shape[0]}")
        if y.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = _reference_row(y)
        sums = torch.zeros(3, self.d, dtype=F64, device=self.device)
        for i in range(0, y.shape[0], _PREDICT_ROWS):
            block = y[i : i + _PREDICT_ROWS].to(F64, copy=True)
            sums[0] += (block - y_hat[i : i + _PREDICT_ROWS].to(F64)).square_().sum(0)
            block -= self.shift
            sums[1] += block.sum(0)
            sums[2] += block.square_().sum(0)
        _check_finite("R2Accumulator.update", sums, y=y, y_hat=y_hat)
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
            "shift": _shift_or_nan(self.shift, self.d, self.device),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if tuple(state["sse"].shape) != (self.d,):
            raise ShapeMismatchError(
                f"sse has shape {tuple(state['sse'].shape)}, expected ({self.d},)"
            )
        z = dict(dtype=F64, device=self.device)
        self._n = state["n"].to(dtype=torch.int64, device=self.device).clone()
        self.sse_dim = state["sse"].to(**z).clone()
        self.sum_dy = state["sum_dy"].to(**z).clone()
        self.sum_dy2 = state["sum_dy2"].to(**z).clone()
        self.shift = _shift_from_state(state["shift"], self.device)

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
