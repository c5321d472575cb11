"""``RunDir``: one run folder, its paths and its contents, each opened once.

The pipeline, every analysis, the report, the CLI and auto-interpretability reach a run's
store, splits, decompositions, SAEs and tokenizer through this object, so none of them spells
another stage's file names (those live in ``layout``) and nothing is read twice.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sae_darkmatter import layout
from sae_darkmatter._io import read_json, try_lock
from sae_darkmatter.config import ModelConfig, RunConfig, SplitConfig, fingerprint, from_dict
from sae_darkmatter.decompose import SavedDecomposition, load_decompositions
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.linalg import LinearProbe
from sae_darkmatter.models import load_tokenizer
from sae_darkmatter.saes import AffineSAE
from sae_darkmatter.saes.formats import open_sae
from sae_darkmatter.saes.transcoder import Transcoder
from sae_darkmatter.saes.transcoder_formats import open_transcoder
from sae_darkmatter.splits import Splits, make_splits
from sae_darkmatter.store import ActivationStore

log = logging.getLogger(__name__)


class RunDir:
    """A run folder (see ``layout``); contents load lazily and are kept.

    ``tokenizer`` may be given (or ``None`` for token ids only); by default the run's model's
    tokenizer is loaded on first use, and ``None`` (with a warning) where it is unavailable.
    """

    def __init__(self, path: str | Path, *, tokenizer: Any = ...) -> None:
        self.path = Path(path)
        if tokenizer is not ...:
            self.__dict__["tokenizer"] = tokenizer
        self._splits: dict[str, Splits] = {}

    @classmethod
    def of(cls, run: RunDir | str | Path) -> RunDir:
        return run if isinstance(run, RunDir) else cls(run)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def store_path(self) -> Path:
        return self.path / layout.STORE

    @property
    def saes_path(self) -> Path:
        return self.path / layout.SAES

    @property
    def error_saes_path(self) -> Path:
        return self.path / layout.ERROR_SAES

    @property
    def decompose_path(self) -> Path:
        return self.path / layout.DECOMPOSE

    @property
    def transcoders_path(self) -> Path:
        return self.path / layout.TRANSCODERS

    @property
    def transcoder_results_path(self) -> Path:
        return self.path / layout.TRANSCODER_RESULTS

    @property
    def downstream_path(self) -> Path:
        return self.path / layout.DOWNSTREAM

    @property
    def autointerp_path(self) -> Path:
        return self.path / layout.AUTOINTERP

    @property
    def analyses_path(self) -> Path:
        return self.path / layout.ANALYSES

    @property
    def config_path(self) -> Path:
        return self.path / layout.RUN_CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / layout.METRICS

    def figure(self, name: str) -> Path:
        """``figures/<name>.png``: where an analysis draws its figure ``name``."""
        return self.path / self.figure_key(name)

    @staticmethod
    def figure_key(name: str) -> str:
        """A figure's path relative to the run, as results and the report record it."""
        return f"{layout.FIGURES}/{name}.png"

    # --------------------------------------------------------------- contents
    @cached_property
    def store(self) -> ActivationStore:
        return ActivationStore.open(self.store_path)

    def splits(self, cfg: SplitConfig, *, hook: str | None = None) -> Splits:
        """The store's token splits under ``cfg`` (built once per setting and hook)."""
        key = fingerprint(cfg, hook)
        if key not in self._splits:
            self._splits[key] = make_splits(self.store, cfg, hook=hook)
        return self._splits[key]

    @cached_property
    def decompositions(self) -> list[SavedDecomposition]:
        """Every decomposition of the run, sorted by (width, k, name)."""
        return load_decompositions(self.decompose_path)

    @cached_property
    def transcoder_decompositions(self) -> list[SavedDecomposition]:
        """The transcoders' decompositions (none when the run has no transcoders)."""
        folder = self.transcoder_results_path
        return load_decompositions(folder) if any(folder.glob("*.json")) else []

    def decomposition(self, name: str) -> SavedDecomposition:
        by_name = {d.name: d for d in self.decompositions}
        if name not in by_name:
            raise DarkMatterError(
                f"{self.decompose_path} has no decomposition {name!r} (have {sorted(by_name)})"
            )
        return by_name[name]

    @cached_property
    def config(self) -> RunConfig:
        """The RunConfig the run was made with (``run_config.json``), else the defaults."""
        if self.config_path.is_file():
            return from_dict(RunConfig, read_json(self.config_path))
        return RunConfig()

    @property
    def model(self) -> ModelConfig:
        """The run's model: the run config's, named as the store records it."""
        model = self.config.harvest.model
        stored = self.store.meta.get("config", {}).get("model", {}).get("name")
        return replace(model, name=stored) if stored else model

    @cached_property
    def tokenizer(self) -> Any | None:
        """The run's model's tokenizer, or ``None`` (token ids only) where unavailable."""
        try:
            return load_tokenizer(self.model)
        except DarkMatterError as err:
            log.warning("token texts unavailable (%s); showing token ids", err)
            return None

    def open_sae(self, d: SavedDecomposition, device: torch.device | str = "cpu") -> AffineSAE:
        """The SAE a decomposition names (a folder, relative to the run if need be, or a spec)."""
        return open_sae(self._spec(d), device=device).sae.eval()

    def open_transcoder(self, d: SavedDecomposition,
                        device: torch.device | str = "cpu") -> Transcoder:
        """The transcoder a transcoder decomposition names (as ``open_sae``)."""
        return open_transcoder(self._spec(d), device=device).transcoder.eval()

    def _spec(self, d: SavedDecomposition) -> str:
        spec = str(d.info["sae"]["path"])
        if not Path(spec).exists() and (self.path / spec).exists():
            spec = str(self.path / spec)
        return spec

    # ---------------------------------------------------------------- writing
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``.run.lock`` (an OS lock, dropped by the kernel even after SIGKILL) meanwhile.

        Two runs in one folder would race on every stage output (and the temp-file sweep of one
        would delete the other's files in flight); the second one gets a clear error instead.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / layout.RUN_LOCK
        lock = try_lock(
            path,
            f"another process is running the pipeline in {self.path} (it holds {path}); "
            "wait for it to finish or use another --out folder",
        )
        try:
            yield
        finally:
            lock.release()

    def remove_stale_temps(self) -> list[Path]:
        """Delete the temp files and folders (``.<name>.*.tmp``) that a killed run left.

        Every stage writes through a temp sibling renamed into place, so such leftovers are
        never results. The store is skipped: it cleans its own under its writer lock.
        """
        removed: list[Path] = []
        for root, dirs, files in os.walk(self.path):
            here = Path(root)
            if here == self.path and layout.STORE in dirs:
                dirs.remove(layout.STORE)
            for name in [*files, *dirs]:
                if name.startswith(".") and name.endswith(".tmp"):
                    path = here / name
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                    removed.append(path)
            dirs[:] = [d for d in dirs if here / d not in removed]
        for path in removed:
            log.warning("removed %s, left by an interrupted write", path)
        return removed


Decompositions = RunDir | str | Path | Sequence[SavedDecomposition]


def decompositions_of(source: Decompositions) -> list[SavedDecomposition]:
    """The decompositions ``source`` holds: a RunDir's (read once), a run or ``decompose``
    folder's, or the given ones."""
    if isinstance(source, RunDir):
        return source.decompositions
    if isinstance(source, str | Path):
        folder = Path(source)
        if (folder / layout.DECOMPOSE).is_dir():
            folder = folder / layout.DECOMPOSE
        return load_decompositions(folder)
    return list(source)


def error_probe(d: SavedDecomposition) -> LinearProbe:
    """The decomposition's error probe ê = x·W + b (fit on the probe-train tokens)."""
    with safe_open(str(d.probe_path), framework="pt") as fh:
        return LinearProbe(fh.get_tensor("error_probe.weight"), fh.get_tensor("error_probe.bias"))


def store_of(source: RunDir | ActivationStore | str | Path) -> ActivationStore:
    """A RunDir's store (opened once), the given store, or the store at a path."""
    if isinstance(source, RunDir):
        return source.store
    return source if isinstance(source, ActivationStore) else ActivationStore.open(source)
