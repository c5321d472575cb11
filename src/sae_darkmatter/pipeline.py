"""The whole pipeline, harvest -> train -> decompose -> analyses -> report, with caching.

A run folder holds every stage's output::

    out/store/                      activation store (safetensors shards + manifest)
    out/saes/topk-w{W}-k{k}/        SAELens-format SAE folders (+ training.json)
    out/decompose/{sae}.json        held-out metrics of each SAE (+ {sae}.safetensors probes)
    out/analyses.json               scaling law, per-token scaling, norm baselines (+ figures)
    out/metrics.json, out/report.html, out/figures/*.png

Each stage is skipped when its output exists and was made from the same inputs and settings;
interrupted stages resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from ._io import read_json, write_json
from .config import DecomposeConfig, RunConfig, SAETrainConfig, fingerprint
from .analyses import run_analyses
from .decompose import decompose_many
from .errors import DarkMatterError
from .harvest import harvest
from .models import load_tokenizer
from .report import write_report
from .saes import load_sae, train_sae
from .splits import Splits, make_splits
from .store import ActivationStore

log = logging.getLogger(__name__)


DECOMPOSE_VERSION = 2  # part of the decomposition cache key: bump when its outputs change


def quick(cfg: RunConfig) -> RunConfig:
    """The ``--quick`` preset: the same pipeline on ~5x less data and smaller SAEs (< 3 min on a CPU)."""
    h = cfg.harvest
    corpus = dataclasses.replace(h.corpus, n_contexts=320)
    return dataclasses.replace(
        cfg,
        harvest=dataclasses.replace(h, corpus=corpus),
        train=dataclasses.replace(cfg.train, widths=(128, 256, 512, 1024), train_tokens=100_000),
    )


def sae_name(width: int, k: int) -> str:
    return f"topk-w{width}-k{k}"


def train_saes(
    store: ActivationStore,
    splits: Splits,
    cfg: SAETrainConfig,
    out_dir: str | Path,
    *,
    hook: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Train one TopK SAE per (k, width) in ``cfg.ks`` × ``cfg.widths`` on the SAE-training split."""
    hook = hook or next(iter(store.hooks))
    x = store.gather(hook, splits.sae_train)
    metadata = {"model_name": store.meta.get("model_name"), "hook_name": hook,
                "context_size": store.context_length}
    dirs = []
    for k in cfg.ks:
        for width in cfg.widths:
            path = Path(out_dir) / sae_name(width, k)
            train_sae(x, width=width, k=k, cfg=cfg, out_dir=path, metadata=metadata,
                      progress=progress)
            dirs.append(path)
    return dirs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def decompose_saes(
    store: ActivationStore,
    splits: Splits,
    sae_dirs: list[Path],
    cfg: DecomposeConfig,
    out_dir: str | Path,
    *,
    hook: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Decompose each SAE's error; results are cached by (store, splits, SAE weights, cfg)."""
    out_dir = Path(out_dir)
    hook = hook or next(iter(store.hooks))
    split_hash = hashlib.sha256(splits.probe_train.tobytes() + splits.probe_test.tobytes())
    fingerprints, todo = {}, {}
    for sae_dir in sae_dirs:
        weights = sae_dir / "sae_weights.safetensors"
        fingerprints[sae_dir.name] = fingerprint(
            DECOMPOSE_VERSION, store.meta.get("harvest_fingerprint"), store.n_rows, hook, split_hash.hexdigest(),
            cfg, _sha256(weights) if weights.exists() else str(sae_dir),
        )
        result_path = out_dir / f"{sae_dir.name}.json"
        cached = result_path.exists() and read_json(result_path).get("fingerprint")
        if cached != fingerprints[sae_dir.name]:
            todo[sae_dir.name] = sae_dir
    if todo:
        saes = {name: load_sae(path) for name, path in todo.items()}
        outputs = decompose_many(store, saes, splits, cfg, hook=hook, progress=progress)
        for name, out in outputs.items():
            out.save(out_dir / f"{name}.safetensors")
            sae_cfg = read_json(todo[name] / "cfg.json")
            write_json(out_dir / f"{name}.json", {
                "name": name,
                "fingerprint": fingerprints[name],
                "sae": {"path": str(todo[name]), "architecture": sae_cfg.get("architecture"),
                        "k": sae_cfg.get("k")},
                "model": store.meta.get("model_name"),
                "data": splits.summary(),
                "metrics": out.metrics.to_dict(),
                "probe_file": f"{name}.safetensors",
            })
    return [read_json(out_dir / f"{d.name}.json") for d in sae_dirs]


def run(cfg: RunConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run every stage into ``out`` and return the metrics written to ``out/metrics.json``."""
    out = Path(out)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    store = harvest(cfg.harvest, out / "store", progress=progress)
    timings["harvest"] = time.perf_counter() - t

    splits = make_splits(store, cfg.split)
    t = time.perf_counter()
    sae_dirs = train_saes(store, splits, cfg.train, out / "saes", progress=progress)
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    decompose_saes(store, splits, sae_dirs, cfg.decompose, out / "decompose", progress=progress)
    timings["decompose"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        tokenizer = load_tokenizer(cfg.harvest.model)
    except DarkMatterError as err:
        log.warning("token texts unavailable (%s); showing token ids", err)
        tokenizer = None
    run_analyses(out, tokenizer=tokenizer, seed=cfg.split.seed)
    timings["analyses"] = time.perf_counter() - t

    t = time.perf_counter()
    write_report(out / "decompose", out)
    timings["report"] = time.perf_counter() - t

    metrics = read_json(out / "metrics.json")
    metrics["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    metrics["config"] = dataclasses.asdict(cfg)
    write_json(out / "metrics.json", metrics)
    return metrics

