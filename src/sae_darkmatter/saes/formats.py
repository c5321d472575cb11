"""Open a pretrained SAE from any supported source, with a record of where it came from.

``open_sae(spec)`` takes ``saelens:<release>/<sae_id>`` (SAELens's registry, see ``registry``)
or a folder, whose format is told by the files in it:

- SAELens, and our own SAEs: ``cfg.json`` + ``sae_weights.safetensors``;
- EleutherAI sparsify: ``cfg.json`` + ``sae.safetensors``, one folder per hookpoint;
- saprmarks/dictionary_learning: ``ae.pt`` + ``config.json`` (``saes.dictionary_learning``).

Every SAE becomes one of our float32 classes with the same reconstruction as its library's
forward pass (checked against sparsify and sae_lens themselves in the tests).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sae_darkmatter._io import resolve_device
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.saes import registry
from sae_darkmatter.saes.dictionary_learning import DL_CONFIG, DL_WEIGHTS, open_dictionary_learning
from sae_darkmatter.saes.hooks import translate_hook
from sae_darkmatter.saes.io import (
    CFG_FILENAME,
    TRAINING_FILENAME,
    TRANSCODER_HINT,
    WEIGHTS_FILENAME,
    load_sae,
    load_sae_config,
    read_json_file,
    read_tensors,
    safetensors_dtype,
)
from sae_darkmatter.saes.metadata import matryoshka_widths, run_config_training, trained_with
from sae_darkmatter.saes.tensors import build_sae, check_tensor_shapes, folder_provenance
from sae_darkmatter.saes.topk import AffineSAE

SPARSIFY_WEIGHTS = "sae.safetensors"
FORMATS: dict[str, tuple[str, ...]] = {  # format -> the files that identify it, checked in order
    "sae_lens": (CFG_FILENAME, WEIGHTS_FILENAME),  # also our own SAEs
    "sparsify": (CFG_FILENAME, SPARSIFY_WEIGHTS),
    "dictionary_learning": (DL_WEIGHTS, DL_CONFIG),
}


@dataclass(frozen=True)
class LoadedSAE:
    """An SAE ready for the analyses, and where it came from.

    ``provenance`` (JSON-ready) has at least: ``library`` (``"sae_lens"``, ``"sparsify"``,
    ``"dictionary_learning"`` or ``"sae_darkmatter"``), ``source`` (registry spec or absolute
    path), ``architecture`` (the library's name), ``loaded_as`` (our SAELens-style name),
    ``d_in``, ``d_sae``, ``k`` (TopK only, else None), ``dtype`` (as stored), ``model_name``
    (as the SAE states it), ``model`` (a Hugging Face id or our model name, for loading),
    ``hook_name`` (ours, e.g. ``"resid_post.12"``, or None), ``original_hook_name``,
    ``notes`` (list of strings) and ``trained_with`` (the training-data settings the files
    state: ``saes.metadata.trained_with``); a Matryoshka SAE's also ``matryoshka_widths``
    (its nested prefix widths, ``saes.metadata.matryoshka_widths``).
    """

    sae: AffineSAE
    provenance: dict[str, Any]


def open_sae(
    spec: str | Path,
    *,
    device: str | torch.device = "cpu",
    norm_scaling_factor: float | None = None,
) -> LoadedSAE:
    """Load an SAE from the SAELens registry or a folder of any supported format.

    ``device`` may be ``"auto"`` (CUDA when present). ``norm_scaling_factor`` only applies to
    SAELens SAEs trained with ``normalize_activations="expected_average_only_in"`` (folded into
    the weights).
    """
    text = str(spec)
    if text.startswith(registry.REGISTRY_PREFIX):
        sae, prov = registry.load_pretrained(
            text, device=device, norm_scaling_factor=norm_scaling_factor
        )
        return LoadedSAE(sae, prov)
    path = sae_folder(text)
    fmt = detect_format(path)
    if fmt != "sae_lens" and norm_scaling_factor is not None:
        raise DarkMatterError(
            f"{path}: norm_scaling_factor applies only to SAELens SAEs, not to {fmt} ones"
        )
    if fmt == "sae_lens":
        sae, prov = _open_saelens_folder(path, norm_scaling_factor)
    elif fmt == "sparsify":
        sae, prov = _open_sparsify(path)
    else:
        sae, prov = open_dictionary_learning(path)
    return LoadedSAE(sae.to(resolve_device(str(device))), prov)


def sae_folder(spec: str | Path) -> Path:
    """The absolute folder a spec names (a file of the folder names the folder)."""
    path = Path(spec).expanduser().resolve()
    if path.is_file() and path.name in {WEIGHTS_FILENAME, CFG_FILENAME, SPARSIFY_WEIGHTS,
                                        DL_WEIGHTS, DL_CONFIG}:
        path = path.parent
    if not path.is_dir():
        raise DarkMatterError(
            f"no SAE folder at {path}; give a folder, or {registry.REGISTRY_PREFIX}<release>/"
            "<sae_id> for SAELens's registry"
        )
    return path


def detect_format(path: Path) -> str:
    """``"sae_lens"``, ``"sparsify"`` or ``"dictionary_learning"``, from the files in ``path``."""
    files = {p.name for p in path.iterdir() if p.is_file()}
    for name, key in FORMATS.items():
        if set(key) <= files:
            return name
    if DL_WEIGHTS in files:
        raise DarkMatterError(
            f"{path} has {DL_WEIGHTS} but no {DL_CONFIG}: dictionary_learning SAEs need the "
            f"{DL_CONFIG} written next to it (it names the dictionary class)"
        )
    subfolders = [
        child
        for child in sorted(path.iterdir(), key=_natural)
        if child.is_dir()
        and any(set(key) <= {p.name for p in child.iterdir()} for key in FORMATS.values())
    ]
    if subfolders:
        raise DarkMatterError(
            f"{path} holds {len(subfolders)} SAEs, one per folder (e.g. one per hookpoint); "
            f"pass one of: {', '.join(str(c) for c in subfolders[:20])}"
        )
    looked_for = "; ".join(f"{name}: {' + '.join(key)}" for name, key in FORMATS.items())
    raise DarkMatterError(
        f"{path} is not an SAE folder of a known format. Looked for {looked_for}. "
        f"Found: {sorted(files)[:20] or 'no files'}"
    )


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


# ----------------------------------------------------------------------------- SAELens


def _open_saelens_folder(path: Path, scale: float | None) -> tuple[AffineSAE, dict[str, Any]]:
    cfg = load_sae_config(path)
    sae = load_sae(path, norm_scaling_factor=scale)
    meta = cfg.get("metadata") or {}
    ours = str(meta.get("written_by", "")).startswith("sae-darkmatter")
    model_name = meta.get("model_name", cfg.get("model_name"))
    original_hook = meta.get("hook_name", cfg.get("hook_name"))
    hook, note = translate_hook(original_hook)
    prov = folder_provenance(
        "sae_darkmatter" if ours else "sae_lens", path, cfg["architecture"], sae,
        safetensors_dtype(path / WEIGHTS_FILENAME, "W_dec"), model_name,
        model_name if ours else registry.hf_model_id(model_name), hook, original_hook,
        [note] if note else [], trained_with(cfg),
    )
    if nested := matryoshka_widths(cfg):
        prov["matryoshka_widths"] = nested
    trained = path / TRAINING_FILENAME
    if ours and trained.is_file():  # our trainer's record: e.g. BatchTopK saved as JumpReLU
        info = read_json_file(trained)
        prov["architecture"] = info.get("architecture", prov["architecture"])
        sparsity = info.get("sparsity") or {}
        if sparsity.get("name") == "k":
            prov["k"] = sparsity.get("value")
        prov["training"] = {
            key: info.get(key) for key in ("sparsity", "tokens_seen", "final_train_fvu")
        } | {key: (info.get("schedule") or {}).get(key)
             for key in ("until", "stopped", "doubling_gain", "doubling_gain_from")}
    return sae, prov


# ----------------------------------------------------------------------------- sparsify


class SparsifyFolder(NamedTuple):
    """A sparsify ``SparseCoder`` folder read: its TopK part (``b_dec`` subtracted from the
    input unless it transcodes), ``W_skip [d_in, d_in]`` or None, whether it transcodes (maps
    its module's input to its output) and the provenance of an SAE on the hookpoint's output."""

    sae: AffineSAE
    W_skip: torch.Tensor | None
    transcode: bool
    provenance: dict[str, Any]


def read_sparsify(path: Path) -> SparsifyFolder:
    """A sparsify folder: ReLU then top-k (the same output as our TopK), plus ``x @ W_skip.T``
    with a skip connection. Tensors: ``encoder.weight [d_sae, d_in]``, ``encoder.bias``,
    ``W_dec [d_sae, d_in]``, ``b_dec``, and ``W_skip`` with ``skip_connection``."""
    where = path / CFG_FILENAME
    cfg = read_json_file(where)
    if cfg.get("activation", "topk") != "topk":
        raise DarkMatterError(f"{where}: sparsify activation={cfg.get('activation')!r} is not "
                              "supported (only topk)")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or d_in * int(cfg["expansion_factor"]))
    state = read_tensors(path / SPARSIFY_WEIGHTS)
    shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in),
              "b_dec": (d_in,)} | ({"W_skip": (d_in, d_in)} if cfg.get("skip_connection") else {})
    check_tensor_shapes(state, shapes, path / SPARSIFY_WEIGHTS)
    transcode = bool(cfg.get("transcode"))
    sae = build_sae("topk", {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
                          "W_dec": state["W_dec"], "b_dec": state["b_dec"]}, path,
                 k=int(cfg["k"]), apply_b_dec_to_input=not transcode)
    run_path = path.parent / DL_CONFIG  # sparsify's CLI writes its run config (model name) here
    run_cfg = read_json_file(run_path) if run_path.is_file() else {}
    model_name = run_cfg.get("model")
    hook, note = translate_hook(path.name)
    prov = folder_provenance(
        "sparsify", path, "topk", sae, safetensors_dtype(path / SPARSIFY_WEIGHTS, "W_dec"),
        model_name, registry.hf_model_id(model_name), hook, path.name, [note] if note else [],
        run_config_training(run_cfg),
    )
    return SparsifyFolder(sae, state.get("W_skip"), transcode, prov)


def _open_sparsify(path: Path) -> tuple[AffineSAE, dict[str, Any]]:
    """A sparsify SAE folder (transcoders and skip connections are refused with a pointer)."""
    folder = read_sparsify(path)
    what = [w for w, on in (("transcoder", folder.transcode),
                            ("skip connection", folder.W_skip is not None)) if on]
    if what:
        raise DarkMatterError(f"{path}: a sparsify {' with a '.join(what)}, not a plain SAE: "
                              f"{TRANSCODER_HINT}")
    return folder.sae, folder.provenance
