"""Solving the normal equations of a least-squares fit, and the affine probe it gives."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sae_darkmatter.linalg.numerics import F64, PREDICT_ROWS, as_2d

log = logging.getLogger(__name__)

# Above this cond of the scaled XᵀX, float32 block GEMMs move the fit noticeably (measured on
# residual-like data: held-out FVU by ~1e-7 at 1e6, ~1e-5 at 1e8). StreamingLstsq's float32 mode
# checks it after its float64 probation rows and warns at the solve.
FLOAT32_MAX_COND = 1e6
# Above this (estimated) cond of the scaled XᵀX, eps·cond > 2 %: float64 normal equations no
# longer give a usable fit. Below it the Cholesky fit matches numpy's lstsq (cross-layer
# predictors reach cond ~1e12 and agree to 2e-5 in held-out R²), so it is not regularized.
_CHOLESKY_MAX_COND = 1e14


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
        x2 = as_2d(x.unsqueeze(0) if single else x, self.d_in, "x")
        w = self.weight.to(x2.device)
        b = self.bias.to(x2.device)
        out = torch.empty(x2.shape[0], self.d_out, dtype=x2.dtype, device=x2.device)
        for i in range(0, x2.shape[0], PREDICT_ROWS):
            block = x2[i : i + PREDICT_ROWS].to(F64)
            out[i : i + PREDICT_ROWS] = torch.addmm(b, block, w).to(x2.dtype)
        return out[0] if single else out


def solve_normal_equations(
    a: Tensor, b: Tensor, *, rcond: float, bias: bool, float32_sums: bool
) -> tuple[Tensor, int, float, bool]:
    """Solve ``a W = b`` (``a`` symmetric PSD, ridge included) as ``StreamingLstsq.solve`` says.

    Returns (W, rank, cond, regularized). ``bias``: ``a`` is centred (the degeneracy warning
    then calls zero-spread dimensions constant, not all-zero); ``float32_sums``: its sums came
    from float32 GEMMs, which warns above cond 1e6.
    """
    diag = a.diagonal()
    scale, a_s, chol, cond = _scaled_factor(a, rcond)
    b_s = b * scale[:, None]
    if cond <= _CHOLESKY_MAX_COND:
        weight, rank, regularized = torch.cholesky_solve(b_s, chol), a.shape[0], False
        if float32_sums and cond > FLOAT32_MAX_COND:
            log.warning(
                "cond(XᵀX) ≈ %.1e after centring and scaling: the float32 GEMMs of the sums "
                "may have changed the fit noticeably; use float64 ones (StreamingLstsq("
                "gemm_dtype=torch.float64); in a run: decompose.gemm_dtype = \"float64\")", cond)
    else:
        weight, rank, cond = _pinv_solve(a_s, b_s, rcond, diag, bias)
        regularized = True
    return weight * scale[:, None], rank, cond, regularized


def scaled_cond(a: Tensor, rcond: float = 1e-10) -> float:
    """Estimated condition number of symmetric PSD ``a`` scaled to unit diagonal, as the solve
    sees it (``inf`` when the Cholesky factorisation fails or a pivot is below ``rcond``)."""
    return _scaled_factor(a, rcond)[3]


def _scaled_factor(a: Tensor, rcond: float) -> tuple[Tensor, Tensor, Tensor, float]:
    """(scale, a scaled to unit diagonal, its Cholesky factor, its estimated cond)."""
    diag = a.diagonal()
    scale = torch.where(
        diag > 0, diag.clamp_min(torch.finfo(F64).tiny).rsqrt(), torch.zeros_like(diag)
    )
    a_s = a * torch.outer(scale, scale)
    chol, info = torch.linalg.cholesky_ex(a_s)
    cond = math.inf
    if int(info) == 0 and float(chol.diagonal().square().min()) >= rcond:
        lam_max, lam_min = _extreme_eigenvalues(a_s, chol)
        cond = lam_max / lam_min if lam_min > 0 else math.inf
    return scale, a_s, chol, cond


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
