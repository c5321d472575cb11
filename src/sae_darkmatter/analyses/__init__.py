"""Analyses: each reads a run folder (store, SAEs, decompositions) and returns JSON-able results plus figures.

``run_analyses(run_dir)`` runs all of them on a finished run and writes ``analyses.json``; the
report stage adds their sections to ``report.html`` and ``metrics.json``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .._io import read_json, write_json
from ..errors import DarkMatterError

log = logging.getLogger(__name__)

ANALYSES = ("scaling", "per_token", "norms")
RESULTS_FILE = "analyses.json"


def run_analyses(
    run_dir: str | Path,
    *,
    only: tuple[str, ...] = ANALYSES,
    tokenizer: Any | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the chosen analyses on ``run_dir`` (with ``store/`` and ``decompose/``).

    A failing analysis (e.g. the scaling fit with fewer than 3 widths) is recorded with its
    message instead of stopping the others. Results are merged into ``run_dir/analyses.json``.
    """
    from ..store import ActivationStore
    from .norm_baselines import norm_analysis
    from .per_token import per_token_analysis
    from .scaling import scaling_analysis

    unknown = sorted(set(only) - set(ANALYSES))
    if unknown:
        raise DarkMatterError(f"unknown analyses {unknown}; choose from {list(ANALYSES)}")
    run_dir = Path(run_dir)
    decompose_dir = run_dir / "decompose"
    store = ActivationStore.open(run_dir / "store")
    steps = {
        "scaling": lambda: scaling_analysis(decompose_dir, run_dir, seed=seed),
        "per_token": lambda: per_token_analysis(decompose_dir, store, run_dir,
                                                tokenizer=tokenizer, seed=seed),
        "norms": lambda: norm_analysis(decompose_dir, store, run_dir, seed=seed),
    }
    results: dict[str, Any] = {}
    for name in only:
        t = time.perf_counter()
        try:
            results[name] = steps[name]()
        except DarkMatterError as err:
            log.warning("analysis %s skipped: %s", name, err)
            results[name] = {"skipped": str(err)}
        results[name]["seconds"] = round(time.perf_counter() - t, 2)
    path = run_dir / RESULTS_FILE
    previous = read_json(path) if path.exists() else {}
    write_json(path, {**previous, **results})  # a subset rerun keeps the other analyses
    return results
