"""Shard integrity: size, safetensors header and sha256 of each shard against the manifest.

Every shard's sha256 is in the manifest. Each shard is hashed the first time this process reads
it (then remembered per process in ``_VERIFIED``), so a corrupt shard is never silently used;
``verify()`` hashes all of them. Measured on the 2-core dev machine (200 MB store, page cache
warm, ``benchmarks/bench_store.py``): sha256 runs at ~1.5 GB/s while a later ``iter_chunks`` pass
reads at 5-8 GB/s, so the first pass over a store in a process is ~5x slower than later ones
(0.85 against 4.7 GB/s in one run). Every consumer is slower than either: streaming least squares
over 1M x 576 floats (2.3 GB) takes ~11 s, hashing them ~1.5 s, so the check costs at most ~15 % of
one real pass, once per process. For stores where that matters, ``verify_reads=False`` makes
reads check only the file size and the safetensors header against the manifest; ``verify()``
stays the full check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from sae_darkmatter.errors import CorruptStoreError
from sae_darkmatter.store.manifest import COLUMNS, DTYPES, MANIFEST, repair_hint

# Shards whose sha256 this process has checked: (path, sha256, size, mtime_ns).
_VERIFIED: set[tuple[str, str, int, int]] = set()


@dataclasses.dataclass(frozen=True)
class ShardProblem:
    """A bad shard: its index in the manifest, file name, context range [start, stop) and why."""

    index: int
    file: str
    contexts: tuple[int, int]
    reason: str


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def remember_verified(path: Path, entry: dict[str, Any]) -> None:
    """Record that shard ``path`` matches ``entry`` (its writer just hashed what it wrote)."""
    _VERIFIED.add(_sha_key(path, entry))


def _sha_key(path: Path, entry: dict[str, Any]) -> tuple[str, str, int, int]:
    st = path.stat()
    return (str(path.resolve()), entry["sha256"], st.st_size, st.st_mtime_ns)


def verify_sha(path: Path, entry: dict[str, Any], *, force: bool = False) -> None:
    """Hash shard ``path`` unless this process already did (or ``force``); a mismatch raises."""
    key = _sha_key(path, entry)
    if key in _VERIFIED and not force:
        return
    sha = file_sha256(path)
    if sha != entry["sha256"]:
        _VERIFIED.discard(key)
        raise CorruptStoreError(
            f"shard {path} is corrupt: sha256 {sha[:16]}... does not match the manifest's "
            f"{entry['sha256'][:16]}...; {repair_hint(path)}"
        )
    _VERIFIED.add(key)


def check_file(store: Path, entry: dict[str, Any]) -> None:
    """The shard of ``entry`` exists and has the size the manifest recorded."""
    path = store / entry["file"]
    if not path.is_file():
        raise CorruptStoreError(
            f"shard {path} listed in {store / MANIFEST} is missing; {repair_hint(path)}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CorruptStoreError(
            f"shard {path} has {size} bytes but the manifest recorded {entry['bytes']} "
            f"(truncated or overwritten); {repair_hint(path)}"
        )


def read_layout(
    store: Path, manifest: dict[str, Any], entry: dict[str, Any]
) -> dict[str, tuple[int, int]]:
    """Parse and check a shard's safetensors header: name -> absolute byte range."""
    path = store / entry["file"]
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n > entry["bytes"] - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
        layout = {}
        for name, (tag, shape) in _expected_tensors(manifest, entry["rows"]).items():
            info = header[name]
            if info["dtype"] != tag or info["shape"] != shape:
                raise ValueError(
                    f"{name}: {info['dtype']} {info['shape']}, expected {tag} {shape}"
                )
            begin, end = info["data_offsets"]
            layout[name] = (8 + n + begin, 8 + n + end)
            if end > entry["bytes"] - 8 - n:
                raise ValueError(f"{name}: data past the end of the file")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptStoreError(
            f"shard {path} has an invalid safetensors header ({e}); {repair_hint(path)}"
        ) from None
    return layout


def _expected_tensors(manifest: dict[str, Any], rows: int) -> dict[str, tuple[str, list[int]]]:
    tag = DTYPES[manifest["dtype"]][0]
    expected = {h: (tag, [rows, d]) for h, d in manifest["hooks"].items()}
    expected.update({c: (t, [rows]) for c, (t, _) in COLUMNS.items()})
    return expected


def checked_layout(
    store: Path, manifest: dict[str, Any], entry: dict[str, Any], *, sha: bool
) -> dict[str, tuple[int, int]]:
    """A shard's layout for reading, after checking its size (and with ``sha`` its sha256)."""
    check_file(store, entry)
    if sha:
        verify_sha(store / entry["file"], entry)
    return read_layout(store, manifest, entry)


def check_shards(store: Path, manifest: dict[str, Any]) -> list[ShardProblem]:
    """Every shard's problem (missing, wrong size, bad header, sha256 mismatch); never raises."""
    problems = []
    for i, entry in enumerate(manifest["shards"]):
        try:
            check_file(store, entry)
            read_layout(store, manifest, entry)
            verify_sha(store / entry["file"], entry, force=True)
        except CorruptStoreError as err:
            problems.append(ShardProblem(i, entry["file"], tuple(entry["contexts"]), str(err)))
    return problems
