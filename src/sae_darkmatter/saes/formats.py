"""Open a pretrained SAE from any supported source, with a record of where it came from.

``open_sae(spec)`` takes ``saelens:<release>/<sae_id>`` (SAELens's registry, see ``registry``)
or a folder, whose format is told by the files in it:

- SAELens, and our own SAEs: ``cfg.json`` + ``sae_weights.safetensors``;
- EleutherAI sparsify: ``cfg.json`` + ``sae.safetensors``, one folder per hookpoint;
- saprmarks/dictionary_learning: ``ae.pt`` + ``config.json``. ``ae.pt`` is a pickle: it is read
  with ``torch.load(weights_only=True)`` only, which refuses anything but tensors.

Every SAE becomes one of our float32 classes with the same reconstruction as its library's
forward pass (checked against sparsify and sae_lens themselves in the tests).
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sae_darkmatter._io import resolve_device
from sae_darkmatter.errors import CorruptSAEError, DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes import registry
from sae_darkmatter.saes.archs import SAE_CLASSES
from sae_darkmatter.saes.hooks import translate_hook
from sae_darkmatter.saes.io import (
    CFG_FILENAME,
    TRAINING_FILENAME,
    TRANSCODER_HINT,
    WEIGHTS_FILENAME,
    architecture_name,
    load_sae,
    load_sae_config,
    read_json_file,
    read_tensors,
    safetensors_dtype,
)
from sae_darkmatter.saes.metadata import run_config_training, trained_with
from sae_darkmatter.saes.topk import AffineSAE, TopKSAE

SPARSIFY_WEIGHTS = "sae.safetensors"
DL_WEIGHTS, DL_CONFIG = "ae.pt", "config.json"
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
    state: ``saes.metadata.trained_with``).
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
        sae, prov = _open_dictionary_learning(path)
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


def _build(
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


def _check_shapes(
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
    _check_shapes(state, shapes, path / SPARSIFY_WEIGHTS)
    transcode = bool(cfg.get("transcode"))
    sae = _build("topk", {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
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


# ----------------------------------------------------------------------------- dictionary_learning

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


def _open_dictionary_learning(path: Path) -> tuple[AffineSAE, dict[str, Any]]:
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
    _check_shapes(state, shapes, path / DL_WEIGHTS, optional)
    tensors = {name: state[t].T if tr else state[t] for t, (name, tr) in names.items()}
    notes = []
    if batch_topk:
        tensors["threshold"] = state["threshold"].expand(d_sae)
        notes.append(f"trained as BatchTopK (k={_k(trainer, state, path)}); loaded with its "
                     f"inference threshold {float(state['threshold']):.6g} on every latent")
    k = _k(trainer, state, path) if arch == "topk" else None
    sae = _build(arch, tensors, path / DL_WEIGHTS, k=k, apply_b_dec_to_input=apply_b_dec)
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
