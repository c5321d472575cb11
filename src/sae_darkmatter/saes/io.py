"""Read and write SAELens-format SAE folders (``cfg.json`` + ``sae_weights.safetensors``).

The folders we write load with ``sae_lens.SAE.load_from_disk`` (architecture ``"topk"``,
``normalize_activations="none"``) without importing ``sae_lens`` here: it is an optional extra
that takes ~5 s to import. Tensors are read with safetensors only (never a pickle).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes.architectures import JumpReLUSAE, ReLUSAE
from sae_darkmatter.saes.topk import AffineSAE, TopKSAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SCALER_FILENAME = "activation_scaler.json"  # SAELens training checkpoints keep the factor here
# handle_config_defaulting in SAELens treats configs without a version >= 6 as the old format.
SAELENS_FORMAT_VERSION = "6.0.0"

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64",
                torch.float16: "float16", torch.bfloat16: "bfloat16"}
_KEYS = {
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
}


def topk_config(sae: TopKSAE, metadata: dict[str, Any]) -> dict[str, Any]:
    """The ``cfg.json`` dict SAELens 6 writes for a ``TopKSAEConfig`` (same keys and order)."""
    return {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": _DTYPE_NAMES[sae.W_dec.dtype],
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "written_by": f"sae-darkmatter {_our_version()}",
            **metadata,
        },
        "k": sae.k,
        "rescale_acts_by_decoder_norm": False,
        "architecture": "topk",
    }


def _our_version() -> str:
    try:
        return importlib.metadata.version("sae-darkmatter")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def save_sae(sae: TopKSAE, path: str | Path, *, metadata: dict[str, Any]) -> None:
    """Write ``sae`` as a SAELens folder; ``metadata`` (model_name, hook_name, ...) is kept as is.

    Files are written into a temporary sibling folder first. A new folder then appears at once
    (one rename); into an existing folder each file is renamed in (weights before config), and
    other files there (e.g. ``training.json``) are left alone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it owner-only) so the folder gets the usual umask mode
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        tensors = {name: p.detach().cpu().contiguous() for name, p in sae.named_parameters()}
        save_file(tensors, tmp / WEIGHTS_FILENAME)
        (tmp / CFG_FILENAME).write_text(json.dumps(topk_config(sae, metadata)))
        if not path.exists():
            os.replace(tmp, path)
        else:
            for name in (WEIGHTS_FILENAME, CFG_FILENAME):
                os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_sae_config(path: str | Path) -> dict[str, Any]:
    """``cfg.json`` of a SAELens folder, with pre-6.0 key conventions brought up to date."""
    path = Path(path)
    missing = [n for n in (CFG_FILENAME, WEIGHTS_FILENAME) if not (path / n).is_file()]
    if missing:
        raise DarkMatterError(
            f"{path} is not a SAELens SAE folder: missing {', '.join(missing)} "
            f"(expected {CFG_FILENAME} and {WEIGHTS_FILENAME})"
        )
    cfg: dict[str, Any] = json.loads((path / CFG_FILENAME).read_text())
    if "architecture" not in cfg:  # SAELens < 6 wrote TopK as activation_fn "topk"
        topk_k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        is_topk = cfg.get("activation_fn") == "topk" and topk_k is not None
        cfg["architecture"] = "topk" if is_topk else "standard"
        if is_topk:
            cfg["k"] = topk_k
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = (
            "expected_average_only_in" if cfg["normalize_activations"] else "none"
        )
    return cfg


def load_sae(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    norm_scaling_factor: float | None = None,
) -> AffineSAE:
    """Load a SAELens folder into a float32 ``TopKSAE``, ``ReLUSAE`` or ``JumpReLUSAE``.

    Supported: architectures ``topk`` / ``standard`` / ``jumprelu``; ``apply_b_dec_to_input``;
    TopK ``rescale_acts_by_decoder_norm`` (folded into the weights, as SAELens does on save);
    ``reshape_activations`` ``hook_z`` for inputs already flattened to ``[n, n_heads*d_head]``;
    ``normalize_activations`` ``"none"`` or ``"expected_average_only_in"`` with a scaling factor
    from ``norm_scaling_factor`` or the folder's ``activation_scaler.json``, folded into the
    weights (``W_enc *= s; W_dec /= s; b_dec /= s``) so the SAE works on raw activations.
    """
    path = Path(path)
    cfg = load_sae_config(path)
    arch = cfg["architecture"]
    if arch not in _KEYS:
        raise DarkMatterError(
            f"{path}: SAE architecture {arch!r} is not supported; supported: {sorted(_KEYS)}"
        )
    scale = _norm_scale(path, cfg, norm_scaling_factor)
    unsupported = [
        f"{key}={cfg[key]!r}"
        for key, ok in (("reshape_activations", ("none", "hook_z")),
                        ("finetuning_scaling_factor", (False,)))
        if key in cfg and cfg[key] not in ok
    ]
    if unsupported:
        raise DarkMatterError(f"{path}: unsupported SAE setting(s): {', '.join(unsupported)}")

    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    state = _read_weights(path, arch, d_in, d_sae)
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    sae: AffineSAE
    if arch == "topk":
        sae = TopKSAE(d_in, d_sae, int(cfg["k"]), apply_b_dec_to_input=apply_b_dec)
        if cfg.get("rescale_acts_by_decoder_norm", False):
            _fold_decoder_norm(state)
    elif arch == "jumprelu":
        sae = JumpReLUSAE(d_in, d_sae, apply_b_dec_to_input=apply_b_dec)
    else:
        sae = ReLUSAE(d_in, d_sae, apply_b_dec_to_input=apply_b_dec)
    if scale is not None:
        state["W_enc"] = state["W_enc"] * scale
        state["W_dec"] = state["W_dec"] / scale
        state["b_dec"] = state["b_dec"] / scale
    sae.load_state_dict(state)
    return sae.to(device)


def _norm_scale(path: Path, cfg: dict[str, Any], given: float | None) -> float | None:
    """The input scaling factor to fold in, or None when the folder needs none."""
    mode = cfg.get("normalize_activations", "none")
    if mode == "none":
        return None
    if mode != "expected_average_only_in":
        raise DarkMatterError(
            f"{path}: unsupported SAE setting normalize_activations={mode!r} "
            "(supported: 'none', 'expected_average_only_in')"
        )
    if given is not None:
        return float(given)
    scaler = path / SCALER_FILENAME
    if scaler.is_file():
        factor = json.loads(scaler.read_text()).get("scaling_factor")
        if factor is not None:
            return float(factor)
    raise DarkMatterError(
        f"{path}: normalize_activations='expected_average_only_in' needs the activation "
        f"scaling factor sqrt(d_in)/mean||x||; pass norm_scaling_factor= (SAELens lists it as "
        f"norm_scaling_factor in pretrained_saes.yaml) or put {SCALER_FILENAME} in the folder"
    )


def _read_weights(path: Path, arch: str, d_in: int, d_sae: int) -> dict[str, torch.Tensor]:
    """Tensors of ``sae_weights.safetensors`` as float32, checked against the config."""
    state = load_file(path / WEIGHTS_FILENAME)
    ones = state.get("scaling_factor")
    if ones is not None and torch.equal(ones, torch.ones_like(ones)):
        del state["scaling_factor"]  # older SAELens saved a no-op factor; SAELens drops it too
    expected = _KEYS[arch]
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise DarkMatterError(
            f"{path / WEIGHTS_FILENAME}: tensors do not match architecture {arch!r}: "
            f"missing {missing}, unexpected {extra}"
        )
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
              "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, tensor in state.items():
        if tuple(tensor.shape) != shapes[name]:
            raise ShapeMismatchError(
                f"{path / WEIGHTS_FILENAME}: {name} has shape {tuple(tensor.shape)}, "
                f"cfg.json (d_in={d_in}, d_sae={d_sae}) implies {shapes[name]}"
            )
    return {name: tensor.to(torch.float32) for name, tensor in state.items()}


def _fold_decoder_norm(state: dict[str, torch.Tensor]) -> None:
    """Make decoder rows unit-norm without changing TopK outputs (SAELens's ``_fold_norm_topk``).

    With ``rescale_acts_by_decoder_norm`` the pre-activations are multiplied by ``||W_dec_i||``
    and the latents divided by it before decoding; folding gives the same map.
    """
    norms = state["W_dec"].norm(dim=1).clamp(min=1e-8)
    state["b_enc"] = state["b_enc"] * norms
    state["W_enc"] = state["W_enc"] * norms
    state["W_dec"] = state["W_dec"] / norms[:, None]
