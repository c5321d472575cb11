"""The pipeline's stages on one store: train SAEs, open SAEs and transcoders by spec, and
decompose them with per-item caching (results keyed by store, splits, weights and settings).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sae_darkmatter import distributed
from sae_darkmatter._io import read_json, require_folder, write_json
from sae_darkmatter.adopt import warn_store_differences
from sae_darkmatter.config import (
    DecomposeConfig,
    SAETrainConfig,
    SplitConfig,
    fingerprint,
)
from sae_darkmatter.decompose import (
    DecompositionOutput,
    LatentOrder,
    check_sae,
    check_transcoder,
    decompose_many,
    decompose_prefixes,
    decompose_transcoders,
    plan_prefixes,
    prefix_name,
    require_finite,
)
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.harvest import harvest_summary
from sae_darkmatter.saes.formats import LoadedSAE, open_sae
from sae_darkmatter.saes.io import weights_digest
from sae_darkmatter.saes.registry import REGISTRY_PREFIX
from sae_darkmatter.saes.train import train_grid
from sae_darkmatter.saes.transcoder_formats import LoadedTranscoder, open_transcoder
from sae_darkmatter.splits import Splits, make_splits
from sae_darkmatter.store import ActivationStore

log = logging.getLogger(__name__)


T = TypeVar("T")
DECOMPOSE_VERSION = 2  # part of the decomposition cache key: bump when its outputs change


def train_saes(
    store: ActivationStore,
    splits: Splits,
    cfg: SAETrainConfig,
    out_dir: str | Path,
    *,
    hook: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Train ``cfg``'s width × sparsity grid on the SAE-training split, in one pass over the
    data."""
    hook = hook or next(iter(store.hooks))
    if splits.sae_train.size == 0:
        raise DarkMatterError("the SAE-training split is empty (split.sae_train_fraction = 0)")
    x = store.gather(hook, splits.sae_train)
    require_finite(x, splits.sae_train, store, hook)
    return train_grid(x, cfg, out_dir, metadata=train_metadata(store, hook), progress=progress)


def train_metadata(store: ActivationStore, hook: str) -> dict[str, Any]:
    """The SAELens metadata of an SAE trained on ``store``'s ``hook``: model, hook, context
    size and BOS convention (what ``adopt`` later reads back)."""
    return {"model_name": store.meta.get("model_name"), "hook_name": hook,
            "context_size": store.context_length,
            "prepend_bos": bool(store.meta.get("prepend_bos", False))}


def sae_label(spec: str | Path) -> str:
    """A file-name-safe name for an SAE spec: the folder name, or ``release__id`` from a
    registry."""
    text = str(spec)
    if text.startswith(REGISTRY_PREFIX):
        text = text[len(REGISTRY_PREFIX):]
    else:
        text = Path(text).resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "__")).strip("_.") or "sae"


def open_saes(specs: Sequence[str | Path], *, device: str = "cpu") -> dict[str, LoadedSAE]:
    """Load SAEs by spec (registry names or folders of any supported format), keyed by label."""
    return _labelled(specs, lambda spec: open_sae(spec, device=device), "SAEs")


def open_transcoders(specs: Sequence[str | Path]) -> dict[str, LoadedTranscoder]:
    """Load transcoders by spec (as ``open_transcoder`` takes them), keyed by label."""
    return _labelled(specs, open_transcoder, "transcoders")


def _labelled(specs: Sequence[str | Path], load: Callable[[str | Path], T],
              what: str) -> dict[str, T]:
    loaded: dict[str, T] = {}
    sources: dict[str, str | Path] = {}
    for spec in specs:
        label = sae_label(spec)
        if label in loaded:
            raise DarkMatterError(
                f"two {what} would share the result name {label!r} ({spec!r} and "
                f"{str(sources[label])!r}); give folders distinct names"
            )
        loaded[label], sources[label] = load(spec), spec
    return loaded


def decompose_saes(
    store: ActivationStore,
    splits: Splits,
    saes: Sequence[str | Path],
    cfg: DecomposeConfig,
    out_dir: str | Path,
    *,
    hook: str | None = None,
    progress: bool = True,
    check_training: bool = True,
) -> list[dict[str, Any]]:
    """Decompose each SAE's error; results are cached by (store, splits, SAE weights, cfg).

    ``saes`` are specs as ``open_sae`` takes them: ``saelens:<release>/<id>`` or folders.
    ``check_training`` warns about SAEs trained with another BOS convention or context length
    than the store's (``run`` has already followed or warned about those).
    """
    require_folder(Path(out_dir), "the decomposition results")
    hook = hook or next(iter(store.hooks))
    loaded = open_saes(saes)
    if check_training and distributed.is_main():
        warn_store_differences(store.meta, store.context_length, loaded)
    items = {name: (item.sae, item.provenance, {}) for name, item in loaded.items()}
    return _decompose_cached(
        store, splits, items, cfg, Path(out_dir), hook,
        lambda todo: decompose_many(store, todo, splits, cfg, hook=hook, progress=progress))


def decompose_transcoder_specs(
    store: ActivationStore,
    splits: Splits | SplitConfig,
    specs: Sequence[str | Path],
    cfg: DecomposeConfig,
    out_dir: str | Path,
    *,
    hook_in: str | None = None,
    hook_out: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """``decompose_saes`` for transcoders (specs as ``open_transcoder`` takes them): the error
    ``y − ŷ`` at the output hook, probed from the input hook's ``x`` (``decompose_transcoders``).

    Each transcoder's hooks come from its metadata unless ``hook_in`` / ``hook_out`` are given;
    transcoders of the same hooks share one pass. ``splits`` given as a ``SplitConfig`` are
    made per input hook (its norms feed the outlier filter). Each result records the
    transcoder's provenance and ``transcoder: {hook_in, hook_out, skip}``.
    """
    require_folder(Path(out_dir), "the decomposition results")
    loaded = open_transcoders(specs)
    if distributed.is_main():
        warn_store_differences(store.meta, store.context_length, loaded)
    by_hooks: dict[tuple[str, str], dict[str, tuple[Any, dict[str, Any], dict[str, Any]]]] = {}
    for name, item in loaded.items():
        hooks = _transcoder_hooks(name, item, hook_in, hook_out)
        check_transcoder(name, item.transcoder, store, hooks[0], hooks[1])  # before any work
        record = {"transcoder": {"hook_in": hooks[0], "hook_out": hooks[1],
                                 "skip": item.transcoder.has_skip}}
        by_hooks.setdefault((hooks[0], hooks[1]), {})[name] = (
            item.transcoder, item.provenance, record)
    results = {}
    for (h_in, h_out), items in by_hooks.items():
        rows = make_splits(store, splits, hook=h_in) if isinstance(splits, SplitConfig) else splits

        def run(todo: dict[str, Any], rows: Splits = rows, h_in: str = h_in,
                h_out: str = h_out) -> dict[str, Any]:
            return decompose_transcoders(store, todo, rows, cfg, hook_in=h_in, hook_out=h_out,
                                         progress=progress)

        done = _decompose_cached(store, rows, items, cfg, Path(out_dir), [h_in, h_out], run)
        results |= {r["name"]: r for r in done}
    return [results[name] for name in loaded]


def decompose_sae_prefixes(
    store: ActivationStore,
    splits: Splits,
    spec: str | Path,
    cfg: DecomposeConfig,
    out_dir: str | Path,
    *,
    widths: Sequence[int] | None = None,
    order: LatentOrder = "stored",
    hook: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """``decompose_prefixes`` of the SAE ``spec`` names, cached as ``decompose_saes`` caches SAEs:
    one result ``<sae>__prefix<m>`` per width ``m``, recording ``prefix: {of, width, d_sae,
    order}`` (with the SAE's provenance and ``metrics.d_sae = m``).

    Default widths: a Matryoshka SAE's ``matryoshka_widths`` (from its ``cfg.json``), else W/16,
    W/8, W/4, W/2, W (``plan_prefixes``, which also checks them and warns about orders that
    are not the SAE's own nesting).
    """
    require_folder(Path(out_dir), "the decomposition results")
    hook = hook or next(iter(store.hooks))
    [(name, item)] = open_saes([spec]).items()
    if distributed.is_main():
        warn_store_differences(store.meta, store.context_length, {name: item})
    sae = item.sae
    chosen = plan_prefixes(name, sae, item.provenance.get("matryoshka_widths"), widths, order)
    check_sae(name, sae, store, hook)
    items = {f"{name}__{prefix_name(m)}": (sae, item.provenance, {"prefix": {
        "of": name, "width": m, "d_sae": sae.d_sae, "order": order}}) for m in chosen}

    def run(todo: dict[str, Any]) -> dict[str, DecompositionOutput]:
        done = decompose_prefixes(store, sae, splits, cfg, order=order, hook=hook,
                                  progress=progress,
                                  widths=[items[n][2]["prefix"]["width"] for n in todo])
        return {f"{name}__{prefix_name(m)}": out for m, out in done.items()}

    return _decompose_cached(store, splits, items, cfg, Path(out_dir), hook, run)


def _transcoder_hooks(name: str, item: LoadedTranscoder, hook_in: str | None,
                      hook_out: str | None) -> tuple[str, str]:
    """(input hook, output hook): those given, else the transcoder's own."""
    h_in, h_out = hook_in or item.hook_in, hook_out or item.hook_out
    if h_in is None or h_out is None:
        side, key = ("in", "original_hook_name") if h_in is None else (
            "out", "original_hook_name_out")
        raise DarkMatterError(
            f"transcoder {name!r}: its {side}put hook {item.provenance.get(key)!r} matches no "
            f"hook here; give one (--hook-{side}; Python: hook_{side}=), e.g. mlp_{side}.L")
    return h_in, h_out


def _decompose_cached(
    store: ActivationStore,
    splits: Splits,
    items: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]],
    cfg: DecomposeConfig,
    out_dir: Path,
    hooks: Any,
    decompose: Callable[[dict[str, Any]], dict[str, DecompositionOutput]],
) -> list[dict[str, Any]]:
    """Run ``decompose`` on the items (name: (module, provenance, extra record)) whose cached
    result is missing or stale, write ``<name>.json`` and ``.safetensors``, return every
    item's record. The cache key is (store, splits, ``hooks``, module weights, cfg), plus an
    SAE prefix's record (width and order)."""
    split_hash = hashlib.sha256(splits.probe_train.tobytes() + splits.probe_test.tobytes())
    fingerprints, todo, groups = {}, {}, {}
    for name, (module, _, extra) in items.items():
        fingerprints[name] = fingerprint(
            DECOMPOSE_VERSION, store.meta.get("harvest_fingerprint"), store.n_rows, hooks,
            split_hash.hexdigest(), cfg, weights_digest(module),
            *([extra["prefix"]] if "prefix" in extra else []),
        )
        result_path = out_dir / f"{name}.json"
        cached = read_json(result_path) if result_path.exists() else {}
        if cached.get("fingerprint") != fingerprints[name]:
            todo[name] = module
        groups[name] = cached.get("group", [name])
    # The items of one call share one least-squares system, whose rounding depends on which
    # items are in it: a group that a kill interrupted is redone whole, so the rerun's probes
    # equal an uninterrupted run's bit for bit.
    todo = {n: items[n][0] for n in items if n in todo or set(groups[n]) & set(todo)}
    if todo:
        outputs = decompose(todo)
        for name, out in outputs.items() if distributed.is_main() else ():
            out.save(out_dir / f"{name}.safetensors")
            _, prov, extra = items[name]
            write_json(out_dir / f"{name}.json", {
                "name": name,
                "fingerprint": fingerprints[name],
                "sae": {**prov, "path": str(prov.get("source")),
                        "architecture": prov.get("architecture"), "k": prov.get("k")},
                **extra,
                "model": store.meta.get("model_name"),
                "harvest": harvest_summary(store),
                "data": splits.summary(),
                "metrics": out.metrics.to_dict(),
                "probe_file": f"{name}.safetensors",
                "group": list(todo),
            })
        distributed.barrier()
    return [read_json(out_dir / f"{name}.json") for name in items]


