"""Error decomposition of SAEs on one hook: linear vs nonlinear dark matter.

With ``e = x − x̂`` the SAE error, a least-squares probe ``ê = [x, 1]·W`` is fit on the
probe-train tokens, and everything reported is scored on the disjoint probe-test tokens:

- ``fvu``            Σ‖e‖² / Σ‖x − x̄‖²           (the SAE's fraction of variance unexplained)
- ``fvu_nonlinear``  Σ‖e − ê‖² / Σ‖x − x̄‖²       (what no linear function of x predicts)
- ``fvu_linear``     fvu − fvu_nonlinear
- ``linear_share``   1 − Σ‖e − ê‖² / Σ‖e‖²        (share of the error that is linearly predictable)
- ``r2_error_mean_dim`` mean over dimensions of per-dimension R² of ê (the paper's headline)
- ``r2_error_pooled`` 1 − Σ‖e − ê‖² / Σ‖e − ē‖²
- ``r2_error_norm``  R² of predicting ‖e‖² from [x, 1] (its own probe)

Many SAEs of one hook are decomposed together: one pass fits all their probes (one least-squares
system with the error targets of every SAE side by side, so XᵀX is accumulated and factored
once), a second pass scores them. Both passes stream over the store in chunks; memory grows only
with the per-token scalars kept for the held-out tokens (for bootstraps and per-token analyses).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from safetensors import safe_open
from safetensors.torch import save_file

from ._io import atomic_path, resolve_device
from .config import DecomposeConfig
from .errors import DarkMatterError, ShapeMismatchError
from .linalg import LinearProbe, R2Accumulator, StreamingLstsq
from .saes import SAE
from .splits import Splits
from .store import ActivationStore


@dataclass(frozen=True)
class Decomposition:
    """Held-out metrics of one SAE's error decomposition (see the module docstring)."""

    hook: str
    d_in: int
    d_sae: int
    n_probe_train: int
    n_probe_test: int
    l0: float
    fvu: float
    fvu_linear: float
    fvu_nonlinear: float
    linear_share: float
    r2_error_mean_dim: float
    r2_error_pooled: float
    r2_error_norm: float
    bias: bool
    ridge: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DecompositionOutput:
    """Metrics, the fitted probes, and per-token values on the held-out tokens.

    ``tokens`` maps ``rows`` (global store rows of the probe-test split, ascending), ``err_sq``
    (‖e‖²), ``linear_sq`` (‖ê‖²), ``nonlinear_sq`` (‖e − ê‖²), ``err_sq_pred`` (the norm
    probe's prediction of ‖e‖²), ``x_centered_sq`` (‖x − x̄‖², x̄ the test mean) and ``l0``
    to arrays aligned with ``rows``.
    """

    metrics: Decomposition
    error_probe: LinearProbe
    norm_probe: LinearProbe
    tokens: dict[str, np.ndarray]

    def save(self, path: str | Path) -> None:
        """Write probes and per-token values as one safetensors file (atomic)."""
        tensors = {
            "error_probe.weight": self.error_probe.weight,
            "error_probe.bias": self.error_probe.bias,
            "norm_probe.weight": self.norm_probe.weight,
            "norm_probe.bias": self.norm_probe.bias,
            **{f"test.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.tokens.items()},
        }
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


@dataclass(frozen=True)
class SavedDecomposition:
    """One ``<name>.json`` of a decompose folder with the per-token arrays of its safetensors.

    ``tokens`` holds the ``test.*`` arrays without their prefix (see ``DecompositionOutput``);
    ``probe_path`` is the safetensors file, for the probes.
    """

    name: str
    info: dict[str, Any]
    tokens: dict[str, np.ndarray]
    probe_path: Path

    @property
    def width(self) -> int:
        return int(self.info["metrics"]["d_sae"])

    @property
    def k(self) -> int | None:
        k = self.info.get("sae", {}).get("k")
        return None if k is None else int(k)


TOKEN_ARRAYS = ("rows", "err_sq", "linear_sq", "nonlinear_sq", "err_sq_pred", "x_centered_sq", "l0")


def load_decompositions(decompose_dir: str | Path) -> list[SavedDecomposition]:
    """Every decomposition result in ``decompose_dir``, sorted by (width, k, name).

    Other JSON files there are ignored. A missing safetensors file, or one without the
    per-token arrays (written by an older version), is an error that says to rerun decompose.
    """
    folder = Path(decompose_dir)
    out = []
    for path in sorted(folder.glob("*.json")):
        info = json.loads(path.read_text())
        if not isinstance(info, dict) or "probe_file" not in info or "metrics" not in info:
            continue
        probe = folder / info["probe_file"]
        if not probe.is_file():
            raise DarkMatterError(f"{path} names {probe}, which does not exist; rerun decompose")
        with safe_open(str(probe), framework="np") as fh:
            missing = [k for k in TOKEN_ARRAYS if f"test.{k}" not in fh.keys()]  # noqa: SIM118
            if missing:
                raise DarkMatterError(
                    f"{probe} lacks the per-token arrays {missing} (an older version wrote it); "
                    "rerun decompose"
                )
            tokens = {k: fh.get_tensor(f"test.{k}") for k in TOKEN_ARRAYS}
        out.append(SavedDecomposition(info.get("name", path.stem), info, tokens, probe))
    if not out:
        raise DarkMatterError(
            f"no decomposition results (<name>.json with a probe file) in {folder}; "
            "run 'darkmatter decompose' first"
        )
    return sorted(out, key=lambda d: (d.width, d.k if d.k is not None else -1, d.name))


_TARGET_BUDGET = 1 << 24  # floats per chunk of stacked probe targets (~64 MB in float32)
JACKKNIFE_GROUPS = 16  # token groups for the jackknife interval of the mean per-dim R²
N_BOOT = 200  # bootstrap resamples of held-out tokens for the other intervals


def decompose(
    store: ActivationStore,
    sae: SAE,
    splits: Splits,
    cfg: DecomposeConfig = DecomposeConfig(),
    *,
    hook: str | None = None,
    progress: bool = True,
) -> DecompositionOutput:
    """Fit the linear error probes on ``splits.probe_train`` and score on ``splits.probe_test``."""
    return decompose_many(store, {"sae": sae}, splits, cfg, hook=hook, progress=progress)["sae"]


def decompose_many(
    store: ActivationStore,
    saes: Mapping[str, SAE],
    splits: Splits,
    cfg: DecomposeConfig = DecomposeConfig(),
    *,
    hook: str | None = None,
    progress: bool = True,
) -> dict[str, DecompositionOutput]:
    """``decompose`` for several SAEs of one hook, sharing the reads and the factored XᵀX."""
    hook = hook or next(iter(store.hooks))
    d = store.d(hook)
    for name, sae in saes.items():
        if sae.d_in != d:
            raise ShapeMismatchError(
                f"SAE {name!r} has d_in {sae.d_in} but the store's '{hook}' activations have "
                f"width {d}"
            )
    device = resolve_device(cfg.device)
    saes = {n: s.to(device) if isinstance(s, torch.nn.Module) else s for n, s in saes.items()}
    names = list(saes)
    chunk = max(256, min(cfg.chunk_rows, _TARGET_BUDGET // (len(names) * (d + 1))))

    def errors(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            z = sae.encode(x)
            x_hat = sae.decode(z)
        return x_hat, x - x_hat, (z != 0).sum(dim=1)

    n_train, n_test = splits.probe_train.size, splits.probe_test.size
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"decompose {len(names)} SAE(s)", total=n_train + 2 * n_test)

        # Pass 1: one least-squares system, targets [e_1, ‖e_1‖², e_2, ‖e_2‖², ...].
        fit = StreamingLstsq(d, len(names) * (d + 1), bias=cfg.bias, device=device)
        for _, x in store.iter_chunks(hook, splits.probe_train, chunk):
            x = x.to(device)
            targets = []
            for name in names:
                _, e, _ = errors(saes[name], x)
                targets += [e, e.square().sum(dim=1, keepdim=True)]
            fit.update(x, torch.cat(targets, dim=1))
            bar.update(task, advance=x.shape[0])
        both = fit.solve(cfg.ridge)
        probes = {}
        for i, name in enumerate(names):
            lo = i * (d + 1)
            probes[name] = (
                LinearProbe(both.weight[:, lo : lo + d], both.bias[lo : lo + d], both.rank),
                LinearProbe(both.weight[:, lo + d : lo + d + 1], both.bias[lo + d : lo + d + 1],
                            both.rank),
            )

        # The test mean of x, for per-token ‖x − x̄‖² (the FVU denominator's terms).
        x_sum = torch.zeros(d, dtype=torch.float64, device=device)
        for _, x in store.iter_chunks(hook, splits.probe_test, chunk):
            x_sum += x.to(device).double().sum(0)
            bar.update(task, advance=x.shape[0])
        x_mean = (x_sum / max(n_test, 1)).float()

        # Pass 2: held-out scores, streaming, plus per-token scalars.
        accs = {n: [R2Accumulator(d, device=device) for _ in range(3)] + [R2Accumulator(1, device=device)]
                for n in names}
        groups = np.random.default_rng(0).permutation(n_test) % JACKKNIFE_GROUPS
        group_accs = {n: [R2Accumulator(d, device=device) for _ in range(JACKKNIFE_GROUPS)]
                      for n in names}
        offset = 0
        per_token: dict[str, dict[str, list[np.ndarray]]] = {n: {} for n in names}
        x_centered: list[np.ndarray] = []
        for _, x in store.iter_chunks(hook, splits.probe_test, chunk):
            x = x.to(device)
            x_centered.append(_np((x - x_mean).square().sum(dim=1)))
            chunk_groups = torch.from_numpy(groups[offset : offset + x.shape[0]]).to(device)
            offset += x.shape[0]
            for name in names:
                x_hat, e, l0 = errors(saes[name], x)
                err_probe, norm_probe = probes[name]
                e_hat = err_probe.predict(x)
                norm_sq = e.square().sum(dim=1, keepdim=True)
                norm_pred = norm_probe.predict(x)
                sae_acc, lin_acc, err_acc, norm_acc = accs[name]
                sae_acc.update(x, x_hat)
                lin_acc.update(x, x_hat + e_hat)
                err_acc.update(e, e_hat)
                norm_acc.update(norm_sq, norm_pred)
                for g, acc in enumerate(group_accs[name]):
                    mask = chunk_groups == g
                    if mask.any():
                        acc.update(e[mask], e_hat[mask])
                for key, value in (
                    ("err_sq", norm_sq[:, 0]),
                    ("linear_sq", e_hat.square().sum(dim=1)),
                    ("nonlinear_sq", (e - e_hat).square().sum(dim=1)),
                    ("err_sq_pred", norm_pred[:, 0]),
                    ("l0", l0.to(torch.int32)),
                ):
                    per_token[name].setdefault(key, []).append(_np(value))
            bar.update(task, advance=x.shape[0])

    x_centered_sq = np.concatenate(x_centered) if x_centered else np.zeros(0, np.float32)
    out = {}
    for name in names:
        sae_acc, lin_acc, err_acc, norm_acc = accs[name]
        tokens = {"rows": splits.probe_test.astype(np.int64), "x_centered_sq": x_centered_sq}
        tokens |= {k: np.concatenate(v) for k, v in per_token[name].items()}
        fvu, fvu_nl = sae_acc.fvu(), lin_acc.fvu()
        metrics = Decomposition(
            hook=hook,
            d_in=d,
            d_sae=saes[name].d_sae,
            n_probe_train=fit.n,
            n_probe_test=sae_acc.n,
            l0=float(tokens["l0"].mean()) if sae_acc.n else math.nan,
            fvu=fvu,
            fvu_linear=fvu - fvu_nl,
            fvu_nonlinear=fvu_nl,
            linear_share=1.0 - err_acc.sse() / sae_acc.sse() if sae_acc.sse() > 0 else math.nan,
            r2_error_mean_dim=err_acc.r2_mean_dim(),
            r2_error_pooled=err_acc.r2_pooled(),
            r2_error_norm=norm_acc.r2_pooled(),
            bias=cfg.bias,
            ridge=cfg.ridge,
            ci={**bootstrap_intervals(tokens),
                "r2_error_mean_dim": _jackknife_interval(group_accs[name], err_acc.r2_mean_dim())},
        )
        out[name] = DecompositionOutput(metrics, *probes[name], tokens)
    return out


def bootstrap_intervals(
    tokens: Mapping[str, np.ndarray], *, n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of the per-token-decomposable metrics, resampling test tokens.

    ``x_centered_sq`` keeps the full-sample mean (an O(1/n) approximation per resample).
    """
    n = tokens["err_sq"].size
    if n < 2:
        return {}
    rng = np.random.default_rng(seed)
    err, nl = tokens["err_sq"].astype(np.float64), tokens["nonlinear_sq"].astype(np.float64)
    xc, pred = tokens["x_centered_sq"].astype(np.float64), tokens["err_sq_pred"].astype(np.float64)
    draws: dict[str, list[float]] = {k: [] for k in
                                     ("fvu", "fvu_linear", "fvu_nonlinear", "linear_share", "r2_error_norm")}
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        s_err, s_nl, s_xc = w @ err, w @ nl, w @ xc
        mean = (w @ err) / n
        draws["fvu"].append(s_err / s_xc)
        draws["fvu_nonlinear"].append(s_nl / s_xc)
        draws["fvu_linear"].append((s_err - s_nl) / s_xc)
        draws["linear_share"].append(1 - s_nl / s_err)
        draws["r2_error_norm"].append(1 - (w @ (err - pred) ** 2) / (w @ (err - mean) ** 2))
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items()}


def _jackknife_interval(groups: list[R2Accumulator], full: float) -> tuple[float, float]:
    """Delete-one-group jackknife 95 % interval of the mean per-dimension R² (normal approx.)."""
    g = len(groups)
    thetas = []
    for left_out in range(g):
        acc = R2Accumulator(groups[0].d, device=groups[0].device)
        for i, other in enumerate(groups):
            if i != left_out and other.n:
                acc.merge(other)
        thetas.append(acc.r2_mean_dim())
    t = np.asarray(thetas)
    se = float(np.sqrt((g - 1) / g * np.sum((t - t.mean()) ** 2)))
    return (full - 1.96 * se, full + 1.96 * se)


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; floats as float32 (per-token scalars, stored compactly)."""
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()
