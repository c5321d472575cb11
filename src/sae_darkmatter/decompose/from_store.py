"""The store driver: decompose SAEs of one hook on a harvested ``ActivationStore``.

Two streaming passes over the store's split rows: the first fits every SAE's probes in one
least-squares system, the second scores them on the held-out probe-test tokens and keeps their
per-token scalars (for bootstraps and per-token analyses). Under torchrun each rank takes a
contiguous share of each split and the sums are merged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

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
    dtypes = {name: check_sae(name, sae, store, hook) for name, sae in saes.items()}
    device = resolve_device(cfg.device)
    errors = SAEErrors(saes, dtypes, hook, device)

    def chunk_errors(x: torch.Tensor, y: torch.Tensor, locate: Locate) -> Iterator[Errors]:
        for name in errors.names:
            yield (name, *errors(name, x, locate))

    widths = {name: sae.d_sae for name, sae in errors.saes.items()}
    return decompose_rows(store, chunk_errors, widths, splits, cfg, hook=hook,
                          progress=progress, what=f"{len(widths)} SAE(s)")


# One replacement's (name, ŷ, e = y − ŷ, L0 per row) of a chunk.
Errors = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]
# A chunk's errors of every replacement decomposed together, from (x, y, locate).
ChunkErrors = Callable[[torch.Tensor, torch.Tensor, Locate], Iterator[Errors]]


def decompose_rows(
    store: ActivationStore,
    chunk_errors: ChunkErrors,
    widths: Mapping[str, int],
    splits: Splits,
    cfg: DecomposeConfig,
    *,
    hook: str,
    hook_out: str | None = None,
    progress: bool = True,
    what: str = "",
) -> dict[str, DecompositionOutput]:
    """The two passes for replacements of ``x`` at ``hook`` predicting ``y`` at ``hook_out``
    (transcoders; None: SAEs, ``y = x``), named as ``widths`` (their ``d_sae``) names them and
    in that order; ``chunk_errors`` gives their errors of a chunk. The probes read ``x``; FVU
    is relative to ``y``'s variance. The store's rows are tokens, so row ``i`` of both hooks is
    the same token: both are read with the same rows and chunks.
    """
    hooks = (hook, hook_out or hook)
    d_in, d = store.d(hook), store.d(hooks[1])
    names = list(widths)
    device = resolve_device(cfg.device)
    chunk = chunk_size(cfg, len(names), max(d_in, d))

    def locate(rows: np.ndarray) -> Locate:
        return lambda i: (store.column("context")[rows[i]], store.column("position")[rows[i]])

    def read(rows: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        for r, x, y in _aligned_chunks(store, rows, chunk, hooks):
            x = x.to(device)
            yield r, x, x if y is None else y.to(device)

    # Under torchrun each rank takes a contiguous share of each split; sums are merged below.
    n_test = splits.probe_test.size
    mine = distributed.share(n_test)
    train_rows = splits.probe_train[distributed.share(splits.probe_train.size)]
    test_rows = splits.probe_test[mine]
    # chunk buffers must not pile up in a fragmented heap over long passes
    with limited_heap_growth(), Progress(disable=not progress or not distributed.is_main(),
                                        transient=True) as bar:
        task = bar.add_task(f"decompose {what}", total=train_rows.size + 2 * test_rows.size)

        # Pass 1: one least-squares system, targets [e_1, ‖e_1‖², e_2, ‖e_2‖², ...].
        fit = probe_system(cfg, len(names), d_in, device, d_out=d)
        for rows, x, y in read(train_rows):
            targets = [t for _, _, e, _ in chunk_errors(x, y, locate(rows))
                       for t in (e, e.square().sum(dim=1, keepdim=True))]
            fit.update(x, torch.cat(targets, dim=1))
            bar.update(task, advance=x.shape[0])
        fit = distributed.merged(fit)
        joint = fit.solve(cfg.ridge)
        probes = split_probes(joint, names, d)

        # The test mean of y, for per-token ‖y − ȳ‖² (the FVU denominator's terms).
        y_sum = torch.zeros(d, dtype=torch.float64, device=device)
        for rows, y in store.iter_chunks(hooks[1], test_rows, chunk):
            require_finite(y, rows, store, hooks[1])
            y_sum += y.to(device).double().sum(0)
            bar.update(task, advance=y.shape[0])
        y_mean = (distributed.summed(y_sum) / max(n_test, 1)).float()

        # Pass 2: held-out scores, streaming, plus per-token scalars.
        scores = {n: HeldOutScores(d, device=device) for n in names}
        groups = np.random.default_rng(0).permutation(n_test) % JACKKNIFE_GROUPS
        offset = mine.start
        per_token: dict[str, dict[str, list[np.ndarray]]] = {n: {} for n in names}
        y_centered: list[np.ndarray] = []
        for rows, x, y in read(test_rows):
            y_centered.append(_np((y - y_mean).square().sum(dim=1)))
            chunk_groups = torch.from_numpy(groups[offset : offset + x.shape[0]]).to(device)
            offset += x.shape[0]
            for name, y_hat, e, l0 in chunk_errors(x, y, locate(rows)):
                e_hat, norm_sq, norm_pred = scores[name].update(
                    x, y_hat, e, l0, probes[name], chunk_groups, y=None if y is x else y
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

    y_centered_sq = distributed.concatenated(y_centered)
    other = {} if hook_out is None else {"hook_out": hook_out, "d_in": d_in}
    out = {}
    for name in names:
        tokens = {"rows": splits.probe_test.astype(np.int64), "x_centered_sq": y_centered_sq}
        tokens |= {k: distributed.concatenated(per_token[name].get(k, []))
                   for k in ("err_sq", "linear_sq", "nonlinear_sq", "err_sq_pred", "l0")}
        metrics = distributed.merged(scores[name]).metrics(
            hook=hook, d_sae=widths[name], n_probe_train=fit.n, probe=joint, cfg=cfg,
            ci=bootstrap_intervals(tokens), **other)
        out[name] = DecompositionOutput(metrics, *probes[name], tokens)
    return out


def _aligned_chunks(
    store: ActivationStore, rows: np.ndarray, chunk: int, hooks: tuple[str, str]
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]]:
    """``(rows, x, y)`` chunks of both hooks (``y`` None when it is ``x``'s hook), checked for
    NaN/inf. Both readers get the same rows and chunk size, so their chunks hold the same
    tokens."""
    hook_in, hook_out = hooks
    xs = store.iter_chunks(hook_in, rows, chunk)
    if hook_out == hook_in:
        for r, x in xs:
            require_finite(x, r, store, hook_in)
            yield r, x, None
        return
    for (r, x), (r_out, y) in zip(xs, store.iter_chunks(hook_out, rows, chunk), strict=True):
        assert np.array_equal(r, r_out), "the two hooks' chunks must hold the same rows"
        require_finite(x, r, store, hook_in)
        require_finite(y, r, store, hook_out)
        yield r, x, y


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; floats as float32 (per-token scalars, stored compactly)."""
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()
