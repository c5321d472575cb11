"""The store's on-disk format: file names, column dtypes, and the manifest (build, read, compare).

A shard holding ``n`` rows (one row per token) contains:

- one tensor per hook, named like the hook (``"resid_post.15"``), shape ``[n, d]``, dtype F32 or
  BF16 (the manifest's ``dtype``);
- ``"tokens"`` I32 ``[n]``, ``"position"`` I32 ``[n]`` (index inside the context),
  ``"context"`` I64 ``[n]`` (global context index), ``"loss"`` F32 ``[n]`` (per-token loss, NaN
  where absent).

Row ``b * T + t`` of a shard is position ``t`` of context ``contexts[0] + b`` (``T`` is
``context_length``). Global row ``r`` lives in the shard whose cumulative row range holds it,
shards taken in manifest order.

``manifest.json``::

    {"format": "sae-darkmatter-store", "version": 1,
     "meta": {...caller's metadata: model, hooks, corpus config, fingerprints...},
     "hooks": {"resid_post.15": 576}, "dtype": "float32" | "bfloat16", "context_length": 128,
     "shards": [{"file": "shard_000000.safetensors", "rows": 2048, "contexts": [0, 16],
                 "bytes": 4727168, "sha256": "..."}],
     "committed_contexts": 16, "committed_rows": 2048}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_darkmatter._io import read_json
from sae_darkmatter.errors import CorruptStoreError, DarkMatterError, HookError

FORMAT = "sae-darkmatter-store"
VERSION = 1
MANIFEST = "manifest.json"
LOCK_FILE = ".writer.lock"
SHARD_PATTERN = re.compile(r"shard_\d{6}\.safetensors")
STAGED_SUFFIX = (
    ".staged.json"  # a shard written by a rank of a distributed harvest, not yet committed
)
STAGED_PATTERN = re.compile(r"(shard_\d{6}\.safetensors)\.staged\.json")

# Per-row columns stored beside the hooks: name -> (safetensors dtype tag, numpy dtype).
COLUMNS: dict[str, tuple[str, type[np.generic]]] = {
    "tokens": ("I32", np.int32),
    "position": ("I32", np.int32),
    "context": ("I64", np.int64),
    "loss": ("F32", np.float32),
}
# Store dtype -> (safetensors tag, torch dtype, numpy dtype holding the raw bits).
DTYPES: dict[str, tuple[str, torch.dtype, type[np.generic]]] = {
    "float32": ("F32", torch.float32, np.float32),
    "bfloat16": ("BF16", torch.bfloat16, np.uint16),
}


def shard_name(index: int) -> str:
    return f"shard_{index:06d}.safetensors"


def staged_file(path: Path, index: int) -> Path:
    """The sidecar holding the manifest entry of staged shard ``index`` of the store at ``path``."""
    return path / f"{shard_name(index)}{STAGED_SUFFIX}"


def repair_hint(shard: Path) -> str:
    return f"`darkmatter verify {shard.parent} --repair` re-harvests the bad shards"


def new_manifest(
    hooks: Mapping[str, int], context_length: int, meta: Mapping[str, Any], dtype: str
) -> dict:
    """The manifest of an empty store with these settings; bad settings raise DarkMatterError."""
    if dtype not in DTYPES:
        raise DarkMatterError(f"store dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not hooks:
        raise DarkMatterError("an activation store needs at least one hook")
    clash = set(hooks) & set(COLUMNS)
    if clash:
        raise HookError(
            f"hook names {sorted(clash)} clash with the store's reserved columns {list(COLUMNS)}"
        )
    if context_length < 1 or any(int(d) < 1 for d in hooks.values()):
        raise DarkMatterError(
            f"context_length and hook widths must be positive: {context_length}, {dict(hooks)}"
        )
    try:
        meta_json = json.loads(json.dumps(dict(meta)))
    except (TypeError, ValueError) as e:
        raise DarkMatterError(f"store metadata must be JSON-serialisable: {e}") from None
    return {
        "format": FORMAT,
        "version": VERSION,
        "meta": meta_json,
        "hooks": {str(h): int(d) for h, d in hooks.items()},
        "dtype": dtype,
        "context_length": int(context_length),
        "shards": [],
        "committed_contexts": 0,
        "committed_rows": 0,
    }


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the settings that differ, with both values (meta keys as dotted paths)."""
    diffs = [
        f"{k}: {old[k]!r} != {new[k]!r}"
        for k in ("hooks", "context_length", "dtype")
        if old[k] != new[k]
    ]
    return diffs + _dict_diff(old["meta"], new["meta"], "meta")


def _dict_diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in sorted(set(a) | set(b), key=str)
            for d in _dict_diff(a.get(k), b.get(k), f"{prefix}.{k}")
        ]
    return [] if a == b else [f"{prefix}: {a!r} != {b!r}"]


def check_free_folder(path: Path) -> None:
    """Refuse to create a store inside a folder holding anything but a crashed store's leftovers."""
    if not path.exists():
        return
    if not path.is_dir():
        raise DarkMatterError(f"cannot create an activation store at {path}: it is a file")
    foreign = [f.name for f in path.iterdir()
               if not (SHARD_PATTERN.fullmatch(f.name) or STAGED_PATTERN.fullmatch(f.name)
                       or f.name.endswith(".tmp") or f.name == LOCK_FILE)]
    if foreign:
        raise DarkMatterError(
            f"cannot create an activation store at {path}: the folder has no {MANIFEST} but holds "
            f"other files ({', '.join(sorted(foreign)[:5])}); choose an empty or new folder"
        )


def load_manifest(path: Path) -> dict[str, Any]:
    """Read and sanity-check a manifest; any problem raises CorruptStoreError naming the file."""
    file = path / MANIFEST
    if not file.is_file():
        raise CorruptStoreError(f"no activation store at {path}: {file} is missing")
    try:
        m = read_json(file)
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise ValueError(
                f"format {m.get('format')!r} version {m.get('version')!r}, expected {FORMAT!r} "
                f"{VERSION}"
            )
        rows = contexts = 0
        for s in m["shards"]:
            if not SHARD_PATTERN.fullmatch(s["file"]):  # never follow a path out of the folder
                raise ValueError(f"bad shard file name {s['file']!r}")
            if (
                s["contexts"][0] != contexts
                or s["rows"] != (s["contexts"][1] - contexts) * m["context_length"]
            ):
                raise ValueError(f"shard {s['file']} does not continue at context {contexts}")
            contexts, rows = s["contexts"][1], rows + s["rows"]
        if (m["committed_contexts"], m["committed_rows"]) != (contexts, rows):
            raise ValueError("committed counts disagree with the shard list")
        if (
            m["dtype"] not in DTYPES
            or not isinstance(m["hooks"], dict)
            or not isinstance(m["meta"], dict)
        ):
            raise ValueError("bad dtype, hooks or meta")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CorruptStoreError(
            f"{file} is not a valid activation-store manifest ({e}); delete {path} and harvest "
            "again"
        ) from None
    return m
