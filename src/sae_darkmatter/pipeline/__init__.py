"""The whole pipeline, harvest -> train -> decompose -> analyses -> report, with caching.

The run folder's layout is in ``layout``; ``RunDir`` opens it.

Each stage is skipped when its output exists and was made from the same inputs and settings;
interrupted stages resume. Every output is written to a temp file and renamed into place, so a
run killed at any moment (SIGKILL included) leaves only finished outputs and temp files, which
the next run deletes; rerunning it gives the results of an uninterrupted run
(tests/e2e/test_kill_resume.py). ``out/.run.lock`` keeps a second run out of the folder meanwhile.

``stages`` has the stages on one store (train, open, decompose with caching), usable alone;
``transcoders`` the run's transcoder sweep.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from sae_darkmatter import distributed
from sae_darkmatter._io import read_json, require_folder, write_json
from sae_darkmatter.adopt import adopt_sae_metadata
from sae_darkmatter.analyses import run_analyses
from sae_darkmatter.config import RunConfig, SAETrainConfig, to_dict
from sae_darkmatter.harvest import harvest
from sae_darkmatter.models import default_hook_for, default_sources
from sae_darkmatter.pipeline.stages import (
    DECOMPOSE_VERSION,
    decompose_sae_prefixes,
    decompose_saes,
    decompose_transcoder_specs,
    open_saes,
    open_transcoders,
    sae_label,
    train_saes,
)
from sae_darkmatter.pipeline.transcoders import run_transcoders, transcoder_hooks
from sae_darkmatter.report import write_report
from sae_darkmatter.run_dir import RunDir
from sae_darkmatter.splits import Splits, make_splits
from sae_darkmatter.store import ActivationStore

__all__ = [
    "DECOMPOSE_VERSION", "cross_layer_hooks", "decompose_sae_prefixes", "decompose_saes",
    "decompose_transcoder_specs",
    "open_saes", "open_transcoders", "run", "run_hooks", "sae_label", "train_saes",
]

log = logging.getLogger(__name__)


def cross_layer_hooks(cfg: RunConfig) -> tuple[str, ...]:
    """The harvest's hooks: with cross-layer prediction on, the target plus its neighbours."""
    hooks = cfg.harvest.hooks
    if not cfg.cross_layer.enabled or cfg.saes or len(hooks) > 1:
        return hooks
    target = hooks[0] if hooks else default_hook_for(cfg.harvest.model)
    return (target, *default_sources(target))


def run_hooks(cfg: RunConfig) -> tuple[str, ...]:
    """Every hook the run harvests: the target (first), the cross-layer sources, then the
    transcoders' hooks."""
    hooks = cross_layer_hooks(cfg)
    extra = transcoder_hooks(cfg)
    if not extra:
        return hooks
    hooks = hooks or (default_hook_for(cfg.harvest.model),)
    return (*hooks, *(h for h in extra if h not in hooks))


def _train_source_saes(
    store: ActivationStore, splits: Splits, cfg: SAETrainConfig, out_dir: Path,
    sources: tuple[str, ...], progress: bool,
) -> None:
    """One SAE per source hook (widest width, middle sparsity) for cross-layer prediction."""
    values = cfg.sparsity_values()
    one = dataclasses.replace(cfg, widths=(max(cfg.widths),),
                              **{cfg.sparsity_field(): (values[len(values) // 2],)})
    show = progress and distributed.is_main()
    for i, hook in enumerate(sources):
        if distributed.owns(i):  # under torchrun the hooks are dealt out to the ranks
            with distributed.local():
                train_saes(store, splits, one, out_dir / hook, hook=hook, progress=show)
    distributed.barrier()


def run(cfg: RunConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run every stage into ``out`` and return the metrics written to ``out/metrics.json``.

    A killed run (even by SIGKILL) is resumed by running it again: finished stage outputs are
    reused, interrupted ones redone, and the results equal those of an uninterrupted run.

    Under torchrun every rank calls this: harvest, SAE training and the decomposition are
    shared out (see ``distributed``), then rank 0 runs the analyses and the report alone and
    the other ranks return ``{}``.
    """
    distributed.check_initialized()
    require_folder(Path(out), "the run")
    run_dir = RunDir(out)
    with run_dir.lock() if distributed.is_main() else nullcontext():
        if distributed.is_main():
            run_dir.remove_stale_temps()
        distributed.barrier()
        return _run_stages(cfg, run_dir, progress)


def _run_stages(cfg: RunConfig, run_dir: RunDir, progress: bool) -> dict[str, Any]:
    timings: dict[str, float] = {}

    if cfg.saes:  # pretrained SAEs: no training split, model and hook from their metadata
        cfg = adopt_sae_metadata(cfg, open_saes(cfg.saes))
        cfg = dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, sae_train_fraction=0.0))

    sources = cross_layer_hooks(cfg)[1:]
    cfg = dataclasses.replace(cfg, harvest=dataclasses.replace(cfg.harvest, hooks=run_hooks(cfg)))
    if distributed.is_main():
        write_json(run_dir.config_path, to_dict(cfg))  # what `darkmatter analyze` reruns with

    t = time.perf_counter()
    store = harvest(cfg.harvest, run_dir.store_path, progress=progress)
    timings["harvest"] = time.perf_counter() - t

    splits = make_splits(store, cfg.split)
    t = time.perf_counter()
    saes: list[str | Path] = list(cfg.saes) or list(
        train_saes(store, splits, cfg.train, run_dir.saes_path, progress=progress))
    if not cfg.saes and sources:
        _train_source_saes(store, splits, cfg.train, run_dir.saes_path, sources, progress)
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    decompose_saes(store, splits, saes, cfg.decompose, run_dir.decompose_path,
                   progress=progress, check_training=False)
    timings["decompose"] = time.perf_counter() - t
    if cfg.transcoders.enabled:
        t = time.perf_counter()
        run_transcoders(cfg, store, splits, run_dir, progress)
        timings["transcoders"] = time.perf_counter() - t
    if not distributed.is_main():
        return {}
    with distributed.local():
        return _finish_run(cfg, run_dir, progress, timings)


def _finish_run(
    cfg: RunConfig, run_dir: RunDir, progress: bool, timings: dict[str, float]
) -> dict[str, Any]:
    """The analyses, the report and ``metrics.json`` (one process)."""
    t = time.perf_counter()
    run_analyses(run_dir, cfg=cfg, progress=progress)
    timings["analyses"] = time.perf_counter() - t

    t = time.perf_counter()
    write_report(run_dir)
    timings["report"] = time.perf_counter() - t

    metrics = read_json(run_dir.metrics_path)
    metrics["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    metrics["config"] = dataclasses.asdict(cfg)
    write_json(run_dir.metrics_path, metrics)
    return metrics

