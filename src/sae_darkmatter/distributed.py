"""Many processes under ``torchrun``: ranks, each rank's share of the work, merged statistics.

All communication is ``torch.distributed`` (gloo on CPU, NCCL on CUDA); nothing here schedules
work of its own. Outside ``torchrun`` (or inside :func:`local`) every function acts as one
process, rank 0 of 1, so the same library code runs in both settings. How the stages use it:

- harvest: shard ``i`` of the store (a fixed range of contexts) is computed by rank
  ``i % world_size``; each rank writes its own shard files, rank 0 records them in the manifest.
  The store equals a single-process store byte for byte (same contexts in the same batches).
- SAE training: the SAEs of a width x sparsity grid are dealt out to the ranks; each SAE's
  training depends only on its own seed and the shared batch order, so the weights are those a
  single process trains.
- decomposition: each rank accumulates the float64 least-squares and R² sums over a contiguous
  share of the rows; the sums are gathered and merged in rank order (equal on every rank, and
  equal to one process's sums up to float64 rounding, ~1e-15 relative).

Statistics are exchanged with ``all_gather_object`` (a few MB per merge), not a raw all-reduce,
so ranks with different reference rows, or none at all, merge exactly.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Rank 0 may run analyses and the report while the others wait at a barrier.
TIMEOUT = datetime.timedelta(hours=6)
_local_depth = 0


class Mergeable(Protocol):
    """An accumulator of additive statistics (``StreamingLstsq``, ``R2Accumulator``)."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
    def merge(self, other: Any) -> None: ...


M = TypeVar("M", bound=Mergeable)


def launched() -> bool:
    """True in a process that ``torchrun`` started with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> bool:
    """Join the process group ``torchrun`` describes; returns whether there is more than one rank.

    The backend is NCCL when torch sees a GPU (each rank then uses GPU ``LOCAL_RANK``), else
    gloo. A no-op outside ``torchrun`` and when the group is already up.
    """
    if not launched():
        return False
    if dist.is_initialized():
        return True
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def check_initialized() -> None:
    """Warn when ``torchrun`` started several ranks but the process group was never joined: each
    rank would then redo all the work on the same files (the CLI joins it by itself)."""
    if launched() and not dist.is_initialized():
        log.warning("torchrun started %s ranks but torch.distributed is not initialized, so every "
                    "rank does all the work; call sae_darkmatter.distributed.init() first",
                    os.environ.get("WORLD_SIZE"))


def shutdown() -> None:
    """Leave the process group (after a final barrier, so no rank exits while others still talk)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _active() -> bool:
    return _local_depth == 0 and dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


@contextmanager
def local() -> Iterator[None]:
    """Inside this block the process acts alone (rank 0 of 1): for work only rank 0 does."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. filling a cache), then the other ranks."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def share(n: int) -> slice:
    """This rank's contiguous part of ``n`` items (sizes differ by at most one; rank order)."""
    r, w = rank(), world_size()
    return slice(r * n // w, (r + 1) * n // w)


def owns(index: int) -> bool:
    """Round-robin ownership of numbered work items (shards, SAEs): item ``i`` is rank
    ``i % w``'s."""
    return index % world_size() == rank()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merged(acc: M) -> M:
    """``acc`` with every rank's rows: the ranks' accumulators merged in rank order (same on
    all)."""
    if not _active():
        return acc
    states = gather({k: v.cpu() for k, v in acc.state_dict().items()})
    out = copy.deepcopy(acc)
    out.load_state_dict(states[0])
    for state in states[1:]:
        other = copy.deepcopy(acc)
        other.load_state_dict(state)
        out.merge(other)
    return out


def summed(t: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's ``t``, added in rank order (bit-identical on every rank)."""
    parts = gather(t.cpu())
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total.to(t.device)


def concatenated(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """This rank's ``arrays`` joined, then every rank's joined in rank order."""
    mine = np.concatenate(arrays) if len(arrays) else None
    parts = [p for p in gather(mine) if p is not None]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
