"""saprmarks/dictionary_learning SAE folders (``ae.pt`` + ``config.json``) as our SAE classes.

``ae.pt`` is a pickle: it is read with ``torch.load(weights_only=True)`` only, which refuses
anything but tensors.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from sae_darkmatter.errors import CorruptSAEError, DarkMatterError
from sae_darkmatter.saes import registry
from sae_darkmatter.saes.hooks import translate_hook
from sae_darkmatter.saes.io import read_json_file
from sae_darkmatter.saes.metadata import run_config_training
from sae_darkmatter.saes.tensors import build_sae, check_tensor_shapes, folder_provenance
from sae_darkmatter.saes.topk import AffineSAE

DL_WEIGHTS, DL_CONFIG = "ae.pt", "config.json"

# dict_class -> (our architecture, apply_b_dec_to_input, {their tensor: (ours, transposed)}).
# Their nn.Linear weights are [out, in]: encoder.weight [d_sae, d_in], decoder.weight [d_in, d_sae].
_ENC = {"encoder.weight": ("W_enc", True), "encoder.bias": ("b_enc", False),
        "decoder.weight": ("W_dec", True)}
_PARAMS = {n: (n, False) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
_DL_CLASSES: dict[str, tuple[str, bool, dict[str, tuple[str, bool]]]] = {
    "AutoEncoder": ("standard", True, {**_ENC, "bias": ("b_dec", False)}),
    "AutoEncoderNew": ("standard", False, {**_ENC, "decoder.bias": ("b_dec", False)}),
    "GatedAutoEncoder": ("gated", True, {
        "encoder.weight": ("W_enc", True), "gate_bias": ("b_enc", False), "r_mag": ("r_mag", False),
        "mag_bias": ("b_mag", False), "decoder.weight": ("W_dec", True),
        "decoder_bias": ("b_dec", False)}),
    "AutoEncoderTopK": ("topk", True, {**_ENC, "b_dec": ("b_dec", False)}),
    "BatchTopKSAE": ("jumprelu", True, {**_ENC, "b_dec": ("b_dec", False)}),
    "MatryoshkaBatchTopKSAE": ("jumprelu", True, _PARAMS),
    "JumpReluAutoEncoder": ("jumprelu", False, {**_PARAMS, "threshold": ("threshold", False)}),
}
_BATCH_TOPK = ("BatchTopKSAE", "MatryoshkaBatchTopKSAE")
# buffers besides the parameters: k (and an unused threshold) for TopK, k and group sizes for
# the BatchTopK family, whose scalar threshold is required and handled apart
_BUFFERS = {"AutoEncoderTopK": ("k", "threshold"), "BatchTopKSAE": ("k",),
            "MatryoshkaBatchTopKSAE": ("k", "group_sizes")}


def open_dictionary_learning(path: Path) -> tuple[AffineSAE, dict[str, Any]]:
    """A dictionary_learning ``ae.pt`` state dict, mapped by ``config.json``'s ``dict_class``.

    Encoders are ``relu(W(x - b_dec) + b)`` (JumpReLU: no ``b_dec`` subtraction); TopK is
    ReLU then per-token top-k, the same reconstruction as our TopK. The BatchTopK family's
    inference rule ``f * (f > threshold)`` with ``f = relu(pre)`` and one global threshold is
    our JumpReLU with that threshold on every latent (equal for any threshold sign).
    """
    config = read_json_file(path / DL_CONFIG)
    trainer = config.get("trainer") or {}
    dict_class = trainer.get("dict_class")
    if dict_class not in _DL_CLASSES:
        raise DarkMatterError(
            f"{path / DL_CONFIG}: dictionary_learning class {dict_class!r} is not supported; "
            f"supported: {sorted(_DL_CLASSES)}"
        )
    if not trainer.get("activation_dim") or not trainer.get("dict_size"):
        raise DarkMatterError(f"{path / DL_CONFIG}: trainer.activation_dim/dict_size missing")
    arch, apply_b_dec, names = _DL_CLASSES[dict_class]
    d_in, d_sae = int(trainer["activation_dim"]), int(trainer["dict_size"])
    state = _torch_load_tensors(path / DL_WEIGHTS)
    ours = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes: dict[str, tuple[int, ...]] = {}
    for theirs, (name, transposed) in names.items():
        want = ours.get(name, (d_sae,))
        shapes[theirs] = want[::-1] if transposed else want
    optional = frozenset(_BUFFERS.get(dict_class, ()))
    shapes |= {b: tuple(state[b].shape) for b in optional if b in state}
    batch_topk = dict_class in _BATCH_TOPK
    if batch_topk:
        shapes["threshold"] = ()
    check_tensor_shapes(state, shapes, path / DL_WEIGHTS, optional)
    tensors = {name: state[t].T if tr else state[t] for t, (name, tr) in names.items()}
    notes = []
    if batch_topk:
        tensors["threshold"] = state["threshold"].expand(d_sae)
        notes.append(f"trained as BatchTopK (k={_k(trainer, state, path)}); loaded with its "
                     f"inference threshold {float(state['threshold']):.6g} on every latent")
    k = _k(trainer, state, path) if arch == "topk" else None
    sae = build_sae(arch, tensors, path / DL_WEIGHTS, k=k, apply_b_dec_to_input=apply_b_dec)
    model_name = trainer.get("lm_name")
    hook, note = _dl_hook(trainer)
    w_dec = next(t for t, (name, _) in names.items() if name == "W_dec")
    return sae, folder_provenance(
        "dictionary_learning", path, dict_class, sae,
        str(state[w_dec].dtype).removeprefix("torch."), model_name,
        registry.hf_model_id(model_name), hook,
        trainer.get("submodule_name") or _layer_text(trainer), notes + ([note] if note else []),
        run_config_training(config),
    )


def _torch_load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict of tensors, refusing any other Python object (no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: \s*(.+)", str(exc))
        reason = (found.group(1) if found else str(exc)).strip().split(". ")[0]
        raise DarkMatterError(
            f"{path}: refused to load: not a plain state dict of tensors "
            f"({reason}). Pickles of other Python objects "
            "can run code when loaded, so only torch.load(weights_only=True) is used"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CorruptSAEError(
            f"{path}: not a readable torch state dict ({exc}); it is truncated or damaged"
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise DarkMatterError(
            f"{path}: expected a state dict of tensors, got {type(state).__name__}"
        )
    return state


def _k(trainer: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> int:
    """k from config.json's trainer section or the state dict's ``k`` buffer (must agree)."""
    found = {int(v) for v in (trainer.get("k"), state["k"].item() if "k" in state else None)
             if v is not None}
    if len(found) != 1:
        raise DarkMatterError(
            f"{path}: k is {'missing' if not found else f'ambiguous {sorted(found)}'} "
            f"(looked at {DL_CONFIG} trainer.k and the k tensor in {DL_WEIGHTS})"
        )
    return found.pop()


def _dl_hook(trainer: dict[str, Any]) -> tuple[str | None, str | None]:
    """Our hook for dictionary_learning's ``submodule_name`` (``resid_post_layer_12``)."""
    name = trainer.get("submodule_name")
    match = re.match(r"^(resid_post|resid_pre|mlp_out|attn_out)_layer_(\d+)$", name or "")
    if match is None:
        return None, f"cannot map {name or _layer_text(trainer)!r} to a hook; set the hook"
    kind, layer = match.group(1), int(match.group(2))
    if kind != "resid_pre":
        return f"{kind}.{layer}", None
    return translate_hook(f"blocks.{layer}.hook_resid_pre")


def _layer_text(trainer: dict[str, Any]) -> str | None:
    return f"layer {trainer['layer']}" if trainer.get("layer") is not None else None
