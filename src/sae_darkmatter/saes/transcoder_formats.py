"""Open a transcoder, or any sparse replacement, from SAELens's registry or a folder.

``open_transcoder(spec)`` takes what ``open_sae`` takes. These load as ``Transcoder``:

- SAELens folders and registry entries of its transcoder architectures (``transcoder``,
  ``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``). Their input hook
  is ``hook_name`` and their output hook ``hook_name_out`` (SAELens's metadata).
- sparsify folders trained with ``transcode`` (``b_dec`` not subtracted from the input) and/or
  ``skip_connection``. The folder is named after the module whose input a transcoder reads and
  whose output it predicts: ``layers.L.mlp`` reads ``mlp_in.L`` and predicts ``mlp_out.L``; a
  skip SAE reads and predicts the module's output.

Any other SAE loads as the transcoder from its hook to itself (no skip term), so later stages
can treat every sparse replacement alike. Outputs are checked against sae_lens and sparsify
themselves in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_darkmatter._io import resolve_device
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.saes import registry
from sae_darkmatter.saes.formats import detect_format, open_sae, read_sparsify, sae_folder
from sae_darkmatter.saes.hooks import translate_hook, translate_module_input
from sae_darkmatter.saes.io import (
    SAELENS_TRANSCODERS,
    WEIGHTS_FILENAME,
    load_sae_config,
    read_tensors,
    safetensors_dtype,
)
from sae_darkmatter.saes.metadata import trained_with
from sae_darkmatter.saes.tensors import folder_provenance
from sae_darkmatter.saes.transcoder import (
    Transcoder,
    sae_as_transcoder,
    transcoder_from_saelens,
    transcoder_provenance,
)


@dataclass(frozen=True)
class LoadedTranscoder:
    """A transcoder ready for the analyses, and where it came from.

    ``provenance`` has ``formats.LoadedSAE``'s keys, ``hook_name`` being the input hook, plus
    ``d_out``, ``skip`` (whether it has a skip term), ``hook_name_out`` (ours, or None) and
    ``original_hook_name_out``. For an SAE both hooks are its hook.
    """

    transcoder: Transcoder
    provenance: dict[str, Any]

    @property
    def hook_in(self) -> str | None:
        """Our hook of the activations ``x`` it reads, or None when none of ours matches."""
        return self.provenance["hook_name"]

    @property
    def hook_out(self) -> str | None:
        """Our hook of the activations ``y`` it predicts, or None when none of ours matches."""
        return self.provenance["hook_name_out"]


def open_transcoder(
    spec: str | Path,
    *,
    device: str | torch.device = "cpu",
    norm_scaling_factor: float | None = None,
) -> LoadedTranscoder:
    """Load a transcoder (or an SAE, as one) from the SAELens registry or a folder.

    ``device`` may be ``"auto"``; ``norm_scaling_factor`` is ``open_sae``'s, for SAELens SAEs
    only (no transcoder format records one).
    """
    text = str(spec)
    if text.startswith(registry.REGISTRY_PREFIX):
        tc, prov = registry.load_pretrained_transcoder(
            text, device=device, norm_scaling_factor=norm_scaling_factor)
        return LoadedTranscoder(tc, prov)
    path = sae_folder(text)
    fmt = detect_format(path)
    saelens_tc = fmt == "sae_lens" and load_sae_config(path)["architecture"] in SAELENS_TRANSCODERS
    if saelens_tc or fmt == "sparsify":
        if norm_scaling_factor is not None:
            raise DarkMatterError(f"{path}: norm_scaling_factor applies only to SAELens SAEs")
        tc, prov = _open_saelens(path) if saelens_tc else _open_sparsify(path)
    else:
        loaded = open_sae(path, norm_scaling_factor=norm_scaling_factor)
        tc, prov = sae_as_transcoder(loaded.sae, loaded.provenance)
    return LoadedTranscoder(tc.to(resolve_device(str(device))), prov)


def _open_saelens(path: Path) -> tuple[Transcoder, dict[str, Any]]:
    cfg = load_sae_config(path)
    weights = path / WEIGHTS_FILENAME
    tc = transcoder_from_saelens(cfg, read_tensors(weights), where=str(weights))
    meta = cfg.get("metadata") or {}
    model_name = meta.get("model_name", cfg.get("model_name"))
    original_in = meta.get("hook_name", cfg.get("hook_name"))
    original_out = meta.get("hook_name_out", cfg.get("hook_name_out"))
    hook, note = translate_hook(original_in)
    prov = folder_provenance(
        "sae_lens", path, cfg["architecture"], tc.sparse, safetensors_dtype(weights, "W_dec"),
        model_name, registry.hf_model_id(model_name), hook, original_in, [note] if note else [],
        trained_with(cfg),
    )
    return tc, transcoder_provenance(prov, tc, translate_hook(original_out), original_out)


def _open_sparsify(path: Path) -> tuple[Transcoder, dict[str, Any]]:
    folder = read_sparsify(path)
    tc, prov = Transcoder(folder.sae, folder.W_skip), folder.provenance
    if not folder.transcode and folder.W_skip is None:
        return sae_as_transcoder(folder.sae, prov)
    if not folder.transcode:  # a skip SAE: reads and predicts the module's output
        return tc, transcoder_provenance(prov, tc, (prov["hook_name"], None), path.name)
    hook_in, note = translate_module_input(path.name)  # the module's input
    prov = prov | {"hook_name": hook_in, "notes": [note] if note else []}
    return tc, transcoder_provenance(prov, tc, translate_hook(path.name), path.name)
