"""Pretrained SAEs from SAELens's registry: ``saelens:<release>/<sae_id>``.

``sae_lens`` is an optional extra (``pip install sae-darkmatter[saelens]``) imported only here,
and only when a registry SAE is opened: it takes ~5 s to import. SAELens downloads (or, with
``HF_HUB_OFFLINE=1``, reads from the local Hugging Face cache) and converts the weights; we
turn its SAE into ours and translate its TransformerLens hook (``hooks``) and model names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from sae_darkmatter._io import resolve_device
from sae_darkmatter.errors import (
    CorruptSAEError,
    DarkMatterError,
    ModelNotAvailableError,
)
from sae_darkmatter.saes.hooks import translate_hook
from sae_darkmatter.saes.io import (
    SAELENS_TRANSCODERS,
    architecture_name,
    norm_scale,
    sae_from_saelens,
    safetensors_dtype,
)
from sae_darkmatter.saes.metadata import matryoshka_widths, trained_with
from sae_darkmatter.saes.topk import AffineSAE, TopKSAE
from sae_darkmatter.saes.transcoder import (
    Transcoder,
    sae_as_transcoder,
    transcoder_from_saelens,
    transcoder_provenance,
)

REGISTRY_PREFIX = "saelens:"
INSTALL_HINT = "pip install sae-darkmatter[saelens]"


def hf_model_id(model_name: str | None) -> str | None:
    """The Hugging Face id for a model name an SAE states, or None if it cannot be told.

    Names with a ``/`` are taken as ids already; TransformerLens names (``gpt2-small``,
    ``gemma-2-2b``) are looked up in its official-name table (importing ``transformer_lens``
    takes ~4 s; it comes with ``sae_lens``).
    """
    if not model_name:
        return None
    if "/" in model_name:
        return model_name
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name
    except ImportError:
        return None
    try:
        return str(get_official_model_name(model_name))
    except ValueError:
        return None


def import_sae_lens() -> ModuleType:
    """``sae_lens``, or a ``ModelNotAvailableError`` saying how to install it."""
    try:
        import sae_lens
    except ImportError as exc:
        raise ModelNotAvailableError(
            f"loading SAEs from the SAELens registry needs sae_lens: {INSTALL_HINT}"
        ) from exc
    return sae_lens


def _directory() -> dict[str, Any]:
    import_sae_lens()
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def parse_spec(spec: str) -> tuple[str, str]:
    """``[saelens:]<release>/<sae_id>`` -> ``(release, sae_id)``.

    The release is the longest ``/``-separated prefix that SAELens's registry knows (sae_ids
    contain ``/``). A prefix ``org/name`` that the registry does not know is taken as a Hugging
    Face repo id holding SAELens folders, as ``sae_lens`` itself does.
    """
    body = spec.removeprefix(REGISTRY_PREFIX).strip("/")
    parts = body.split("/")
    directory = _directory()
    for cut in range(len(parts) - 1, 0, -1):
        release = "/".join(parts[:cut])
        if release in directory:
            sae_id = "/".join(parts[cut:])
            known = directory[release].saes_map
            if sae_id not in known:
                close = difflib.get_close_matches(sae_id, list(known), n=5, cutoff=0.5)
                raise DarkMatterError(
                    f"SAELens release {release!r} has no SAE {sae_id!r}"
                    + (f"; close matches: {close}" if close else "")
                    + f" ({len(known)} SAEs, e.g. {list(known)[:3]})"
                )
            return release, sae_id
    if len(parts) >= 3:
        return "/".join(parts[:2]), "/".join(parts[2:])
    close = difflib.get_close_matches(parts[0], list(directory), n=5, cutoff=0.5)
    raise DarkMatterError(
        f"{spec!r} names no SAELens release"
        + (f"; close matches: {close}" if close else "")
        + f". Use {REGISTRY_PREFIX}<release>/<sae_id> (a release from SAELens's "
        "pretrained_saes.yaml, or an HF repo id org/name holding SAELens folders)"
    )


def load_pretrained(
    spec: str, *, device: str | torch.device = "cpu", norm_scaling_factor: float | None = None
) -> tuple[AffineSAE, dict[str, Any]]:
    """Our SAE and its provenance for a registry spec (see ``parse_spec``).

    Offline (``HF_HUB_OFFLINE=1``) files must already be in the local Hugging Face cache;
    otherwise a ``ModelNotAvailableError`` names the release and id.
    """
    release, sae_id, cfg, state, raw_cfg = _fetch(spec)
    where = f"{REGISTRY_PREFIX}{release}/{sae_id}"
    scale = norm_scale(cfg, where, norm_scaling_factor)
    sae = sae_from_saelens(cfg, state, where=where, scale=scale)
    return sae.to(resolve_device(str(device))), _provenance(release, sae_id, cfg, sae, raw_cfg)


def load_pretrained_transcoder(
    spec: str, *, device: str | torch.device = "cpu", norm_scaling_factor: float | None = None
) -> tuple[Transcoder, dict[str, Any]]:
    """Our transcoder and its provenance for a registry spec naming a SAELens transcoder; an
    SAE becomes a transcoder from its hook to itself (``norm_scaling_factor`` as for
    ``load_pretrained``, for SAEs only)."""
    release, sae_id, cfg, state, raw_cfg = _fetch(spec)
    where = f"{REGISTRY_PREFIX}{release}/{sae_id}"
    if cfg["architecture"] not in SAELENS_TRANSCODERS:
        scale = norm_scale(cfg, where, norm_scaling_factor)
        sae = sae_from_saelens(cfg, state, where=where, scale=scale)
        tc, prov = sae_as_transcoder(sae, _provenance(release, sae_id, cfg, sae, raw_cfg))
    else:
        if norm_scaling_factor is not None:
            raise DarkMatterError(f"{where}: norm_scaling_factor applies to SAEs, not transcoders")
        tc = transcoder_from_saelens(cfg, state, where=where)
        meta = cfg.get("metadata") or {}
        out = meta.get("hook_name_out", cfg.get("hook_name_out"))
        prov = transcoder_provenance(_provenance(release, sae_id, cfg, tc.sparse, raw_cfg), tc,
                                     translate_hook(out), out)
    return tc.to(resolve_device(str(device))), prov


def _fetch(
    spec: str,
) -> tuple[str, str, dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(release, sae_id, config dict, state dict, raw config)`` of a registry spec, loaded by
    sae_lens (see ``load_pretrained`` for the errors)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    release, sae_id = parse_spec(spec)
    sae_lens = import_sae_lens()
    try:
        with _tensor_shapes_from_files():
            theirs, raw_cfg, _ = sae_lens.SAE.from_pretrained_with_cfg_and_sparsity(
                release, sae_id, device="cpu")
    except LocalEntryNotFoundError as exc:
        from huggingface_hub import constants

        why = ("HF_HUB_OFFLINE=1 forbids downloading them; run once online"
               if constants.HF_HUB_OFFLINE else "downloading them failed")
        raise ModelNotAvailableError(
            f"SAELens SAE {release}/{sae_id}: its files are not in the local Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}) and {why}"
        ) from exc
    except (EntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError) as exc:
        raise ModelNotAvailableError(f"SAELens SAE {release}/{sae_id}: {exc}") from exc
    except SafetensorError as exc:
        from huggingface_hub import constants

        raise CorruptSAEError(
            f"SAELens SAE {release}/{sae_id}: its cached weights file is damaged ({exc}); "
            f"delete the repo's folder in {constants.HF_HUB_CACHE} and download it again"
        ) from exc
    return release, sae_id, theirs.cfg.to_dict(), theirs.state_dict(), raw_cfg


@contextmanager
def _tensor_shapes_from_files() -> Iterator[None]:
    """Let sae_lens read tensor shapes from the safetensors file itself while it loads.

    For some releases (Gemma Scope 2: ``conversion_func: gemma_3``) sae_lens asks the Hub for
    the shapes with HTTP range requests, which fail offline even when the file is in the local
    cache. Meanwhile the shapes come from the file's header, found through the Hugging Face
    cache (downloaded first when online, which the loader does next anyway).
    """
    from huggingface_hub import hf_hub_download
    from sae_lens.loading import pretrained_sae_loaders as loaders

    original = getattr(loaders, "get_safetensors_tensor_shapes", None)
    if original is None:  # a sae_lens that no longer reads shapes remotely
        yield
        return

    def from_file(repo_id: str, filename: str) -> dict[str, list[int]]:
        with safe_open(hf_hub_download(repo_id, filename), "pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}

    loaders.get_safetensors_tensor_shapes = from_file
    try:
        yield
    finally:
        loaders.get_safetensors_tensor_shapes = original


def _provenance(
    release: str, sae_id: str, cfg: dict[str, Any], sae: AffineSAE, raw_cfg: dict[str, Any]
) -> dict[str, Any]:
    """Where a registry SAE came from and what it was trained on, in our names."""
    directory = _directory()
    entry = directory.get(release)
    meta = cfg.get("metadata") or {}
    model_name = meta.get("model_name") or (entry.model if entry else None)
    original_hook = meta.get("hook_name")
    hook, note = translate_hook(original_hook)
    repo_id = entry.repo_id if entry else release
    path = entry.saes_map[sae_id] if entry else sae_id
    return {
        "library": "sae_lens",
        "source": f"{REGISTRY_PREFIX}{release}/{sae_id}",  # a spec open_sae loads again
        "release": release,
        "sae_id": sae_id,
        "repo_id": repo_id,
        "repo_path": path,
        "architecture": cfg["architecture"],
        "loaded_as": architecture_name(sae),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k if isinstance(sae, TopKSAE) else None,
        "dtype": _cached_dtype(repo_id, path),
        "model_name": model_name,
        "model": hf_model_id(model_name),
        "hook_name": hook,
        "original_hook_name": original_hook,
        "notes": [note] if note else [],
        # Converted releases (Gemma Scope 2) state their training data at the top level of the
        # raw config; SAELens keeps only its metadata keys on the SAE.
        "trained_with": trained_with({**raw_cfg, "metadata": meta}),
    } | ({"matryoshka_widths": nested} if (nested := matryoshka_widths(cfg)) else {})


# weights file and decoder tensor of the layouts whose stored dtype we report
_WEIGHT_FILES = (
    ("sae_weights.safetensors", "W_dec"),
    ("params.safetensors", "w_dec"),
)  # SAELens, Gemma Scope 2


def _cached_dtype(repo_id: str, path: str) -> str | None:
    """dtype of the decoder in the cached weights file (None for other layouts)."""
    from huggingface_hub import try_to_load_from_cache

    for filename, tensor in _WEIGHT_FILES:
        found = try_to_load_from_cache(repo_id, f"{path}/{filename}".lstrip("/"))
        if isinstance(found, str):
            return safetensors_dtype(found, tensor)
    return None
