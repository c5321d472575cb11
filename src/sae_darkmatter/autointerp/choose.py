"""Which SAEs to interpret in a run, and what they share (store, decompositions, windows)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae_darkmatter._io import read_json
from sae_darkmatter.analyses.error_saes import TARGETS, error_targets
from sae_darkmatter.autointerp.config import AutoInterpConfig
from sae_darkmatter.autointerp.examples import (
    PartsFn,
    Windows,
    make_windows,
)
from sae_darkmatter.config import TokenFilter
from sae_darkmatter.decompose import SavedDecomposition
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.models import load_tokenizer
from sae_darkmatter.run_dir import RunDir
from sae_darkmatter.saes.io import CFG_FILENAME
from sae_darkmatter.saes.registry import REGISTRY_PREFIX
from sae_darkmatter.splits import select_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SAEChoice:
    """An SAE to interpret: its spec for ``open_sae``, its input and (for error SAEs) its base."""

    label: str
    spec: str
    input: str = "x"
    base: str | None = None


def _error_meta(folder: Path, run_dir: Path) -> tuple[str, str] | None:
    """(base SAE, target) of an error SAE folder: from its place in the run, else its cfg.json."""
    try:
        error_saes = RunDir(run_dir).error_saes_path.resolve()
        base, target, _ = folder.resolve().relative_to(error_saes).parts
        if target in TARGETS:
            return base, target
    except ValueError:
        pass
    meta = (
        read_json(folder / CFG_FILENAME).get("metadata", {})
        if (folder / CFG_FILENAME).is_file()
        else {}
    )
    if meta.get("error_target") in TARGETS and meta.get("base_sae"):
        return str(meta["base_sae"]), str(meta["error_target"])
    return None


def resolve_sae(run_dir: Path, spec: str) -> SAEChoice:
    """An SAE by registry spec, path, or name in the run (``saes/<name>``, ``error_saes/<...>``)."""
    if spec.startswith(REGISTRY_PREFIX):
        return SAEChoice(spec[len(REGISTRY_PREFIX):], spec)
    run = RunDir(run_dir)
    candidates = [Path(spec), run.path / spec, run.saes_path / spec, run.error_saes_path / spec]
    folder = next((p for p in candidates if p.is_dir()), None)
    if folder is None:
        raise DarkMatterError(
            f"no SAE {spec!r}: not a folder, nor one under {run.saes_path} or "
            f"{run.error_saes_path}, nor '{REGISTRY_PREFIX}<release>/<id>'"
        )
    meta = _error_meta(folder, run_dir)
    if meta:
        return SAEChoice(f"{meta[0]}/{meta[1]}/{folder.name}", str(folder), meta[1], meta[0])
    return SAEChoice(folder.name, str(folder))


def _k(folder: Path) -> int | None:
    cfg = read_json(folder / CFG_FILENAME) if (folder / CFG_FILENAME).is_file() else {}
    return cfg.get("k")


def default_saes(run: RunDir | str | Path) -> list[str]:
    """The first base SAE with error SAEs, and its error SAEs of one width and k (all three
    targets).

    Among the names present for e, ê and e − ê: the one with the base SAE's k, else the middle
    one. Without error SAEs: the widest SAE of the run at the median k.
    """
    run = RunDir.of(run)
    bases = sorted(p for p in run.error_saes_path.glob("*") if p.is_dir())
    decs = {d.name: d for d in run.decompositions}
    for base in bases:
        names = set.intersection(
            *({p.name for p in (base / t).glob("*") if p.is_dir()} for t in TARGETS)
        )
        if not names or base.name not in decs:
            continue
        ordered = sorted(names, key=lambda n: (_k(base / "error" / n) or 0, n))
        pick = next((n for n in ordered if _k(base / "error" / n) == decs[base.name].k),
                    ordered[len(ordered) // 2])
        return [decs[base.name].info["sae"]["path"], *(str(base / t / pick) for t in TARGETS)]
    if not decs:
        raise DarkMatterError(
            f"no decompositions in {run.decompose_path}; give SAEs with --saes"
        )
    ks = [d.k for d in decs.values() if d.k is not None]
    median = float(np.median(ks)) if ks else 0.0
    best = max(decs.values(), key=lambda d: (d.width, -abs((d.k or 0) - median), d.name))
    return [best.info["sae"]["path"]]


class RunData:
    """What the SAEs share: the store, its decompositions, windows per hook, the tokenizer."""

    def __init__(self, run: RunDir, cfg: AutoInterpConfig, tokenizer: Any | None):
        self.run, self.cfg = run, cfg
        self.store = run.store
        self.filter: TokenFilter = run.config.split.filter
        self.decs = {d.name: d for d in run.decompositions} if run.decompose_path.is_dir() else {}
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(run.model)
        self._windows: dict[str, Windows] = {}

    def windows(self, hook: str) -> Windows:
        if hook not in self._windows:
            rows = select_rows(
                self.store, self.filter, self.store.meta.get("special_token_ids", []), hook=hook
            ).rows
            self._windows[hook] = make_windows(
                self.store,
                rows,
                window=min(self.cfg.window, self.store.context_length),
                explain_fraction=self.cfg.explain_fraction,
                seed=self.cfg.seed,
            )
        return self._windows[hook]

    def base(self, name: str) -> SavedDecomposition:
        if name not in self.decs:
            raise DarkMatterError(
                f"error SAE of {name!r}, but {self.run.decompose_path} has no decomposition "
                f"of it (have {sorted(self.decs)})"
            )
        return self.decs[name]

    def hook_of(self, choice: SAEChoice, hook_hint: str | None) -> str:
        """The stored hook an SAE reads: its base's for error SAEs, else the one its metadata
        names, else the decompositions', else the store's first."""
        if choice.input != "x":
            return self.base(str(choice.base)).info["metrics"]["hook"]
        hooks = [
            h for h in (hook_hint, *(d.info["metrics"]["hook"] for d in self.decs.values())) if h
        ]
        return next((h for h in hooks if h in self.store.hooks), next(iter(self.store.hooks)))

    def parts(self, hook: str, base: str | None) -> PartsFn:
        """SAE inputs for sorted store rows: ``{"x"}``, or the error parts of ``base`` (e, ê,
        e − ê)."""
        if base is None:
            return lambda rows: {"x": self.store.gather(hook, rows)}
        dec = self.base(base)
        base_sae = self.run.open_sae(dec)
        return lambda rows: error_targets(
            self.store, hook, rows, base_sae, dec, chunk_rows=self.cfg.chunk_rows
        )


# ---------------------------------------------------------------------------- the LLM steps
