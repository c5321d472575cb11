"""The store driver: decompose SAEs of one hook on a harvested ``ActivationStore``.

Two streaming passes over the store's split rows: the first fits every SAE's probes in one
least-squares system, the second scores them on the held-out probe-test tokens and keeps their
per-token scalars (for bootstraps and per-token analyses). Under torchrun each rank takes a
contiguous share of each split and the sums are merged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from rich.progress import Progress

from sae_darkmatter import distributed
from sae_darkmatter._io import limited_heap_growth, resolve_device
from sae_darkmatter.config import DecomposeConfig
from sae_darkmatter.decompose.checks import Locate, check_sae, require_finite
from sae_darkmatter.decompose.core import (
    JACKKNIFE_GROUPS,
    HeldOutScores,
    SAEErrors,
    bootstrap_intervals,
    chunk_size,
    probe_system,
    split_probes,
)
from sae_darkmatter.decompose.results import DecompositionOutput
from sae_darkmatter.saes import SAE
from sae_darkmatter.splits import Splits
from sae_darkmatter.store import ActivationStore


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
    dtypes = {name: check_sae(name, sae, store, hook) for name, sae in saes.items()}
    device = resolve_device(cfg.device)
    errors = SAEErrors(saes, dtypes, hook, device)
    names = errors.names
    chunk = chunk_size(cfg, len(names), d)

    def locate(rows: np.ndarray) -> Locate:
        return lambda i: (store.column("context")[rows[i]], store.column("position")[rows[i]])

    # Under torchrun each rank takes a contiguous share of each split; sums are merged below.
    n_test = splits.probe_test.size
    mine = distributed.share(n_test)
    train_rows = splits.probe_train[distributed.share(splits.probe_train.size)]
    test_rows = splits.probe_test[mine]
    # chunk buffers must not pile up in a fragmented heap over long passes
    with limited_heap_growth(), Progress(disable=not progress or not distributed.is_main(),
                                        transient=True) as bar:
        task = bar.add_task(
            f"decompose {len(names)} SAE(s)", total=train_rows.size + 2 * test_rows.size
        )

        # Pass 1: one least-squares system, targets [e_1, ‖e_1‖², e_2, ‖e_2‖², ...].
        fit = probe_system(cfg, len(names), d, device)
        for rows, x in store.iter_chunks(hook, train_rows, chunk):
            require_finite(x, rows, store, hook)
            x = x.to(device)
            fit.update(x, errors.probe_targets(x, locate(rows)))
            bar.update(task, advance=x.shape[0])
        fit = distributed.merged(fit)
        joint = fit.solve(cfg.ridge)
        probes = split_probes(joint, names, d)

        # The test mean of x, for per-token ‖x − x̄‖² (the FVU denominator's terms).
        x_sum = torch.zeros(d, dtype=torch.float64, device=device)
        for rows, x in store.iter_chunks(hook, test_rows, chunk):
            require_finite(x, rows, store, hook)
            x_sum += x.to(device).double().sum(0)
            bar.update(task, advance=x.shape[0])
        x_mean = (distributed.summed(x_sum) / max(n_test, 1)).float()

        # Pass 2: held-out scores, streaming, plus per-token scalars.
        scores = {n: HeldOutScores(d, device=device) for n in names}
        groups = np.random.default_rng(0).permutation(n_test) % JACKKNIFE_GROUPS
        offset = mine.start
        per_token: dict[str, dict[str, list[np.ndarray]]] = {n: {} for n in names}
        x_centered: list[np.ndarray] = []
        for rows, x in store.iter_chunks(hook, test_rows, chunk):
            x = x.to(device)
            x_centered.append(_np((x - x_mean).square().sum(dim=1)))
            chunk_groups = torch.from_numpy(groups[offset : offset + x.shape[0]]).to(device)
            offset += x.shape[0]
            for name in names:
                x_hat, e, l0 = errors(name, x, locate(rows))
                e_hat, norm_sq, norm_pred = scores[name].update(
                    x, x_hat, e, l0, probes[name], chunk_groups
                )
                for key, value in (
                    ("err_sq", norm_sq[:, 0]),
                    ("linear_sq", e_hat.square().sum(dim=1)),
                    ("nonlinear_sq", (e - e_hat).square().sum(dim=1)),
                    ("err_sq_pred", norm_pred[:, 0]),
                    ("l0", l0.to(torch.int32)),
                ):
                    per_token[name].setdefault(key, []).append(_np(value))
            bar.update(task, advance=x.shape[0])

    x_centered_sq = distributed.concatenated(x_centered)
    out = {}
    for name in names:
        tokens = {"rows": splits.probe_test.astype(np.int64), "x_centered_sq": x_centered_sq}
        tokens |= {k: distributed.concatenated(per_token[name].get(k, []))
                   for k in ("err_sq", "linear_sq", "nonlinear_sq", "err_sq_pred", "l0")}
        metrics = distributed.merged(scores[name]).metrics(
            hook=hook, d_sae=errors.saes[name].d_sae, n_probe_train=fit.n, probe=joint, cfg=cfg,
            ci=bootstrap_intervals(tokens))
        out[name] = DecompositionOutput(metrics, *probes[name], tokens)
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; floats as float32 (per-token scalars, stored compactly)."""
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()
