"""Writing an activation store: create or resume under the writer lock, append, stage, commit.

Commits. A shard is written to a temp file, fsynced and renamed into place; then the manifest is
rewritten atomically (temp + rename). A crash therefore leaves at worst a shard or temp file the
manifest does not list: readers ignore it and the next writer (``create_or_resume``) deletes it.
Appends must continue at ``committed_contexts``. One writer at a time: ``create_or_resume``
takes an OS file lock (``.writer.lock``, via ``filelock``) until ``finish()`` or the process
ends (the kernel drops it even after SIGKILL), and a second writer gets ``StoreLockedError``
instead of interleaving shards.

Distributed harvests. The ranks of a ``torchrun`` harvest write their own shards in any order
with :meth:`ActivationStore.stage`: the shard file plus ``shard_NNNNNN.safetensors.staged.json``
(its manifest entry), both atomic. Rank 0, the only writer of the manifest (it holds the lock),
commits staged shards that continue the store with :meth:`ActivationStore.commit_staged`; on
resume, staged shards beyond the committed ones are kept and committed when they continue it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from safetensors.torch import save_file

from sae_darkmatter._io import atomic_path, read_json, try_lock, write_json
from sae_darkmatter.errors import (
    DarkMatterError,
    HookError,
    ShapeMismatchError,
    StoreLockedError,
)
from sae_darkmatter.store.manifest import (
    DTYPES,
    FORMAT,
    LOCK_FILE,
    MANIFEST,
    SHARD_PATTERN,
    STAGED_PATTERN,
    STAGED_SUFFIX,
    check_free_folder,
    load_manifest,
    new_manifest,
    settings_diff,
    shard_name,
    staged_file,
)
from sae_darkmatter.store.reader import StoreReader
from sae_darkmatter.store.verify import file_sha256, remember_verified

log = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor | np.ndarray]


class ActivationStore(StoreReader):
    """Append-only store of per-token activations at one or more hooks, plus tokens and loss.

    Create or resume with :meth:`create_or_resume`, open for reading with :meth:`open` (a store
    opened so can still :meth:`stage` shards for the writer to commit).
    """

    def __init__(
        self, path: Path, manifest: dict[str, Any], *, writable: bool = False,
        verify_reads: bool = True,
    ):
        super().__init__(path, manifest, verify_reads=verify_reads)
        self._writable = writable
        self._lock: FileLock | None = None

    @classmethod
    def create_or_resume(
        cls,
        path: str | Path,
        *,
        hooks: Mapping[str, int],
        context_length: int,
        meta: Mapping[str, Any],
        dtype: str = "float32",
        verify_reads: bool = True,
    ) -> ActivationStore:
        """Open ``path`` for appending: a new (empty) store, or an existing one with identical
        settings.

        An existing store whose hooks, context length, dtype or metadata differ raises
        :class:`DarkMatterError` naming the differing keys. Files left by a crash (shards the
        manifest does not list, temp files) are deleted here.
        """
        path = Path(path)
        wanted = new_manifest(hooks, context_length, meta, dtype)
        resumed = (path / MANIFEST).exists()
        if not resumed:
            check_free_folder(path)
        path.mkdir(parents=True, exist_ok=True)
        lock = _writer_lock(path)
        try:
            if (path / MANIFEST).exists():
                manifest = load_manifest(path)
                diff = settings_diff(manifest, wanted)
                if diff:
                    raise DarkMatterError(
                        f"the activation store at {path} was written with different settings "
                        f"({', '.join(diff)}); use a new store path or delete {path} to start over"
                    )
                log.info("resuming activation store %s at %d contexts", path,
                         manifest["committed_contexts"])
            else:
                manifest = wanted
                write_json(path / MANIFEST, manifest)
            store = cls(path, manifest, writable=True, verify_reads=verify_reads)
            store._remove_uncommitted(keep_staged=resumed)
            store.commit_staged()
        except BaseException:
            lock.release()
            raise
        store._lock = lock
        return store

    def finish(self) -> None:
        """Stop writing: release the writer lock (the store stays open for reading)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._writable = False

    def append(
        self, *, context_start: int, acts: Batch, tokens: torch.Tensor | np.ndarray,
        loss: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Commit one batch of contexts: ``acts[hook]`` is ``[B, T, d]``, tokens and loss
        ``[B, T]``.

        ``context_start`` must equal :attr:`committed_contexts` (appends are contiguous, so a
        resumed harvest cannot skip or repeat contexts). The batch becomes one shard.
        """
        if not self._writable:
            raise DarkMatterError(
                f"the store at {self.path} was opened read-only; use "
                "ActivationStore.create_or_resume to append"
            )
        if context_start != self.committed_contexts:
            raise DarkMatterError(
                f"append at context {context_start} is not contiguous: the store at {self.path} "
                f"has {self.committed_contexts} committed contexts, so the next append must start "
                "there"
            )
        tensors = _batch_tensors(self, context_start, acts, tokens, loss)
        n_ctx = tensors["tokens"].shape[0] // self.context_length
        if n_ctx == 0:
            return
        self._commit_shard(len(self._shards), tensors, context_start, n_ctx)

    def rewrite_shard(
        self, index: int, *, acts: Batch, tokens: torch.Tensor | np.ndarray,
        loss: torch.Tensor | np.ndarray | None = None,
    ) -> bool:
        """Replace shard ``index`` with freshly computed data for the same contexts (repair).

        The new shard is written atomically under the same name, then the manifest records its
        size and sha256. Returns whether the new shard is bit-identical to what the manifest had
        recorded (it is when the harvest is deterministic, as on CPU).
        """
        if not self._writable:
            raise DarkMatterError(
                f"the store at {self.path} was opened read-only; use "
                "ActivationStore.create_or_resume to repair it"
            )
        entry = self._shards[index]
        start, stop = entry["contexts"]
        tensors = _batch_tensors(self, start, acts, tokens, loss)
        if tensors["tokens"].shape[0] != entry["rows"]:
            raise ShapeMismatchError(
                f"shard {entry['file']} holds contexts {start}..{stop - 1} ({entry['rows']} rows); "
                f"the replacement has {tensors['tokens'].shape[0]} rows"
            )
        return self._commit_shard(index, tensors, start, stop - start)["sha256"] == entry["sha256"]

    def stage(
        self, index: int, *, context_start: int, acts: Batch, tokens: torch.Tensor | np.ndarray,
        loss: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Write shard ``index`` without committing it: the shard file plus its manifest entry
        in ``shard_NNNNNN.safetensors.staged.json`` (both atomic).

        For the ranks of a distributed harvest, which write their own shards in any order into a
        store that rank 0 holds open for writing; rank 0 then commits them in order with
        :meth:`commit_staged`. Works on a store opened read-only (it never touches the manifest).
        """
        if index < len(self._shards):
            raise DarkMatterError(f"shard {index} of the store at {self.path} is already committed")
        tensors = _batch_tensors(self, context_start, acts, tokens, loss)
        n_ctx = tensors["tokens"].shape[0] // self.context_length
        write_json(
            staged_file(self.path, index), self._write_entry(index, tensors, context_start, n_ctx)
        )

    def is_staged(self, index: int) -> bool:
        return staged_file(self.path, index).exists()

    def commit_staged(self) -> int:
        """Commit the staged shards that continue the committed ones, in order; returns how many.

        A staged entry is checked against its shard file (name, size) and the next context; one
        that does not fit stops the commit (it stays staged, and is logged).
        """
        if not self._writable:
            raise DarkMatterError(
                f"the store at {self.path} was opened read-only; only its writer commits"
            )
        entries: list[dict] = []
        while True:
            index = len(self._shards) + len(entries)
            sidecar = staged_file(self.path, index)
            if not sidecar.exists():
                break
            entry = read_json(sidecar)
            start = entries[-1]["contexts"][1] if entries else self.committed_contexts
            shard = self.path / shard_name(index)
            if (entry.get("file") != shard.name or entry.get("contexts", [None])[0] != start
                    or not shard.is_file() or shard.stat().st_size != entry.get("bytes")):
                log.warning(
                    "staged shard %s does not continue the store at context %d; not committed",
                    shard,
                    start,
                )
                break
            entries.append(entry)
        if entries:
            first = len(self._shards)
            self._record(entries, at=first)
            for i in range(first, first + len(entries)):
                staged_file(self.path, i).unlink()
        return len(entries)

    def _commit_shard(
        self, index: int, tensors: dict[str, torch.Tensor], start: int, n_ctx: int
    ) -> dict:
        """Write shard ``index`` (the next one, or one to replace), then record it in the
        manifest."""
        entry = self._write_entry(index, tensors, start, n_ctx)
        self._record([entry], at=index)
        return entry

    def _write_entry(
        self, index: int, tensors: dict[str, torch.Tensor], start: int, n_ctx: int
    ) -> dict:
        """Write shard file ``index`` atomically; its manifest entry."""
        target = self.path / shard_name(index)
        sha = _write_shard(target, tensors, start)
        entry = {
            "file": target.name,
            "rows": n_ctx * self.context_length,
            "contexts": [start, start + n_ctx],
            "bytes": target.stat().st_size,
            "sha256": sha,
        }
        remember_verified(target, entry)  # we just hashed what we wrote
        return entry

    def _record(self, entries: list[dict], *, at: int) -> None:
        """Put ``entries`` into the manifest from shard ``at`` on (replacing one, or appending)."""
        shards = [*self._shards]
        shards[at : at + len(entries)] = entries
        manifest = {
            **self._manifest,
            "shards": shards,
            "committed_contexts": shards[-1]["contexts"][1],
            "committed_rows": sum(s["rows"] for s in shards),
        }
        write_json(self.path / MANIFEST, manifest)
        self._manifest = manifest
        for i in range(at, at + len(entries)):
            self._layouts.pop(i, None)

    def _remove_uncommitted(self, *, keep_staged: bool) -> None:
        """Delete shard and temp files a crashed writer left; the manifest does not list them.

        With ``keep_staged`` (resuming an existing store), staged shards (with their
        ``.staged.json``) beyond the committed ones are kept: a distributed harvest resumes
        with them. A new store keeps none (they would belong to a store whose manifest is gone).
        """
        listed = {s["file"] for s in self._shards}
        names = {f.name for f in self.path.iterdir()}
        for f in sorted(self.path.iterdir()):
            staged = STAGED_PATTERN.fullmatch(f.name)
            if staged:
                shard = staged.group(1)
                stray = not keep_staged or shard in listed or shard not in names
            else:
                stray = (SHARD_PATTERN.fullmatch(f.name) and f.name not in listed
                         and not (keep_staged and f"{f.name}{STAGED_SUFFIX}" in names))
            if stray or (f.name.startswith(".") and f.name.endswith(".tmp")):
                log.warning(
                    "removing %s: not committed in %s (left by an interrupted write)", f, MANIFEST
                )
                f.unlink()


def _writer_lock(path: Path) -> FileLock:
    """Take the store's writer lock without waiting; held by another process: StoreLockedError."""
    return try_lock(
        path / LOCK_FILE,
        f"another process is writing the activation store at {path} "
        f"(it holds {path / LOCK_FILE}); wait for it to finish or use another store path",
        StoreLockedError,
    )


def _batch_tensors(
    store: StoreReader, context_start: int, acts: Batch, tokens: torch.Tensor | np.ndarray,
    loss: torch.Tensor | np.ndarray | None,
) -> dict[str, torch.Tensor]:
    """Validate one batch against the store's settings and flatten it into shard tensors."""
    hooks, length = store.hooks, store.context_length
    missing, unknown = set(hooks) - set(acts), set(acts) - set(hooks)
    if missing or unknown:
        raise HookError(
            f"append got hooks {sorted(acts)} but the store at {store.path} holds exactly "
            f"{sorted(hooks)} (missing: {sorted(missing)}, unknown: {sorted(unknown)})"
        )
    tok = torch.as_tensor(tokens)
    if tok.ndim != 2 or tok.shape[1] != length:
        raise ShapeMismatchError(
            f"tokens must be [B, {length}] (the store's context length), got {list(tok.shape)}"
        )
    if tok.is_floating_point() or tok.is_complex():
        raise DarkMatterError(f"tokens must be integers, got {tok.dtype}")
    b, t = tok.shape
    store_dtype = DTYPES[store.dtype][1]
    out: dict[str, torch.Tensor] = {}
    for hook, d in hooks.items():
        x = torch.as_tensor(acts[hook])
        if x.ndim != 3 or x.shape[0] != b or x.shape[1] != t:
            raise ShapeMismatchError(
                f"activations for {hook!r} must be [{b}, {t}, d], got {list(x.shape)}"
            )
        if x.shape[2] != d:
            raise ShapeMismatchError(
                f"activations for {hook!r} have width {x.shape[2]} but the store holds width {d}"
            )
        out[hook] = x.detach().to("cpu", store_dtype).reshape(b * t, d).contiguous()
    if loss is None:
        loss_t = torch.full((b * t,), float("nan"))
    else:
        loss_t = torch.as_tensor(loss).detach()
        if tuple(loss_t.shape) != (b, t):
            raise ShapeMismatchError(
                f"loss must be [{b}, {t}] like tokens, got {list(loss_t.shape)}"
            )
    out["tokens"] = tok.to("cpu", torch.int32).reshape(-1).contiguous()
    out["position"] = torch.arange(t, dtype=torch.int32).repeat(b)
    out["context"] = torch.arange(
        context_start, context_start + b, dtype=torch.int64
    ).repeat_interleave(t)
    out["loss"] = loss_t.to("cpu", torch.float32).reshape(-1).contiguous()
    return out


def _write_shard(target: Path, tensors: dict[str, torch.Tensor], context_start: int) -> str:
    """Write a shard atomically (``atomic_path``: temp + fsync + rename); return its sha256.

    The header metadata is one key: safetensors writes several keys in a per-process random
    order, which would make identical data hash differently across runs.
    """
    meta = json.dumps({"format": FORMAT, "context_start": context_start})
    with atomic_path(target) as tmp:
        save_file(tensors, tmp, metadata={FORMAT: meta})
        sha = file_sha256(tmp)
    return sha
