"""What an SAE's files say about the data it was trained on, in one normalized form.

SAELens records how the activations of training were harvested in ``cfg.json``'s ``metadata``
(converted releases such as Gemma Scope put some keys at the top level instead):
``prepend_bos``, ``context_size``, ``seqpos_slice``, ``exclude_special_tokens``,
``model_from_pretrained_kwargs``, ``dataset_path`` and, rarely, ``sequence_separator_token``.
sparsify's and dictionary_learning's run configs record the context length (``ctx_len``) and
the dataset. ``trained_with`` keeps the keys a file states, with their values normalized;
``sae_darkmatter.adopt`` makes a run follow them.
"""

from __future__ import annotations

from typing import Any

KEYS = ("prepend_bos", "context_size", "seqpos_slice", "exclude_special_tokens",
        "model_from_pretrained_kwargs", "dataset_path", "sequence_separator_token")


def trained_with(cfg: dict[str, Any]) -> dict[str, Any]:
    """The training-data settings a SAELens-style config states (``KEYS``; absent ones left out).

    ``seqpos_slice`` becomes ``[start, stop, step]`` (dropped when it selects every position);
    empty ``model_from_pretrained_kwargs`` and ``exclude_special_tokens = False`` are dropped
    (they ask for nothing).
    """
    meta = cfg.get("metadata") or {}
    out: dict[str, Any] = {}
    for key in KEYS:
        value: Any = meta.get(key, cfg.get(key))
        if key == "seqpos_slice":
            value = _positions(value)
        if value is None or value == {} or (key == "exclude_special_tokens" and value is False):
            continue
        out[key] = int(value) if key == "context_size" else value
    return out


def matryoshka_widths(cfg: dict[str, Any]) -> list[int] | None:
    """The nested prefix widths a Matryoshka SAE's ``cfg.json`` records, or None.

    SAELens saves a Matryoshka BatchTopK SAE for inference as a JumpReLU SAE and keeps the
    settings only training uses in ``metadata.training_architecture_details``; its
    ``matryoshka_widths`` are cumulative: the first ``w`` latents form the group-nested
    dictionary of width ``w`` (ascending, the last one ``d_sae``). Values are returned as
    stated; ``decompose.prefixes`` checks them against the SAE.
    """
    details = (cfg.get("metadata") or {}).get("training_architecture_details")
    widths = details.get("matryoshka_widths") if isinstance(details, dict) else None
    if not isinstance(widths, list) or not widths:
        return None
    return [int(w) for w in widths]


def run_config_training(run_cfg: dict[str, Any]) -> dict[str, Any]:
    """``context_size`` and ``dataset_path`` from a sparsify or dictionary_learning run config."""
    buffer = run_cfg.get("buffer")
    if not isinstance(buffer, dict):
        buffer = {}
    out: dict[str, Any] = {}
    ctx_len = run_cfg.get("ctx_len", buffer.get("ctx_len"))
    if isinstance(ctx_len, int) and ctx_len > 0:
        out["context_size"] = ctx_len
    dataset = run_cfg.get("dataset")
    if isinstance(dataset, str) and dataset:
        out["dataset_path"] = dataset
    return out


def _positions(value: Any) -> list[int | None] | None:
    """``[start, stop, step]`` of a seqpos slice, None when it keeps every position."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    items: list[Any] = list(value)
    start, stop, step = (
        (items + [None, None, None])[:3] if len(items) > 1 else (None, items[0], None)
    )
    if not start and stop is None and step in (None, 1):
        return None
    return [start, stop, step]
