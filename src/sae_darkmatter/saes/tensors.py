"""What every folder loader shares: our SAE class from tensors already renamed to our layout
(shapes checked), and the provenance record of an SAE read from a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes.archs import SAE_CLASSES
from sae_darkmatter.saes.io import architecture_name
from sae_darkmatter.saes.topk import AffineSAE, TopKSAE


def build_sae(
    arch: str, state: dict[str, torch.Tensor], where: Path, *, k: int | None = None,
    apply_b_dec_to_input: bool = True,
) -> AffineSAE:
    """Our SAE from tensors already in our names and layout (shapes checked by the caller)."""
    d_sae, d_in = state["W_dec"].shape
    sae = SAE_CLASSES[arch].for_config(d_in, d_sae, {"k": k},
                                       apply_b_dec_to_input=apply_b_dec_to_input)
    try:
        sae.load_state_dict({n: t.to(torch.float32).contiguous() for n, t in state.items()})
    except RuntimeError as exc:
        raise ShapeMismatchError(f"{where}: tensors do not fit a {arch} SAE: {exc}") from exc
    return sae


def check_tensor_shapes(
    state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], where: Path,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Exactly the tensors ``shapes`` names (bar ``optional`` ones), with those shapes."""
    missing = sorted(set(shapes) - set(state) - optional)
    extra = sorted(set(state) - set(shapes))
    if missing or extra:
        raise DarkMatterError(f"{where}: unexpected tensors: missing {missing}, unexpected {extra}")
    for name, want in shapes.items():
        if name in state and tuple(state[name].shape) != want:
            raise ShapeMismatchError(
                f"{where}: {name} has shape {tuple(state[name].shape)}, expected {want}"
            )


def folder_provenance(
    library: str, path: Path, architecture: str, sae: AffineSAE, dtype: str | None,
    model_name: str | None, model: str | None, hook: str | None, original_hook: str | None,
    notes: list[str], trained: dict[str, Any],
) -> dict[str, Any]:
    """``LoadedSAE.provenance`` of ``sae`` read from the folder ``path``."""
    return {
        "library": library, "source": str(path), "architecture": architecture,
        "loaded_as": architecture_name(sae), "d_in": sae.d_in, "d_sae": sae.d_sae,
        "k": sae.k if isinstance(sae, TopKSAE) else None, "dtype": dtype,
        "model_name": model_name, "model": model, "hook_name": hook,
        "original_hook_name": original_hook, "notes": notes, "trained_with": trained,
    }
