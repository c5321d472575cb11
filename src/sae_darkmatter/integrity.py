"""Check a run folder (or a bare store) for damaged files, and repair what can be redone.

Store shards are checked against the sha256 in the manifest; SAE folders are opened (our own
folders carry ``checksums.json``). Repair re-harvests bad shards in place (bit-identical on a
deterministic model) and drops damaged SAE folders that this run trained, so that rerunning
``darkmatter run`` retrains them; nothing else is ever deleted.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from sae_darkmatter import layout
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.saes.formats import open_sae
from sae_darkmatter.saes.io import CFG_FILENAME, TRAINING_FILENAME, WEIGHTS_FILENAME
from sae_darkmatter.store import MANIFEST, ActivationStore

log = logging.getLogger(__name__)

SAE_FOLDERS = layout.SAE_FOLDERS  # where a run keeps the SAEs it trained


@dataclass(frozen=True)
class Damage:
    """One damaged item: ``kind`` is ``"shard"`` or ``"sae"``; ``path`` the shard file or SAE
    folder."""

    kind: str
    path: Path
    reason: str


def store_path(path: str | Path) -> Path | None:
    """The store in ``path``: the folder itself if it is a store, else its ``store/`` (if any)."""
    path = Path(path)
    for candidate in (path, path / layout.STORE):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def _sae_folders(run: Path) -> list[Path]:
    """Finished SAE folders a run trained (``cfg.json`` or weights present), in sorted order."""
    found = set()
    for top in SAE_FOLDERS:
        for name in (CFG_FILENAME, WEIGHTS_FILENAME):
            found.update(p.parent for p in (run / top).rglob(name))
    return sorted(found)


def check(path: str | Path) -> list[Damage]:
    """Every damaged shard of the store and every unreadable SAE folder of the run at ``path``."""
    path = Path(path)
    store = _store_or_run(path)
    shards = [] if store is None else [
        Damage("shard", store / p.file, p.reason) for p in ActivationStore.open(store).check()]
    return shards + _sae_damage(path)


def repair(path: str | Path, *, progress: bool = True) -> tuple[list[Damage], list[Damage]]:
    """Repair what :func:`check` finds; returns ``(repaired, left)``.

    Bad shards are re-harvested. A damaged SAE folder that this run trained (it has
    ``training.json``) is removed so the next ``darkmatter run`` retrains them; other SAE folders
    (copied in by the user) are left and reported.
    """
    from sae_darkmatter.harvest import repair as repair_store

    path = Path(path)
    store = _store_or_run(path)
    repaired = [] if store is None else [
        Damage("shard", store / p.file, p.reason) for p in repair_store(store, progress=progress)]
    left = []
    for d in _sae_damage(path):
        if (d.path / TRAINING_FILENAME).is_file():
            log.warning(
                "removing damaged SAE folder %s; rerun `darkmatter run` to retrain it", d.path
            )
            shutil.rmtree(d.path)
            repaired.append(d)
        else:
            left.append(d)
    return repaired, left


def _store_or_run(path: Path) -> Path | None:
    """The store of ``path`` (None for a run without one); neither a store nor a run: an error."""
    store = store_path(path)
    if store is None and not any((path / top).is_dir() for top in SAE_FOLDERS):
        raise DarkMatterError(
            f"{path} holds neither an activation store ({MANIFEST}) nor a run folder"
        )
    return store


def _sae_damage(run: Path) -> list[Damage]:
    damage = []
    for folder in _sae_folders(run):
        try:
            open_sae(folder)
        except DarkMatterError as err:
            damage.append(Damage("sae", folder, str(err)))
    return damage
