"""Read and write SAELens-format SAE folders (``cfg.json`` + ``sae_weights.safetensors``).

The folders we write load with ``sae_lens.SAE.load_from_disk`` (architectures ``"topk"``,
``"standard"``, ``"jumprelu"``, ``"gated"``; ``normalize_activations="none"``) without
importing ``sae_lens`` here: it is an optional extra that takes ~5 s to import. Tensors are
read with safetensors only (never a pickle).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sae_darkmatter._io import full_disk_errors
from sae_darkmatter.errors import CorruptSAEError, DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes.archs import SAE_CLASSES
from sae_darkmatter.saes.topk import AffineSAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SCALER_FILENAME = "activation_scaler.json"  # SAELens training checkpoints keep the factor here
TRAINING_FILENAME = "training.json"  # our trainer's record beside the SAE (recipe, curve, scores)
CHECKSUMS_FILENAME = "checksums.json"  # sha256 of the files we write, checked when they are read
# handle_config_defaulting in SAELens treats configs without a version >= 6 as the old format.
SAELENS_FORMAT_VERSION = "6.0.0"

# SAELens's transcoder architectures -> (the architecture of their sparse part, skip connection)
SAELENS_TRANSCODERS = {
    "transcoder": ("standard", False),
    "skip_transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
TRANSCODER_HINT = (
    "its error is y - y_hat (at another hook, or with a skip term), not x - x_hat: decompose "
    "it with 'darkmatter decompose --transcoder' (sae_darkmatter.decompose_transcoders); "
    "sae_darkmatter.open_transcoder loads it"
)

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64",
                torch.float16: "float16", torch.bfloat16: "bfloat16"}
_SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16"}


def sae_config(sae: AffineSAE, metadata: dict[str, Any]) -> dict[str, Any]:
    """The ``cfg.json`` dict SAELens 6 writes for ``sae``'s config class (same keys and order).

    ``TopKSAE`` -> ``"topk"``, ``ReLUSAE`` -> ``"standard"``, ``JumpReLUSAE`` -> ``"jumprelu"``,
    ``GatedSAE`` -> ``"gated"`` (each class's ``saelens_architecture``).
    """
    arch = architecture_name(sae)
    cfg: dict[str, Any] = {
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
    }
    return cfg | sae.config_fields() | {"architecture": arch}


def architecture_name(sae: AffineSAE) -> str:
    """SAELens's architecture name for one of our SAE classes."""
    for name, cls in SAE_CLASSES.items():
        if isinstance(sae, cls):
            return name
    supported = ", ".join(cls.__name__ for cls in SAE_CLASSES.values())
    raise DarkMatterError(
        f"cannot save a {type(sae).__name__} as a SAELens folder (supported: {supported})"
    )


def _our_version() -> str:
    try:
        return importlib.metadata.version("sae-darkmatter")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def save_sae(sae: AffineSAE, path: str | Path, *, metadata: dict[str, Any]) -> None:
    """Write ``sae`` as a SAELens folder; ``metadata`` (model_name, hook_name, ...) is kept as is.

    ``TopKSAE``, ``ReLUSAE``, ``JumpReLUSAE`` (threshold included) and ``GatedSAE`` are
    supported; the folder loads with ``sae_lens.SAE.load_from_disk`` and with ``load_sae``.

    Files are written into a temporary sibling folder first. A new folder then appears at once
    (one rename); into an existing folder each file is renamed in (weights before config), and
    other files there (e.g. ``training.json``) are left alone. ``checksums.json`` records the
    sha256 of both files; loading checks it, so a damaged file is named instead of used.
    """
    names = type(sae).saelens_names
    tensors = {names.get(name, name): t for name, t in sae.state_dict().items()}
    write_saelens_folder(path, sae_config(sae, metadata), tensors)


def write_saelens_folder(path: str | Path, cfg: dict[str, Any],
                         tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``cfg.json``, the weights and ``checksums.json`` into ``path`` atomically
    (``save_sae``'s rules)."""
    path = Path(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it owner-only) so the folder gets the usual umask mode
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        with full_disk_errors(path):
            save_file(tensors, tmp / WEIGHTS_FILENAME)
            (tmp / CFG_FILENAME).write_text(json.dumps(cfg))
            sums = {name: _sha256(tmp / name) for name in (WEIGHTS_FILENAME, CFG_FILENAME)}
            (tmp / CHECKSUMS_FILENAME).write_text(json.dumps(sums, indent=1))
            for name in (WEIGHTS_FILENAME, CFG_FILENAME, CHECKSUMS_FILENAME):
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
            if not path.exists():
                os.replace(tmp, path)
            else:  # old checksums go first: a kill midway leaves files unchecked, never mismatched
                (path / CHECKSUMS_FILENAME).unlink(missing_ok=True)
                for name in (WEIGHTS_FILENAME, CFG_FILENAME, CHECKSUMS_FILENAME):
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
    return normalize_config(read_json_file(path / CFG_FILENAME))


def normalize_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Bring a SAELens config dict written before 6.0 up to the 6.x key conventions."""
    cfg = dict(cfg)
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
    """Load a SAELens folder into a float32 ``TopKSAE``, ``ReLUSAE``, ``JumpReLUSAE`` or
    ``GatedSAE``.

    Supported: architectures ``topk`` / ``standard`` / ``jumprelu`` / ``gated``;
    ``apply_b_dec_to_input``; TopK ``rescale_acts_by_decoder_norm`` (folded into the weights,
    as SAELens does on save); ``reshape_activations`` ``hook_z`` for inputs already flattened
    to ``[n, n_heads*d_head]``; ``normalize_activations`` ``"none"`` or
    ``"expected_average_only_in"`` with a scaling factor from ``norm_scaling_factor`` or the
    folder's ``activation_scaler.json``, folded into the weights (``W_enc *= s; W_dec /= s;
    b_dec /= s``) so the SAE works on raw activations.
    """
    path = Path(path)
    cfg = load_sae_config(path)
    scale = norm_scale(cfg, str(path), norm_scaling_factor, path / SCALER_FILENAME)
    state = read_tensors(path / WEIGHTS_FILENAME)
    return sae_from_saelens(cfg, state, where=str(path / WEIGHTS_FILENAME), scale=scale).to(
        device
    )


def sae_from_saelens(
    cfg: dict[str, Any], state: dict[str, torch.Tensor], *, where: str, scale: float | None
) -> AffineSAE:
    """Our float32 SAE from a SAELens config dict and state dict (``where`` names the source).

    ``scale`` is the ``expected_average_only_in`` factor to fold in (see ``norm_scale``).
    """
    cfg = normalize_config(cfg)
    arch = cfg["architecture"]
    if arch in SAELENS_TRANSCODERS:
        raise DarkMatterError(f"{where}: a SAELens {arch}, not an SAE: {TRANSCODER_HINT}")
    if arch not in SAE_CLASSES:
        raise DarkMatterError(
            f"{where}: SAE architecture {arch!r} is not supported; "
            f"supported: {sorted(SAE_CLASSES)}"
        )
    refuse_settings(cfg, where)
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    cls = SAE_CLASSES[arch]
    state = check_weights(state, where, cls, d_in, d_sae)
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    sae = cls.for_config(d_in, d_sae, cfg, apply_b_dec_to_input=apply_b_dec)
    cls.adapt_saelens_state(cfg, state)
    if scale is not None:
        state["W_enc"] = state["W_enc"] * scale
        state["W_dec"] = state["W_dec"] / scale
        state["b_dec"] = state["b_dec"] / scale
    sae.load_state_dict(state)
    return sae


def refuse_settings(cfg: dict[str, Any], where: str) -> None:
    """Refuse SAELens settings no SAE here reproduces (``reshape_activations`` ``hook_z`` is
    kept: it only says the input was flattened to ``[n, n_heads*d_head]``)."""
    unsupported = [
        f"{key}={cfg[key]!r}"
        for key, ok in (("reshape_activations", ("none", "hook_z")),
                        ("finetuning_scaling_factor", (False,)))
        if key in cfg and cfg[key] not in ok
    ]
    if unsupported:
        raise DarkMatterError(f"{where}: unsupported SAE setting(s): {', '.join(unsupported)}")


def norm_scale(
    cfg: dict[str, Any], where: str, given: float | None, scaler: Path | None = None
) -> float | None:
    """The input scaling factor to fold in, or None when the SAE needs none.

    ``constant_norm_rescale``, ``layer_norm`` and ``covariance_whitening`` are refused: the
    first two normalise each token by its own statistics, which no fixed affine SAE can
    reproduce through ``decode``; SAELens folds the third into the weights when it saves.
    """
    mode = normalize_config(cfg).get("normalize_activations", "none")
    if mode == "none":
        return None
    if mode != "expected_average_only_in":
        why = (
            ": it rescales each token by its own statistics, so the reconstruction is not a "
            "fixed map of the latents"
            if mode in ("constant_norm_rescale", "layer_norm")
            else ""
        )
        raise DarkMatterError(
            f"{where}: unsupported SAE setting normalize_activations={mode!r}{why} "
            "(supported: 'none', 'expected_average_only_in')"
        )
    if given is not None:
        return float(given)
    if scaler is not None and scaler.is_file():
        factor = json.loads(scaler.read_text()).get("scaling_factor")
        if factor is not None:
            return float(factor)
    raise DarkMatterError(
        f"{where}: normalize_activations='expected_average_only_in' needs the activation "
        f"scaling factor sqrt(d_in)/mean||x||; pass norm_scaling_factor= (SAELens lists it as "
        f"norm_scaling_factor in pretrained_saes.yaml) or put {SCALER_FILENAME} in the folder"
    )


def weights_digest(sae: torch.nn.Module) -> str:
    """sha256 over an SAE's tensors (names, dtypes, shapes and bytes) in name order: a cache key."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify_checksum(path: Path) -> None:
    """Check ``path`` against its folder's ``checksums.json`` (if the folder has one listing it)."""
    sums_file = path.parent / CHECKSUMS_FILENAME
    if not sums_file.is_file():
        return
    want = read_json_file(sums_file).get(path.name)
    if want is not None and _sha256(path) != want:
        raise CorruptSAEError(
            f"{path} is corrupt: its sha256 does not match {sums_file} (damaged or overwritten "
            "after it was saved); retrain it or restore it from a copy"
        )


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from an SAE folder; unreadable or non-object JSON names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptSAEError(
            f"{path} is not valid JSON ({e}); the file is damaged or truncated"
        ) from None
    if not isinstance(data, dict):
        raise CorruptSAEError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, after its checksum (if recorded); damage names the
    file."""
    verify_checksum(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CorruptSAEError(
            f"{path} is not a readable safetensors file ({e}); it is truncated or damaged: "
            "download, retrain or restore it"
        ) from None


def safetensors_dtype(path: str | Path, name: str) -> str | None:
    """dtype (``"float32"``, ``"bfloat16"``, ...) of tensor ``name`` in a safetensors file.

    Reads the header only; None when the file has no tensor of that name.
    """
    with safe_open(str(path), framework="pt") as f:
        if name not in f.keys():  # safe_open is not a mapping
            return None
        code = f.get_slice(name).get_dtype()
    return _SAFETENSORS_DTYPES.get(code, code.lower())


def check_weights(
    state: dict[str, torch.Tensor], where: str, cls: type[AffineSAE], d_in: int, d_sae: int,
    d_out: int | None = None, extra: dict[str, tuple[int, ...]] | None = None,
    arch: str | None = None,
) -> dict[str, torch.Tensor]:
    """SAELens tensors renamed to ours, as float32, checked against the config (``d_out``:
    a transcoder's decoder width; ``extra``: tensors beyond the class's, with their shapes;
    ``arch``: the architecture named in errors, default the class's)."""
    state = dict(state)
    stated = f"d_in={d_in}, d_sae={d_sae}" + (f", d_out={d_out}" if d_out is not None else "")
    d_out = d_in if d_out is None else d_out
    extra = extra or {}
    ones = state.get("scaling_factor")
    if ones is not None and torch.equal(ones, torch.ones_like(ones)):
        del state["scaling_factor"]  # older SAELens saved a no-op factor; SAELens drops it too
    ours = ("W_enc", "b_enc", "W_dec", "b_dec", *cls.extra_tensors, *extra)
    names = cls.saelens_names
    expected = {names.get(n, n) for n in ours}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise DarkMatterError(
            f"{where}: tensors do not match architecture {arch or cls.saelens_architecture!r}: "
            f"missing {missing}, unexpected {unexpected}"
        )
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,), **extra}
    out = {}
    for name in ours:
        tensor = state[names.get(name, name)]
        want = shapes.get(name, (d_sae,))
        if tuple(tensor.shape) != want:
            raise ShapeMismatchError(
                f"{where}: {names.get(name, name)} has shape {tuple(tensor.shape)}, "
                f"the config ({stated}) implies {want}"
            )
        out[name] = tensor.detach().to(device="cpu", dtype=torch.float32)
    return out

