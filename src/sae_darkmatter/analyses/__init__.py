"""Analyses: each reads a run (store, SAEs, decompositions) and returns JSON-able results plus
figures.

``run_analyses(run)`` runs all of them on a finished run and writes ``analyses.json``; the
report stage adds their sections to ``report.html`` and ``metrics.json``. Each analysis is one
``Analysis`` record (``registry``) in its own module.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from sae_darkmatter._io import read_json, write_json
from sae_darkmatter.analyses.registry import NAMES, Analysis, get, run_order
from sae_darkmatter.config import RunConfig, fingerprint
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.run_dir import RunDir

__all__ = ["ANALYSES", "Analysis", "get", "run_analyses"]

log = logging.getLogger(__name__)

ANALYSES = NAMES
VERSION = 1  # part of every analysis's cache key: bump when any result's meaning changes


def _inputs(run: RunDir) -> list[Any]:
    """What every analysis reads: the store, the decompositions (the transcoders' too, where
    there are any) and the SAE weight files.

    Weights enter by content (sha256), not by file stamps: a rewrite with the same bytes (an SAE
    retrained after a kill) keeps the cached results, and the key is the same in any folder.
    """
    decs = {
        p.stem: read_json(p).get("fingerprint") for p in sorted(run.decompose_path.glob("*.json"))
    }
    weights = [
        (str(p.relative_to(run.path)), _sha256(p))
        for p in sorted(run.saes_path.glob("**/sae_weights.safetensors"))
    ]
    transcoders = {p.stem: read_json(p).get("fingerprint")
                   for p in sorted(run.transcoder_results_path.glob("*.json"))}
    return [run.store.meta.get("harvest_fingerprint"), run.store.n_rows, decs, weights,
            *([transcoders] if transcoders else [])]


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _relative_figures(result: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Figure paths relative to ``run_dir``, as ``_reusable`` and the report expect."""
    figures = result.get("figures")
    if not isinstance(figures, dict):
        return result
    rel = {
        k: str(Path(v).relative_to(run_dir)) if Path(v).is_relative_to(run_dir) else v
        for k, v in figures.items()
    }
    return {**result, "figures": rel}


def _reusable(result: Any, key: str, run_dir: Path) -> bool:
    """A previous result with the same key whose figures are all still there."""
    if not isinstance(result, dict) or result.get("fingerprint") != key or "skipped" in result:
        return False
    return all((run_dir / f).is_file() for f in result.get("figures", {}).values())


def run_analyses(
    run: RunDir | str | Path,
    *,
    only: tuple[str, ...] | None = None,
    cfg: RunConfig = RunConfig(),
    tokenizer: Any | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the chosen analyses (default: every one ``cfg`` enables) on the run ``run``.

    A failing analysis (e.g. the scaling fit with fewer than 3 widths) is recorded with its
    message instead of stopping the others. Results are merged into ``analyses.json``; a
    result there whose inputs (store, decompositions, SAE files) and settings are unchanged is
    reused, not recomputed. ``tokenizer`` (for token texts) is used when ``run`` is a path.
    """
    if only is None:
        only = tuple(n for n in NAMES if get(n).enabled(cfg))
    unknown = sorted(set(only) - set(NAMES))
    if unknown:
        raise DarkMatterError(f"unknown analyses {unknown}; choose from {list(NAMES)}")
    run = run if isinstance(run, RunDir) else RunDir(run, tokenizer=tokenizer)
    path = run.analyses_path
    previous = read_json(path) if path.exists() else {}
    results: dict[str, Any] = {}
    inputs = _inputs(run)
    for name in run_order(only):
        analysis = get(name)
        so_far = {**previous, **results}
        key = fingerprint(VERSION, name, cfg.split, *analysis.settings(cfg, so_far), inputs)
        if _reusable(previous.get(name), key, run.path):
            log.info("analysis %s: inputs unchanged, reusing its result", name)
            results[name] = {**previous[name], "reused": True}
            continue
        t = time.perf_counter()
        try:
            result = analysis.run(run, cfg, so_far, progress)
            results[name] = {**_relative_figures(result, run.path), "fingerprint": key}
        except DarkMatterError as err:
            log.warning("analysis %s skipped: %s", name, err)
            results[name] = {"skipped": str(err)}
        results[name]["seconds"] = round(time.perf_counter() - t, 2)
        write_json(path, {**previous, **results})  # a killed run keeps the finished analyses
    write_json(path, {**previous, **results})  # a subset rerun keeps the other analyses
    return results
