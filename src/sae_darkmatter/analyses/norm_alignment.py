"""Why is ‖e‖² linear in x? The paper's Fig. 14 argument, checked latent by latent.

If every latent fires with a typical magnitude c_i on near-orthogonal decoder directions d_i,
then ‖r‖² = Σ w_i² ≈ Σ c_i w_i is linear in the reconstruction r, with probe a* = Σ c_i d_i, so
a*·d_i ≈ c_i: each latent's mean activation should match the probe projected on its direction.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from scipy import stats

from sae_darkmatter.linalg import StreamingLstsq
from sae_darkmatter.saes import AffineSAE, latent_rows
from sae_darkmatter.store import ActivationStore

MIN_ACTIVE = 5  # latents active fewer times are left out of the alignment correlations


@torch.no_grad()
def reconstruction_norm_probe(
    sae: AffineSAE,
    store: ActivationStore,
    rows: np.ndarray,
    *,
    hook: str | None = None,
    max_rows: int = 20000,
) -> torch.Tensor:
    """The paper's a* (Fig. 14): least squares ``‖r‖² ≈ a*·r + b`` with ``r = Sae(x) − b_dec``.

    If every latent fires with a typical magnitude c_i on near-orthogonal directions d_i, then
    ‖r‖² = Σ w_i² ≈ Σ c_i w_i, which is linear in r with a* = Σ c_i d_i, so a*·d_i ≈ c_i.
    """
    hook = hook or next(iter(store.hooks))
    rows = np.asarray(rows, np.int64)
    if len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(np.int64)]
    fit = StreamingLstsq(store.d(hook), 1, bias=True)
    device = sae.W_dec.device
    with torch.inference_mode():
        for _, x in store.iter_chunks(hook, rows, 4096):
            r = sae(x.to(device)) - sae.b_dec  # forward splits rows by width (latent_rows)
            fit.update(r, r.square().sum(dim=1, keepdim=True))
    return fit.solve().weight[:, 0]


def latent_norm_alignment(
    sae: AffineSAE,
    norm_probe_weight: torch.Tensor | np.ndarray,
    store: ActivationStore,
    rows: np.ndarray,
    *,
    hook: str | None = None,
    max_rows: int = 20000,
) -> dict[str, Any]:
    """Each latent's mean activation when active vs ``a*·d_i`` (unit-norm decoder row d_i).

    The norm-is-linear argument predicts these agree when ‖·‖² ≈ a*·x with a* = Σ c_i d_i.
    ``rows`` (sorted) are thinned evenly to at most ``max_rows`` and encoded in chunks.
    Correlations use latents active >= 5 times; ``None`` when fewer than 3 such latents.
    """
    hook = hook or next(iter(store.hooks))
    rows = np.asarray(rows, np.int64)
    if len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(np.int64)]
    w_dec = sae.W_dec.detach().double().cpu()
    d_sae = w_dec.shape[0]
    total = torch.zeros(d_sae, dtype=torch.float64)
    count = torch.zeros(d_sae, dtype=torch.int64)
    device = sae.W_dec.device
    with torch.inference_mode():
        for _, x in store.iter_chunks(hook, rows, min(4096, latent_rows(d_sae))):
            z = sae.encode(x.to(device)).cpu()
            total += z.double().sum(0)
            count += (z > 0).sum(0)
    a = torch.as_tensor(np.asarray(norm_probe_weight), dtype=torch.float64).reshape(-1)
    proj = (w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-30)) @ a
    keep = (count >= MIN_ACTIVE).numpy()
    mean_act = (total / count.clamp_min(1)).numpy()[keep]
    projection = proj.numpy()[keep]
    enough = int(keep.sum()) >= 3
    # scipy's stubs leave the results' fields unsolved type variables: they are floats.
    pearson = float(cast(float, stats.pearsonr(mean_act, projection)[0])) if enough else None
    spearman = float(cast(float, stats.spearmanr(mean_act, projection)[0])) if enough else None
    return {
        "pearson": pearson,
        "spearman": spearman,
        "n_latents": int(keep.sum()),
        "n_rows": int(len(rows)),
        "latent_index": np.flatnonzero(keep).tolist(),
        "mean_activation": mean_act.tolist(),
        "projection": projection.tolist(),
    }
