"""Transcoders: sparse replacements of the map from one hook's activations to another's.

A transcoder reads ``x`` at its input hook (e.g. ``mlp_in.L``) and predicts ``y`` at its output
hook (``mlp_out.L``): ``y_hat = decode(encode(x)) + skip(x)``. ``encode``/``decode`` are those
of an SAE whose decoder is ``d_out`` wide (``AffineSAE``; SAELens and sparsify transcoders do not
subtract ``b_dec`` from the input), and ``skip(x) = x @ W_skip.T`` is the dense linear term of a
skip transcoder (SAELens's ``SkipTranscoder``, sparsify's ``skip_connection``; ``W_skip`` is
``[d_out, d_in]`` in both), zero without one. Its error is ``y - y_hat``. An SAE is the case of
one hook and no skip term; sparsify's skip SAEs add the skip term to an SAE.

It is held by composition rather than as one class per (activation, skip) pair: ``sparse`` is
any of our SAE classes, so each activation rule (ReLU, JumpReLU, TopK, Gated) has one
implementation, and the transcoder only adds the output width and the skip term.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.saes.archs import SAE_CLASSES
from sae_darkmatter.saes.io import (
    SAELENS_TRANSCODERS,
    architecture_name,
    check_weights,
    normalize_config,
    refuse_settings,
    sae_config,
    write_saelens_folder,
)
from sae_darkmatter.saes.topk import AffineSAE, TopKSAE


class Transcoder(nn.Module):
    """``y_hat = decode(encode(x)) + skip(x)`` for ``x [..., d_in]`` and ``y [..., d_out]``.

    ``encode`` gives the dense latents ``[..., d_sae]``; ``decode`` the sparse part of the output
    (``b_dec`` included, no skip term); ``skip`` the skip term alone (zeros without ``W_skip``);
    ``forward`` their sum, the full output ``y_hat``.
    """

    W_skip: nn.Parameter | None

    def __init__(self, sparse: AffineSAE, W_skip: torch.Tensor | None = None) -> None:
        super().__init__()
        want = (sparse.d_out, sparse.d_in)
        if W_skip is not None and tuple(W_skip.shape) != want:
            raise ValueError(f"W_skip must be [d_out, d_in] = {list(want)}, "
                             f"got {list(W_skip.shape)}")
        self.sparse = sparse
        self.W_skip = None if W_skip is None else nn.Parameter(W_skip.to(sparse.W_dec.dtype))

    @property
    def d_in(self) -> int:
        return self.sparse.d_in

    @property
    def d_out(self) -> int:
        return self.sparse.d_out

    @property
    def d_sae(self) -> int:
        return self.sparse.d_sae

    @property
    def has_skip(self) -> bool:
        return self.W_skip is not None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``[..., d_sae]`` of inputs ``x [..., d_in]``."""
        return self.sparse.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The sparse part of the output, ``z @ W_dec + b_dec`` ``[..., d_out]`` (no skip term)."""
        return self.sparse.decode(z)

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The skip term ``x @ W_skip.T`` ``[..., d_out]``; zeros without a skip connection."""
        if self.W_skip is None:
            w = self.sparse.W_dec
            return torch.zeros(*x.shape[:-1], self.d_out, dtype=w.dtype, device=w.device)
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The full output ``y_hat = decode(encode(x)) + skip(x)``; the error is ``y - y_hat``."""
        return self.sparse(x) + self.skip(x)

    def extra_repr(self) -> str:
        return f"skip={self.has_skip}"


def transcoder_architecture(tc: Transcoder) -> str:
    """SAELens's name for a transcoder of this kind (``"jumprelu_skip_transcoder"``), and the
    same pattern for kinds SAELens has no class for (sparsify's ``"topk_transcoder"``)."""
    base = architecture_name(tc.sparse)
    prefix = "" if base == "standard" else f"{base}_"
    return f"{prefix}{'skip_' if tc.has_skip else ''}transcoder"


def save_transcoder(tc: Transcoder, path: str | Path, *, metadata: dict[str, Any]) -> None:
    """Write ``tc`` as a SAELens transcoder folder (``sae_lens.SAE.load_from_disk`` and
    ``open_transcoder`` load it); ``metadata`` needs ``hook_name`` and ``hook_name_out``.

    Only kinds SAELens has are written: a ReLU or JumpReLU sparse part, with or without a skip
    term (``SAELENS_TRANSCODERS``).
    """
    arch = transcoder_architecture(tc)
    if arch not in SAELENS_TRANSCODERS:
        raise DarkMatterError(f"SAELens has no {arch!r}; it saves "
                              f"{sorted(SAELENS_TRANSCODERS)}")
    missing = [key for key in ("hook_name", "hook_name_out") if not metadata.get(key)]
    if missing:
        raise DarkMatterError(f"a transcoder's metadata needs {missing}")
    cfg = sae_config(tc.sparse, metadata) | {"architecture": arch, "d_out": tc.d_out}
    names = type(tc.sparse).saelens_names
    tensors = {names.get(name, name): t for name, t in tc.sparse.state_dict().items()}
    write_saelens_folder(path, cfg, tensors | ({} if tc.W_skip is None else
                                               {"W_skip": tc.W_skip}))


def transcoder_from_saelens(
    cfg: dict[str, Any], state: dict[str, torch.Tensor], *, where: str
) -> Transcoder:
    """Our float32 transcoder from a SAELens transcoder's config dict and state dict.

    SAELens's transcoders encode ``x`` as it comes (no ``b_dec`` subtraction, which it refuses
    for them) and add ``x @ W_skip.T`` when they have a skip connection. Input normalisation
    is refused: SAELens normalises a transcoder's input but never un-normalises its output,
    and records no factor for either side.
    """
    cfg = normalize_config(cfg)
    arch = cfg["architecture"]
    if arch not in SAELENS_TRANSCODERS:
        raise DarkMatterError(f"{where}: architecture {arch!r} is not a SAELens transcoder "
                              f"(those are {sorted(SAELENS_TRANSCODERS)})")
    refuse_settings(cfg, where)
    mode = cfg.get("normalize_activations", "none")
    if mode != "none":
        raise DarkMatterError(
            f"{where}: unsupported transcoder setting normalize_activations={mode!r}: SAELens "
            "rescales a transcoder's input without restoring its output, and records no "
            "scaling factor for either (supported: 'none')")
    if cfg.get("apply_b_dec_to_input", False):
        raise DarkMatterError(f"{where}: apply_b_dec_to_input=True on a transcoder: b_dec "
                              "is an output bias (SAELens refuses this config too)")
    if "d_out" not in cfg:
        raise DarkMatterError(f"{where}: a {arch} config needs d_out (its output width)")
    base, skip = SAELENS_TRANSCODERS[arch]
    d_in, d_sae, d_out = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["d_out"])
    cls = SAE_CLASSES[base]
    extra = {"W_skip": (d_out, d_in)} if skip else {}
    tensors = check_weights(state, where, cls, d_in, d_sae, d_out, extra, arch=arch)
    w_skip = tensors.pop("W_skip", None)
    sparse = cls.for_config(d_in, d_sae, cfg, d_out=d_out, apply_b_dec_to_input=False)
    cls.adapt_saelens_state(cfg, tensors)
    sparse.load_state_dict(tensors)
    return Transcoder(sparse, w_skip)


def transcoder_provenance(
    prov: dict[str, Any], tc: Transcoder, hook_out: tuple[str | None, str | None],
    original_out: str | None,
) -> dict[str, Any]:
    """An SAE-style provenance (``formats.LoadedSAE``) of ``tc``'s sparse part, completed for
    the transcoder: ``loaded_as``, ``d_out``, ``skip``, ``hook_name_out`` (ours, from
    ``hook_out = (hook, note)``) and ``original_hook_name_out``. ``hook_name`` is the input."""
    hook, note = hook_out
    sparse = tc.sparse
    return prov | {
        "loaded_as": transcoder_architecture(tc), "d_in": tc.d_in, "d_out": tc.d_out,
        "d_sae": tc.d_sae, "k": sparse.k if isinstance(sparse, TopKSAE) else None,
        "skip": tc.has_skip, "hook_name_out": hook, "original_hook_name_out": original_out,
        "notes": [*prov.get("notes", []), *([note] if note else [])],
    }


def sae_as_transcoder(sae: AffineSAE, prov: dict[str, Any]) -> tuple[Transcoder, dict[str, Any]]:
    """An SAE as the transcoder from its hook to itself (no skip term), with its provenance
    completed: ``d_out``, ``skip``, ``hook_name_out`` and ``original_hook_name_out``."""
    return Transcoder(sae), prov | {
        "d_out": sae.d_out, "skip": False, "hook_name_out": prov.get("hook_name"),
        "original_hook_name_out": prov.get("original_hook_name"),
    }
