"""The downstream analysis's checks: the clean loss it must reproduce (``reference_loss``) and
the clean and identity splices against it (``check_losses``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch

from sae_darkmatter.errors import DarkMatterError, HookError
from sae_darkmatter.models import LoadedModel, forward_capture, logits_batch
from sae_darkmatter.store import ActivationStore

log = logging.getLogger(__name__)

# Max relative per-token distance ‖x − x_stored‖ / ‖x_stored‖ between the hook activations of the
# recomputed forward and the store's. Rounding stays far below it: on CPU another batch
# composition gives bit-identical SmolLM2 layer-15 activations in float32 and bfloat16, and a
# bfloat16 store of float32 activations is off by 0.0025 at most (8 significant bits; GPU kernels
# chosen by batch shape may add about that much again). Another model's activations are unrelated
# (~1; independent directions give √2).
ACTIVATION_TOLERANCE = 0.1


def reference_loss(store: ActivationStore, lm: LoadedModel, hook: str, tokens: np.ndarray,
                   chosen: np.ndarray, batch_size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The per-token clean loss ``[n, T]`` of contexts ``chosen`` that the splice's clean CE must
    equal, and the check's record of it (``"reference"``: ``"stored"`` or ``"recomputed"``).

    A store harvested with the loss gives it. Otherwise (the loss column is NaN) the model runs
    its plain forward pass (``forward_capture``: none of the splice's hooks) on those contexts,
    in the splice's batches; its activations at ``hook`` must equal the stored ones within
    ``ACTIVATION_TOLERANCE``, which checks, before any splice, that ``lm`` is the harvested model
    (what the stored loss checks otherwise).
    """
    stored = store.column("loss").reshape(tokens.shape)[chosen]
    if np.isfinite(stored).any():  # the harvest stores every loss but the last position's
        return stored, {"reference": "stored"}
    ids = torch.from_numpy(tokens[chosen].astype(np.int64))
    batch = logits_batch(lm, ids.shape[1], batch_size)
    log.info("the store holds no per-token loss: the clean loss of %d contexts from the model's "
             "plain forward pass", ids.shape[0])
    losses, acts = [], []
    for lo in range(0, ids.shape[0], batch):
        x, loss = forward_capture(lm, ids[lo : lo + batch], [hook], with_loss=True)
        acts.append(x[hook].double())
        losses.append(cast("torch.Tensor", loss))
    x = torch.cat(acts)
    rows = (chosen[:, None] * tokens.shape[1] + np.arange(tokens.shape[1])).ravel()
    x_stored = store.gather(hook, rows).double().reshape(x.shape)
    rel = ((x - x_stored).norm(dim=-1) / x_stored.norm(dim=-1).clamp_min(1e-30)).max().item()
    if not rel <= ACTIVATION_TOLERANCE:  # also NaN
        raise DarkMatterError(
            f"the model's activations at {hook} differ from the stored ones by up to {rel:.3g} "
            "(relative to their norm): the model is not the one harvested (load the model with "
            "the harvest's ModelConfig)"
        )
    check = {"reference": "recomputed", "activations_vs_stored_max_rel": rel,
             "activation_tolerance": ACTIVATION_TOLERANCE}
    return torch.cat(losses).numpy(), check


def check_losses(per_token: Mapping[str, np.ndarray], reference: np.ndarray, tolerance: float,
           source: str) -> dict[str, Any]:
    """Clean CE vs the reference loss (``source``: stored by the harvest or recomputed by the
    plain forward), and the identity splice vs clean (must agree)."""
    clean, ident = per_token["clean/ce"], per_token["shared/x/ce"]
    valid = np.isfinite(reference)
    diff = float(np.abs(clean - reference)[valid].max()) if valid.any() else None
    out = {
        "clean_vs_reference_max_abs": diff,
        "identity_vs_clean_max_abs": float(np.nanmax(np.abs(ident - clean))),
        "identity_max_kl": float(np.nanmax(np.abs(per_token["shared/x/kl"]))),
        "tolerance": tolerance,
    }
    if diff is not None and diff > tolerance:
        raise DarkMatterError(
            f"clean CE differs from the harvest's stored loss by up to {diff:.3g} nats: the "
            "model or contexts are not the ones harvested (load the model with the harvest's "
            "ModelConfig)" if source == "stored" else
            f"clean CE of the splice differs from the model's plain forward pass by up to "
            f"{diff:.3g} nats: the splice's clean pass does not run the model as a plain forward "
            "does"
        )
    if out["identity_vs_clean_max_abs"] > tolerance:
        raise HookError(
            "the identity splice does not reproduce the clean loss on this architecture"
        )
    return out
