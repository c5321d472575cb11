"""The state of one SAE being trained, and its checkpoint file.

``checkpoint.pt`` holds model, optimizer and counters so that a killed and rerun training ends
with bit-identical weights (on CPU); it is written atomically and read with
``torch.load(weights_only=True)`` only. A finished SAE is one whose ``training.json`` carries
the fingerprint of its config and data.
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae_darkmatter._io import atomic_path, read_json
from sae_darkmatter.saes.archs.base import TrainingSAE
from sae_darkmatter.saes.io import CFG_FILENAME, TRAINING_FILENAME, WEIGHTS_FILENAME

log = logging.getLogger(__name__)

CHECKPOINT_FILENAME = "checkpoint.pt"


@dataclass
class Member:
    """One SAE of a grid being trained and everything its checkpoint holds."""

    out_dir: Path
    key: str
    lr: float
    sae: TrainingSAE
    opt: torch.optim.Optimizer
    since_fired: torch.Tensor
    step: int = 0
    seconds: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)
    last_fvu: float = math.nan
    end: int = 0  # last step (exclusive); moves earlier when a plateau starts the decay
    decay_steps: float = 1.0
    heldout: list[dict[str, float]] = field(default_factory=list)  # until = "plateau" only


def is_finished(out_dir: Path, key: str) -> bool:
    """Whether ``out_dir`` holds a saved SAE whose ``training.json`` has fingerprint ``key``."""
    info = out_dir / TRAINING_FILENAME
    needed = (info, out_dir / CFG_FILENAME, out_dir / WEIGHTS_FILENAME)
    return all(p.is_file() for p in needed) and read_json(info).get("fingerprint") == key


def save_checkpoint(m: Member) -> None:
    """Atomically write everything a bit-identical resume needs (tensors and plain data only)."""
    blob = {
        "fingerprint": m.key,
        "step": m.step,
        "seconds": m.seconds,
        "model": {k: v.detach().cpu() for k, v in m.sae.state_dict().items()},
        "optimizer": m.opt.state_dict(),
        "since_fired": m.since_fired.cpu(),
        "curve": m.curve,
        "end": m.end,
        "decay_steps": m.decay_steps,
        "heldout": m.heldout,
    }
    with atomic_path(m.out_dir / CHECKPOINT_FILENAME) as tmp:
        torch.save(blob, tmp)


def _remove_checkpoint_temps(out_dir: Path) -> None:
    """Delete the temp files that a kill during a checkpoint save left."""
    for stale in out_dir.glob(f".{CHECKPOINT_FILENAME}.*.tmp"):
        stale.unlink()


def remove_checkpoint(out_dir: Path) -> None:
    """Delete a finished SAE's checkpoint (and any temp file of one)."""
    _remove_checkpoint_temps(out_dir)
    (out_dir / CHECKPOINT_FILENAME).unlink(missing_ok=True)


def maybe_resume(m: Member) -> None:
    """Load model, optimizer and counters from a checkpoint of the same run, if there is one."""
    path = m.out_dir / CHECKPOINT_FILENAME
    _remove_checkpoint_temps(m.out_dir)
    if not path.is_file():
        return
    try:  # weights_only: a checkpoint holding other pickled objects is refused, never run
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        log.warning("ignoring unreadable checkpoint %s (%s); training this SAE from the start",
                    path, str(exc).splitlines()[0][:200])
        return
    if not isinstance(blob, dict) or blob.get("fingerprint") != m.key:
        log.warning("ignoring %s: it belongs to a different config or data", path)
        return
    if set(blob["model"]) != set(m.sae.state_dict()):
        log.warning("ignoring %s: written by an older version of the trainer", path)
        return
    m.sae.load_state_dict(blob["model"])
    m.opt.load_state_dict(blob["optimizer"])
    m.step, m.seconds, m.since_fired = blob["step"], blob["seconds"], blob["since_fired"]
    m.curve = blob.get("curve", [])
    m.end, m.decay_steps = blob.get("end", m.end), blob.get("decay_steps", m.decay_steps)
    m.heldout = blob.get("heldout", [])
    log.info("resuming SAE training from step %d (%s)", m.step, path)
