"""Analyses: each reads a run folder (store, SAEs, decompositions) and returns JSON-able results plus figures.

``run_analyses(run_dir)`` runs all of them on a finished run and writes ``analyses.json``; the
report stage adds their sections to ``report.html`` and ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_darkmatter._io import read_json, write_json
from sae_darkmatter.config import RunConfig, fingerprint
from sae_darkmatter.errors import DarkMatterError

log = logging.getLogger(__name__)

# in run order: the encoder-error band feeds the scaling figure
ANALYSES = ("encoder_error", "scaling", "per_token", "norms", "cross_layer", "error_saes",
            "downstream")
RESULTS_FILE = "analyses.json"
VERSION = 1  # part of every analysis's cache key: bump when any result's meaning changes


def _inputs(run_dir: Path, store: Any) -> list[Any]:
    """What every analysis reads: the store, the decompositions and the SAE weight files.

    Weights enter by content (sha256), not by file stamps: a rewrite with the same bytes (an SAE
    retrained after a kill) keeps the cached results, and the key is the same in any folder.
    """
    decs = {
        p.stem: read_json(p).get("fingerprint")
        for p in sorted((run_dir / "decompose").glob("*.json"))
    }
    weights = [(str(p.relative_to(run_dir)), _sha256(p))
               for p in sorted((run_dir / "saes").glob("**/sae_weights.safetensors"))]
    return [store.meta.get("harvest_fingerprint"), store.n_rows, decs, weights]


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _relative_figures(result: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Figure paths relative to ``run_dir``, as ``_reusable`` and the report expect.

    Some analyses return ``run_dir / "figures/..."``; with a relative ``run_dir`` that path is
    relative to the working directory, and the cached result was never found reusable.
    """
    figures = result.get("figures")
    if not isinstance(figures, dict):
        return result
    rel = {k: str(Path(v).relative_to(run_dir)) if Path(v).is_relative_to(run_dir) else v
           for k, v in figures.items()}
    return {**result, "figures": rel}


def _reusable(result: Any, key: str, run_dir: Path) -> bool:
    """A previous result with the same key whose figures are all still there."""
    if not isinstance(result, dict) or result.get("fingerprint") != key or "skipped" in result:
        return False
    return all((run_dir / f).is_file() for f in result.get("figures", {}).values())


def run_analyses(
    run_dir: str | Path,
    *,
    only: tuple[str, ...] | None = None,
    cfg: RunConfig = RunConfig(),
    tokenizer: Any | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the chosen analyses (default: every one ``cfg`` enables) on ``run_dir``.

    A failing analysis (e.g. the scaling fit with fewer than 3 widths) is recorded with its
    message instead of stopping the others. Results are merged into ``run_dir/analyses.json``;
    a result there whose inputs (store, decompositions, SAE files) and settings are unchanged
    is reused, not recomputed.
    """
    from sae_darkmatter.analyses.cross_layer import cross_layer_analysis
    from sae_darkmatter.analyses.downstream import downstream_analysis
    from sae_darkmatter.analyses.encoder_error import encoder_error_analysis
    from sae_darkmatter.analyses.error_saes import error_sae_analysis
    from sae_darkmatter.analyses.norm_baselines import norm_analysis
    from sae_darkmatter.analyses.per_token import per_token_analysis
    from sae_darkmatter.analyses.scaling import scaling_analysis
    from sae_darkmatter.store import ActivationStore

    if only is None:
        enabled = {"encoder_error": cfg.pursuit.enabled, "cross_layer": cfg.cross_layer.enabled,
                   "error_saes": cfg.error_saes.enabled, "downstream": cfg.downstream.enabled}
        only = tuple(a for a in ANALYSES if enabled.get(a, True))
    unknown = sorted(set(only) - set(ANALYSES))
    if unknown:
        raise DarkMatterError(f"unknown analyses {unknown}; choose from {list(ANALYSES)}")
    run_dir = Path(run_dir)
    decompose_dir = run_dir / "decompose"
    store = ActivationStore.open(run_dir / "store")
    path = run_dir / RESULTS_FILE
    previous = read_json(path) if path.exists() else {}
    seed = cfg.split.seed
    results: dict[str, Any] = {}

    def band() -> float | None:
        enc = results.get("encoder_error", previous.get("encoder_error", {}))
        return enc.get("fvu_nonlinear_drop_mean")

    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "encoder_error": lambda: encoder_error_analysis(
            run_dir, cfg.pursuit, split=cfg.split, decompose_cfg=cfg.decompose, seed=seed,
            progress=progress),
        "scaling": lambda: scaling_analysis(decompose_dir, run_dir, seed=seed, encoder_band=band()),
        "per_token": lambda: per_token_analysis(decompose_dir, store, run_dir,
                                                tokenizer=tokenizer, seed=seed),
        "norms": lambda: norm_analysis(decompose_dir, store, run_dir, seed=seed),
        "cross_layer": lambda: cross_layer_analysis(
            run_dir, cfg=cfg.cross_layer, split=cfg.split, progress=progress),
        "error_saes": lambda: error_sae_analysis(run_dir, cfg=cfg.error_saes, progress=progress),
        "downstream": lambda: downstream_analysis(run_dir, cfg=cfg.downstream, split=cfg.split,
                                                  progress=progress),
    }
    settings: dict[str, tuple[Any, ...]] = {
        "encoder_error": (cfg.pursuit, cfg.decompose), "cross_layer": (cfg.cross_layer,),
        "error_saes": (cfg.error_saes,), "downstream": (cfg.downstream,),
    }
    inputs = _inputs(run_dir, store)
    for name in sorted(only, key=ANALYSES.index):
        extra = (band(),) if name == "scaling" else ()
        key = fingerprint(VERSION, name, cfg.split, *settings.get(name, ()), *extra, inputs)
        if _reusable(previous.get(name), key, run_dir):
            log.info("analysis %s: inputs unchanged, reusing its result", name)
            results[name] = previous[name]
            continue
        t = time.perf_counter()
        try:
            results[name] = {**_relative_figures(steps[name](), run_dir), "fingerprint": key}
        except DarkMatterError as err:
            log.warning("analysis %s skipped: %s", name, err)
            results[name] = {"skipped": str(err)}
        results[name]["seconds"] = round(time.perf_counter() - t, 2)
        write_json(path, {**previous, **results})  # a killed run keeps the finished analyses
    write_json(path, {**previous, **results})  # a subset rerun keeps the other analyses
    return results
