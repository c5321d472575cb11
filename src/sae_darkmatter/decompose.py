"""Error decomposition of one SAE on one hook: linear vs nonlinear dark matter.

With ``e = x − x̂`` the SAE error, a least-squares probe ``ê = [x, 1]·W`` is fit on the
probe-train tokens, and everything reported is scored on the disjoint probe-test tokens:

- ``fvu``            Σ‖e‖² / Σ‖x − x̄‖²           (the SAE's fraction of variance unexplained)
- ``fvu_nonlinear``  Σ‖e − ê‖² / Σ‖x − x̄‖²       (what no linear function of x predicts)
- ``fvu_linear``     fvu − fvu_nonlinear
- ``linear_share``   1 − Σ‖e − ê‖² / Σ‖e‖²        (share of the error that is linearly predictable)
- ``r2_error_mean_dim`` mean over dimensions of per-dimension R² of ê (the paper's headline)
- ``r2_error_pooled`` 1 − Σ‖e − ê‖² / Σ‖e − ē‖²
- ``r2_error_norm``  R² of predicting ‖e‖² from [x, 1] (its own probe)

Both passes stream over the store in chunks; memory does not grow with the number of tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from safetensors.torch import save_file

from ._io import atomic_path, resolve_device
from .config import DecomposeConfig
from .errors import ShapeMismatchError
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

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)


@dataclass(frozen=True)
class DecompositionOutput:
    """Metrics, the fitted probes, and a sample of test tokens for plots."""

    metrics: Decomposition
    error_probe: LinearProbe
    norm_probe: LinearProbe
    sample_rows: np.ndarray
    sample_norm_sq: np.ndarray
    sample_norm_sq_pred: np.ndarray

    def save(self, path: str | Path) -> None:
        """Write probes and the plot sample as one safetensors file (atomic)."""
        tensors = {
            "error_probe.weight": self.error_probe.weight,
            "error_probe.bias": self.error_probe.bias,
            "norm_probe.weight": self.norm_probe.weight,
            "norm_probe.bias": self.norm_probe.bias,
            "sample.rows": torch.from_numpy(self.sample_rows),
            "sample.norm_sq": torch.from_numpy(self.sample_norm_sq),
            "sample.norm_sq_pred": torch.from_numpy(self.sample_norm_sq_pred),
        }
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


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
    hook = hook or next(iter(store.hooks))
    d = store.d(hook)
    if sae.d_in != d:
        raise ShapeMismatchError(
            f"SAE d_in is {sae.d_in} but the store's '{hook}' activations have width {d}"
        )
    device = resolve_device(cfg.device)
    sae = sae.to(device) if isinstance(sae, torch.nn.Module) else sae

    def errors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            z = sae.encode(x)
            x_hat = sae.decode(z)
        return x_hat, x - x_hat, (z != 0).sum(dim=1)

    total = splits.probe_train.size + splits.probe_test.size
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"decompose d_sae={sae.d_sae}", total=total)

        # One fit for both targets [e, ‖e‖²]: XᵀX is shared, so this costs one accumulation.
        fit = StreamingLstsq(d, d + 1, bias=cfg.bias, device=device)
        for _, x in store.iter_chunks(hook, splits.probe_train, cfg.chunk_rows):
            x = x.to(device)
            _, e, _ = errors(x)
            fit.update(x, torch.cat([e, e.square().sum(dim=1, keepdim=True)], dim=1))
            bar.update(task, advance=x.shape[0])
        both = fit.solve(cfg.ridge)
        err_probe = LinearProbe(both.weight[:, :d], both.bias[:d], both.rank)
        norm_probe = LinearProbe(both.weight[:, d:], both.bias[d:], both.rank)

        rng = np.random.default_rng(0)
        n_sample = min(cfg.n_scatter, splits.probe_test.size)
        sample = np.sort(rng.choice(splits.probe_test, n_sample, replace=False))
        sample_true, sample_pred = [], []

        sae_acc, lin_acc, err_acc = (R2Accumulator(d, device=device) for _ in range(3))
        norm_acc = R2Accumulator(1, device=device)
        active = 0
        for rows, x in store.iter_chunks(hook, splits.probe_test, cfg.chunk_rows):
            x = x.to(device)
            x_hat, e, l0 = errors(x)
            e_hat = err_probe.predict(x)
            norm_sq = e.square().sum(dim=1, keepdim=True)
            norm_pred = norm_probe.predict(x)
            sae_acc.update(x, x_hat)
            lin_acc.update(x, x_hat + e_hat)
            err_acc.update(e, e_hat)
            norm_acc.update(norm_sq, norm_pred)
            active += int(l0.sum())
            picked = np.isin(rows, sample)
            if picked.any():
                mask = torch.from_numpy(picked).to(device)
                sample_true.append(norm_sq[mask, 0].double().cpu().numpy())
                sample_pred.append(norm_pred[mask, 0].double().cpu().numpy())
            bar.update(task, advance=x.shape[0])

    fvu = sae_acc.fvu()
    fvu_nl = lin_acc.fvu()
    metrics = Decomposition(
        hook=hook,
        d_in=d,
        d_sae=sae.d_sae,
        n_probe_train=fit.n,
        n_probe_test=sae_acc.n,
        l0=active / max(sae_acc.n, 1),
        fvu=fvu,
        fvu_linear=fvu - fvu_nl,
        fvu_nonlinear=fvu_nl,
        linear_share=1.0 - err_acc.sse() / sae_acc.sse() if sae_acc.sse() > 0 else math.nan,
        r2_error_mean_dim=err_acc.r2_mean_dim(),
        r2_error_pooled=err_acc.r2_pooled(),
        r2_error_norm=norm_acc.r2_pooled(),
        bias=cfg.bias,
        ridge=cfg.ridge,
    )
    return DecompositionOutput(
        metrics=metrics,
        error_probe=err_probe,
        norm_probe=norm_probe,
        sample_rows=sample,
        sample_norm_sq=np.concatenate(sample_true) if sample_true else np.zeros(0),
        sample_norm_sq_pred=np.concatenate(sample_pred) if sample_pred else np.zeros(0),
    )
