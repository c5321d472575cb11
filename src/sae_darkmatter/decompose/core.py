"""The per-chunk arithmetic both decomposition drivers share (store: ``from_store``, LM:
``stream``).

- ``SAEErrors``: each SAE's reconstruction ``x̂``, error ``e = x − x̂`` and L0 of a chunk.
- ``probe_system`` / ``split_probes``: one least-squares system whose targets are every SAE's
  ``[e, ‖e‖²]`` side by side, so XᵀX is accumulated and factored once for all of them.
- ``HeldOutScores``: float64 sums of the held-out tokens, mergeable across ranks and resumable,
  from which ``Decomposition`` is built; ``bootstrap_intervals`` for per-token values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch

from sae_darkmatter.config import DecomposeConfig
from sae_darkmatter.decompose.checks import Locate, require_finite_at
from sae_darkmatter.decompose.results import Decomposition
from sae_darkmatter.linalg import LinearProbe, R2Accumulator, StreamingLstsq
from sae_darkmatter.linalg.scores import jackknife_interval
from sae_darkmatter.saes import SAE, latent_rows
from sae_darkmatter.saes.latents import encode_decode

_TARGET_BUDGET = 1 << 24  # floats per chunk of stacked probe targets (~64 MB in float32)
JACKKNIFE_GROUPS = 16  # token groups for the jackknife interval of the mean per-dim R²
N_BOOT = 200  # bootstrap resamples of held-out tokens for the other intervals


def chunk_size(cfg: DecomposeConfig, n_saes: int, d: int) -> int:
    """Rows per chunk: ``cfg.chunk_rows``, fewer when the stacked probe targets of ``n_saes``
    SAEs would pass ~64 MB."""
    return max(256, min(cfg.chunk_rows, _TARGET_BUDGET // (n_saes * (d + 1))))


def probe_system(
    cfg: DecomposeConfig, n_saes: int, d: int, device: torch.device, *, d_out: int | None = None
) -> StreamingLstsq:
    """The joint least-squares system of ``n_saes`` SAEs' probes (targets:
    ``SAEErrors.probe_targets``); transcoders' errors are ``d_out`` wide (default ``d``)."""
    width = d if d_out is None else d_out
    return StreamingLstsq(d, n_saes * (width + 1), bias=cfg.bias, device=device,
                          gemm_dtype=getattr(torch, cfg.gemm_dtype))


def split_probes(
    joint: LinearProbe, names: list[str], d: int
) -> dict[str, tuple[LinearProbe, LinearProbe]]:
    """Each SAE's (error probe, norm probe) out of the joint solve of ``probe_system``
    (``d``: the errors' width)."""
    probes = {}
    for i, name in enumerate(names):
        lo = i * (d + 1)
        probes[name] = (
            dataclasses.replace(
                joint, weight=joint.weight[:, lo : lo + d], bias=joint.bias[lo : lo + d]
            ),
            dataclasses.replace(
                joint,
                weight=joint.weight[:, lo + d : lo + d + 1],
                bias=joint.bias[lo + d : lo + d + 1],
            ),
        )
    return probes


class SAEErrors:
    """Reconstructions ``x̂``, errors ``e = x − x̂`` and L0 of several SAEs of one hook.

    Each SAE runs in the dtype ``check_width`` returned for it (``dtypes``), on ``device``; NaN or
    inf in a reconstruction raise ``NonFiniteError`` naming the tokens (``locate``).
    """

    def __init__(self, saes: Mapping[str, SAE], dtypes: Mapping[str, torch.dtype | None], hook: str,
                 device: torch.device) -> None:
        self.saes = {
            n: s.to(device) if isinstance(s, torch.nn.Module) else s for n, s in saes.items()
        }
        self.dtypes = dict(dtypes)
        self.hook = hook
        self.names = list(self.saes)

    def __call__(
        self, name: str, x: torch.Tensor, locate: Locate
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x̂, e, L0)`` of rows ``x``, encoded ``latent_rows`` at a time: a 1M-wide SAE's
        dense latents of a whole chunk would take tens of GB (TopK SAEs form none:
        ``encode_decode``)."""
        sae, dtype = self.saes[name], self.dtypes[name]
        step = latent_rows(sae.d_sae)
        parts, l0 = [], []
        with torch.inference_mode():
            for block in x.split(step):
                x_hat, latents = encode_decode(sae, block if dtype is None else block.to(dtype))
                parts.append(x_hat.to(x.dtype))
                l0.append(latents.l0())
        x_hat = parts[0] if len(parts) == 1 else torch.cat(parts)
        require_finite_at(x_hat, locate, what=f"SAE {name!r} reconstructions of hook {self.hook!r}",
                          advice=_sae_advice(dtype))
        return x_hat, x - x_hat, l0[0] if len(l0) == 1 else torch.cat(l0)

    def probe_targets(self, x: torch.Tensor, locate: Locate) -> torch.Tensor:
        """``[e_1, ‖e_1‖², e_2, ‖e_2‖², ...]``: the targets of ``probe_system`` for rows ``x``."""
        targets = []
        for name in self.names:
            _, e, _ = self(name, x, locate)
            targets += [e, e.square().sum(dim=1, keepdim=True)]
        return torch.cat(targets, dim=1)


class HeldOutScores:
    """One SAE's (or transcoder's) held-out sums, from which ``Decomposition`` is built.

    R² accumulators of ``x̂`` (FVU), ``x̂ + ê`` (nonlinear FVU), ``ê`` of ``e``, the norm
    probe's ``‖e‖²``, the error probe per jackknife group, and ΣL0: float64 sums whose size does
    not depend on the number of tokens. Mergeable (``distributed.merged``) and resumable
    (``state_dict``).
    """

    KINDS = ("sae", "lin", "err", "norm")

    def __init__(
        self, d: int, n_groups: int = JACKKNIFE_GROUPS, *, device: str | torch.device = "cpu"
    ) -> None:
        self.d, self.device = d, torch.device(device)
        self.accs = {
            k: R2Accumulator(1 if k == "norm" else d, device=self.device) for k in self.KINDS
        }
        self.groups = [R2Accumulator(d, device=self.device) for _ in range(n_groups)]
        self.l0_sum = torch.zeros((), dtype=torch.int64, device=self.device)

    def update(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        e: torch.Tensor,
        l0: torch.Tensor,
        probes: tuple[LinearProbe, LinearProbe],
        groups: torch.Tensor,
        *,
        y: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add held-out rows (``groups``: each row's jackknife group).

        ``x`` is what the probes read; ``y`` the target that ``x_hat`` approximates, ``e = y −
        x_hat`` (a transcoder's output; None: ``x`` itself, an SAE). Returns (ê, ‖e‖², the norm
        probe's prediction of ‖e‖²)."""
        err_probe, norm_probe = probes
        target = x if y is None else y
        e_hat = err_probe.predict(x)
        norm_sq = e.square().sum(dim=1, keepdim=True)
        norm_pred = norm_probe.predict(x)
        self.accs["sae"].update(target, x_hat)
        self.accs["lin"].update(target, x_hat + e_hat)
        self.accs["err"].update(e, e_hat)
        self.accs["norm"].update(norm_sq, norm_pred)
        for g, acc in enumerate(self.groups):
            mask = groups == g
            if mask.any():
                acc.update(e[mask], e_hat[mask])
        self.l0_sum += l0.sum()
        return e_hat, norm_sq, norm_pred

    def _parts(self) -> dict[str, R2Accumulator]:
        return {**self.accs, **{f"group{g}": acc for g, acc in enumerate(self.groups)}}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            f"{part}.{k}": v
            for part, acc in self._parts().items()
            for k, v in acc.state_dict().items()
        }
        return state | {"l0_sum": self.l0_sum.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for part, acc in self._parts().items():
            acc.load_state_dict({k.removeprefix(f"{part}."): v for k, v in state.items()
                                 if k.startswith(f"{part}.")})
        self.l0_sum = state["l0_sum"].to(dtype=torch.int64, device=self.device).clone()

    def merge(self, other: HeldOutScores) -> None:
        for acc, theirs in zip(self._parts().values(), other._parts().values(), strict=True):
            acc.merge(theirs)
        self.l0_sum += other.l0_sum.to(self.device)

    def metrics(
        self,
        *,
        hook: str,
        d_sae: int,
        n_probe_train: int,
        probe: LinearProbe,
        cfg: DecomposeConfig,
        ci: Mapping[str, tuple[float, float]] | None = None,
        hook_out: str | None = None,
        d_in: int | None = None,
    ) -> Decomposition:
        """The held-out metrics; ``probe`` is the solve the probes came from (rank, cond).

        ``ci`` holds intervals computed elsewhere (bootstraps); the jackknife interval of
        ``r2_error_mean_dim`` is added here. A transcoder gives its output hook ``hook_out``
        and its input width ``d_in`` (the scores' width ``d`` is then its output's).
        """
        sae_acc, lin_acc, err_acc, norm_acc = (self.accs[k] for k in self.KINDS)
        fvu, fvu_nl = sae_acc.fvu(), lin_acc.fvu()
        return Decomposition(
            hook=hook,
            d_in=self.d if d_in is None else d_in,
            hook_out=hook_out,
            d_out=None if hook_out is None else self.d,
            d_sae=d_sae,
            n_probe_train=n_probe_train,
            n_probe_test=sae_acc.n,
            l0=int(self.l0_sum) / sae_acc.n if sae_acc.n else math.nan,
            fvu=fvu,
            fvu_linear=fvu - fvu_nl,
            fvu_nonlinear=fvu_nl,
            linear_share=1.0 - err_acc.sse() / sae_acc.sse() if sae_acc.sse() > 0 else math.nan,
            r2_error_mean_dim=err_acc.r2_mean_dim(),
            r2_error_pooled=err_acc.r2_pooled(),
            r2_error_norm=norm_acc.r2_pooled(),
            bias=cfg.bias,
            ridge=cfg.ridge,
            ci={
                **(ci or {}),
                "r2_error_mean_dim": _jackknife_interval(self.groups, err_acc.r2_mean_dim()),
            },
            probe_rank=probe.rank,
            probe_cond=probe.cond if probe.cond is not None and math.isfinite(probe.cond) else None,
            probe_regularized=probe.regularized,
        )


def _sae_advice(dtype: torch.dtype | None) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return (
            f"the activations there are finite, so the SAE's {str(dtype).removeprefix('torch.')} "
            "arithmetic overflowed or its weights hold NaN/inf; convert the SAE to float32 "
            "(sae.float()) or check its weights"
        )
    return "the activations there are finite, so the SAE's weights hold NaN/inf or overflow"


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
    draws: dict[str, list[float]] = {
        k: [] for k in ("fvu", "fvu_linear", "fvu_nonlinear", "linear_share", "r2_error_norm")
    }
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        s_err, s_nl, s_xc = w @ err, w @ nl, w @ xc
        mean = (w @ err) / n
        draws["fvu"].append(float(s_err / s_xc))
        draws["fvu_nonlinear"].append(float(s_nl / s_xc))
        draws["fvu_linear"].append(float((s_err - s_nl) / s_xc))
        draws["linear_share"].append(float(1 - s_nl / s_err))
        draws["r2_error_norm"].append(float(1 - (w @ (err - pred) ** 2) / (w @ (err - mean) ** 2)))
    return {
        k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items()
    }


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
    return jackknife_interval(thetas, full)
