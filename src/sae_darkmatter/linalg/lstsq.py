"""``StreamingLstsq``: least squares accumulated over chunks in float64 (mergeable sums)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.linalg.numerics import (
    F64,
    GEMM_ROWS,
    SYMMETRIC_PARTS,
    as_2d,
    check_finite,
    moved_cross,
    reference_row,
    shift_from_state,
    shift_or_nan,
)
from sae_darkmatter.linalg.solve import (
    FLOAT32_MAX_COND,
    LinearProbe,
    scaled_cond,
    solve_normal_equations,
)

log = logging.getLogger(__name__)

# float32 mode: the first PROBATION_ROWS_PER_DIM · d_in rows are summed with float64 GEMMs, then
# the cond of their system (the solve's matrix, scaled) decides whether float32 GEMMs go on.
# 8·d rows: the sample cond then overestimates the population's (by up to ~4x for white data,
# Marchenko-Pastur), so the check errs towards float64; real SmolLM2 rows passed it with room.
PROBATION_ROWS_PER_DIM = 8
_PENDING, _FLOAT32, _FLOAT64 = 0, 1, 2  # gemm_check: probation, float32 confirmed, fell back


def tf32_matmuls(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` may run in TF32: CUDA with TF32 allowed by any of
    torch's switches (``allow_tf32``, ``set_float32_matmul_precision("high")``, the
    ``fp32_precision`` settings; ``torch.backends.cuda.matmul.fp32_precision`` reflects all)."""
    return device.type == "cuda" and torch.backends.cuda.matmul.fp32_precision == "tf32"


class StreamingLstsq:
    """Least squares Y ≈ [X, 1] W accumulated over chunks in float64.

    Memory is O((d_in + 1)·(d_in + d_out)), independent of the number of rows. Sums are taken
    over shifted data (see the module docstring) in blocks of at most ``GEMM_ROWS`` rows: per
    block, ``[1, u]ᵀ[1, u, v]`` (counts, column sums and both cross products; the symmetric
    uᵀu's upper blocks only, ``_upper_products``), added in float64. ``bias=False`` fits
    ``Y ≈ X W`` instead (same statistics, different solve).

    ``gemm_dtype``: the block products run in float64 by default (exact to ~1e-16·cond).
    ``torch.float32`` is ~2x faster on CPU and accurate while the centred, scaled XᵀX is well
    conditioned. Measured on residual-like data (d=576, 100k rows) against float64: cond 2e4
    (real activations) -> held-out FVU changes by 3e-9, predictions by 3e-6 (relative); cond
    1e6 -> 9e-8 / 6e-5; cond 1e8 -> 1e-5 / 4e-3. So float32 mode guards itself twice: its first
    ``8·d_in`` rows are summed in float64 and, if the cond of their system exceeds 1e6, it
    warns and stays in float64 for good (``fell_back``; a stream cannot be re-read, so this
    check comes first); and ``solve`` warns, naming the setting, if the cond of all rows
    exceeds 1e6 while some were summed in float32 (the data changed after the check).
    On CUDA with TF32 matmuls allowed (``tf32_matmuls``) float32 mode warns and uses float64
    GEMMs: TF32's 10-bit mantissa would cost ~3 decimal digits of XᵀX.
    """

    ADDITIVE_KEYS = ("n", "sum_x", "sum_y", "sum_xx", "sum_xy", "n_float32")

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
        z: dict[str, Any] = dict(dtype=F64, device=self.device)
        self._n = torch.zeros((), dtype=torch.int64, device=self.device)
        self._n_float32 = 0  # rows whose block products ran in float32
        self._check = _PENDING if gemm_dtype == torch.float32 else _FLOAT64
        self.sum_x = torch.zeros(d_in, **z)
        self.sum_y = torch.zeros(d_out, **z)
        self.sum_xx = torch.zeros(d_in, d_in, **z)
        self.sum_xy = torch.zeros(d_in, d_out, **z)
        self.shift_x = None if shift_x is None else self._given_shift(shift_x, d_in, "shift_x")
        self.shift_y = None if shift_y is None else self._given_shift(shift_y, d_out, "shift_y")
        self._buffers: dict[torch.dtype, tuple[Tensor, Tensor]] = {}  # reused between updates

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_buffers": {}}  # copies and pickles leave the scratch out

    def _representable(self, shift: Tensor) -> Tensor:
        """Round a reference to the GEMM dtype, so the sums are exactly about the stored one."""
        return shift.to(self.gemm_dtype).to(F64)

    def _given_shift(self, shift: Tensor, d: int, name: str) -> Tensor:
        shift = as_2d(shift.reshape(1, -1), d, name)[0].to(dtype=F64, device=self.device)
        return self._representable(shift)

    @property
    def n(self) -> int:
        return int(self._n)

    @property
    def fell_back(self) -> bool:
        """float32 mode switched to float64 GEMMs (its probation rows were ill-conditioned)."""
        return self.gemm_dtype == torch.float32 and self._check == _FLOAT64

    @property
    def probation_rows(self) -> int:
        """Rows summed with float64 GEMMs before float32 mode checks the conditioning."""
        return PROBATION_ROWS_PER_DIM * self.d_in

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add rows ``x`` [n, d_in] and targets ``y`` [n, d_out] (any float dtype)."""
        x = as_2d(x, self.d_in, "x").to(self.device)
        y = as_2d(y, self.d_out, "y").to(self.device)
        if x.shape[0] != y.shape[0]:
            raise ShapeMismatchError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        if x.shape[0] == 0:
            return
        if self.shift_x is None:
            self.shift_x = self._representable(reference_row(x))
        if self.shift_y is None:
            self.shift_y = self._representable(reference_row(y))
        d = self.d_in
        # acc = Σ [1, u]ᵀ[1, u, v] over the blocks: [0, 0] counts, row 0 the column sums
        acc = torch.zeros(1 + d, 1 + d + self.d_out, dtype=F64, device=self.device)
        i, seen, n_float32 = 0, self.n, 0
        while i < x.shape[0]:
            left = self.probation_rows - seen  # float32 mode: the probation ends on a block edge
            if self._check == _PENDING and left <= 0:
                self._decide(seen, acc)
            rows = left if self._check == _PENDING and 0 < left < GEMM_ROWS else GEMM_ROWS
            rows = min(rows, x.shape[0] - i)
            dtype = torch.float32 if self._check == _FLOAT32 else F64
            acc += _upper_products(*self._block(x[i : i + rows], y[i : i + rows], dtype), 1 + d)
            i, seen = i + rows, seen + rows
            n_float32 += rows if dtype == torch.float32 else 0
        if self._check == _PENDING and seen >= self.probation_rows:
            self._decide(seen, acc)
        check_finite("StreamingLstsq.update", acc, x=x, y=y)
        self.sum_x += acc[0, 1 : 1 + d]
        self.sum_y += acc[0, 1 + d :]
        self.sum_xx += acc[1:, 1 : 1 + d]
        self.sum_xy += acc[1:, 1 + d :]
        self._n += x.shape[0]
        self._n_float32 += n_float32

    def _block(self, x: Tensor, y: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``[1, x − s_x, y − s_y]`` of a block in ``dtype`` (in a reused buffer) and the
        buffer its GEMM writes to."""
        rows, d = x.shape[0], self.d_in
        buf, gram = self._buffers.get(dtype, (None, None))
        if buf is None or gram is None or buf.shape[0] < rows:
            # one dtype's scratch at a time: float32 mode leaves float64 after its probation
            self._buffers = {}
            # rows start on 64-byte boundaries (16 floats): the block products then ran ~1.25x
            # as fast with 2,885 columns (~1.05x with 1,154; float32, one thread)
            width = 1 + d + self.d_out
            padded = -(-width // 16) * 16
            z: dict[str, Any] = dict(dtype=dtype, device=self.device)
            buf = torch.empty(rows, padded, **z)[:, :width]
            buf[:, 0] = 1
            gram = torch.empty(1 + d, padded, **z)[:, :width]
            self._buffers[dtype] = (buf, gram)
        assert self.shift_x is not None and self.shift_y is not None
        block = buf[:rows]
        # subtracting a reference representable in ``dtype``: one rounding, as x.to(dtype) - s
        torch.sub(x, self.shift_x.to(dtype), out=block[:, 1 : 1 + d])
        torch.sub(y, self.shift_y.to(dtype), out=block[:, 1 + d :])
        return block, gram

    def _decide(self, n: int, acc: Tensor) -> None:
        """End of float32 mode's probation: keep float32 GEMMs if the (float64) sums of the
        first ``n`` rows give a system with cond <= 1e6, else warn and use float64 from now."""
        if not bool(torch.isfinite(acc).all()):
            return  # update refuses this chunk
        if tf32_matmuls(self.device):
            self._check = _FLOAT64
            log.warning(
                "TF32 matmuls are allowed on %s (torch.backends.cuda.matmul.fp32_precision = "
                "\"tf32\"): summing XᵀX with float64 GEMMs instead of float32 ones (set it to "
                "\"ieee\" for the faster float32 GEMMs)", self.device,
            )
            return
        d = self.d_in
        sum_x, sum_xx = self.sum_x + acc[0, 1 : 1 + d], self.sum_xx + acc[1:, 1 : 1 + d]
        cond = scaled_cond(self._system(float(n), sum_x, sum_xx))
        if cond <= FLOAT32_MAX_COND:
            self._check = _FLOAT32
            return
        self._check = _FLOAT64
        log.warning(
            "cond(XᵀX) ≈ %.1e on the first %d rows (%s, scaled): above %.0e, where float32 "
            "GEMMs would change the fit noticeably; summing the rest with float64 GEMMs "
            "(to ask for them directly: StreamingLstsq(gemm_dtype=torch.float64); in a run "
            "decompose.gemm_dtype = \"float64\")",
            cond, n, "centred" if self.bias else "uncentred", FLOAT32_MAX_COND,
        )

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
        self._n_float32 += int(o["n_float32"])
        for key in ("sum_x", "sum_y", "sum_xx", "sum_xy"):
            getattr(self, key).add_(o[key])
        if other.fell_back and self.gemm_dtype == torch.float32:
            self._check = _FLOAT64  # ill-conditioned rows somewhere: float64 from now on

    def state_dict(self) -> dict[str, Tensor]:
        """All state as tensors; the ``ADDITIVE_KEYS`` entries are sums (all-reducible)."""
        return {
            "n": self._n.clone(),
            "sum_x": self.sum_x.clone(),
            "sum_y": self.sum_y.clone(),
            "sum_xx": self.sum_xx.clone(),
            "sum_xy": self.sum_xy.clone(),
            "shift_x": shift_or_nan(self.shift_x, self.d_in, self.device),
            "shift_y": shift_or_nan(self.shift_y, self.d_out, self.device),
            "bias": torch.tensor(self.bias),
            "n_float32": torch.tensor(self._n_float32, dtype=torch.int64, device=self.device),
            # float64 mode made no check: a float32 accumulator loading this state makes it
            "gemm_check": torch.tensor(self._check if self.gemm_dtype == torch.float32
                                       else _PENDING, dtype=torch.int8, device=self.device),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = {"sum_xx": (self.d_in, self.d_in), "sum_xy": (self.d_in, self.d_out)}
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ShapeMismatchError(
                    f"{key} has shape {tuple(state[key].shape)}, expected {shape}"
                )
        z: dict[str, Any] = dict(dtype=F64, device=self.device)
        state = {k: v.to(device=self.device) for k, v in state.items()}
        shift_x = shift_from_state(state["shift_x"], self.device)
        shift_y = shift_from_state(state["shift_y"], self.device)
        if shift_x is not None and shift_y is not None:
            # Later float32 updates subtract the rounded reference: keep the sums about it.
            shift_x, shift_y = self._representable(shift_x), self._representable(shift_y)
            state = _recentred({k: v.to(F64) for k, v in state.items()}, shift_x, shift_y)
        self._n = state["n"].to(dtype=torch.int64).clone()
        for key in ("sum_x", "sum_y", "sum_xx", "sum_xy"):
            setattr(self, key, state[key].to(**z).clone())
        self.shift_x, self.shift_y = shift_x, shift_y
        self.bias = bool(state["bias"])
        # A state without these keys (saved before they existed, or built by hand) is taken as
        # this accumulator's mode throughout: float32 mode then counts every row as float32.
        f32 = self.gemm_dtype == torch.float32
        self._n_float32 = int(state.get("n_float32", state["n"] if f32 else torch.tensor(0)))
        check = int(state.get("gemm_check", torch.tensor(_FLOAT32)))
        self._check = check if f32 else _FLOAT64

    def _system(self, n: float, sum_x: Tensor, sum_xx: Tensor) -> Tensor:
        """The solve's XᵀX from shifted sums over ``n`` rows: centred with a bias, raw without."""
        sx = self.shift_x
        assert sx is not None, "the references are set with the first rows"
        if self.bias:
            a = sum_xx - torch.outer(sum_x, sum_x / n)
        else:
            a = moved_cross(sum_xx, sum_x, sum_x, sx, sx, n)
        return (a + a.T) / 2

    def _normal_equations(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A, B, mean_x, mean_y): A W = B is the system for the non-bias weights.

        With a bias A, B are the centred (co)variance sums; without, the raw sums rebuilt
        from the shifted ones.
        """
        n = float(self.n)
        sx, sy = self.shift_x, self.shift_y
        assert sx is not None and sy is not None, "the references are set with the first rows"
        mean_u, mean_v = self.sum_x / n, self.sum_y / n
        if self.bias:
            b = self.sum_xy - torch.outer(self.sum_x, mean_v)
        else:
            b = moved_cross(self.sum_xy, self.sum_x, self.sum_y, sx, sy, n)
        return self._system(n, self.sum_x, self.sum_xx), b, sx + mean_u, sy + mean_v

    def solve(self, ridge: float = 0.0, *, rcond: float = 1e-10) -> LinearProbe:
        """Solve the normal equations in float64; ``ridge`` adds ``ridge·I`` to the non-bias block.

        Cholesky on the Jacobi-scaled system (unit diagonal), whose condition number is then
        estimated (power and inverse iteration, O(d²) per step). When the factorisation fails,
        a pivot falls below ``rcond`` (a constant or all-zero dimension, duplicated or collinear
        columns, fewer rows than dimensions) or the estimated condition number exceeds 1e14
        (where float64 normal equations stop being accurate), the solver warns, naming the
        degenerate dimensions and the condition number, and falls back to an
        eigen-decomposition pseudo-inverse that drops scaled eigenvalues below ``rcond·λ_max``.
        Its predictions are those of the minimum-norm least-squares fit on standardized x
        (centred, unit variance; singular values below ``sqrt(rcond)·σ_max`` dropped), and the
        probe records ``regularized=True``, its rank and cond.
        """
        if self.n == 0:
            raise DarkMatterError("StreamingLstsq.solve: no rows were added")
        if not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
        a, b, mean_x, mean_y = self._normal_equations()
        a = a + ridge * torch.eye(self.d_in, dtype=F64, device=a.device)
        weight, rank, cond, regularized = solve_normal_equations(
            a, b, rcond=rcond, bias=self.bias, float32_sums=self._n_float32 > 0
        )
        bias = (
            mean_y - mean_x @ weight
            if self.bias
            else torch.zeros(self.d_out, dtype=F64, device=a.device)
        )
        return LinearProbe(weight=weight, bias=bias, rank=rank, cond=cond, regularized=regularized)


def _upper_products(block: Tensor, out: Tensor, k: int) -> Tensor:
    """``block[:, :k]ᵀ block`` into ``out``, computing XᵀX's blocks above the diagonal only.

    The first ``k`` columns are split in ``SYMMETRIC_PARTS``; part ``j``'s rows are multiplied
    with the columns from its own start on, and the blocks below the diagonal are copied from
    their transposes: with 2 parts, 1/4 fewer products for XᵀX (1/8 of the whole when
    d_out = d_in).
    """
    cuts = [round(j * k / SYMMETRIC_PARTS) for j in range(SYMMETRIC_PARTS + 1)]
    parts = [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
    for a, b in parts:
        torch.mm(block[:, a:b].T, block[:, a:], out=out[a:b, a:])
    for a, b in parts:
        out[b:k, a:b] = out[a:b, b:k].T
    return out


def _recentred(state: dict[str, Tensor], shift_x: Tensor, shift_y: Tensor) -> dict[str, Tensor]:
    """A StreamingLstsq state's sums re-expressed about new references (exact algebra).

    With b the old and a the new reference, x − a = (x − b) + dx where dx = b − a.
    """
    dx, dy = state["shift_x"] - shift_x, state["shift_y"] - shift_y
    n, sum_x, sum_y = state["n"].to(F64), state["sum_x"], state["sum_y"]
    out = dict(state)
    out["sum_xx"] = moved_cross(state["sum_xx"], sum_x, sum_x, dx, dx, n)
    out["sum_xy"] = moved_cross(state["sum_xy"], sum_x, sum_y, dx, dy, n)
    out["sum_x"] = sum_x + n * dx
    out["sum_y"] = sum_y + n * dy
    out["shift_x"], out["shift_y"] = shift_x, shift_y
    return out
