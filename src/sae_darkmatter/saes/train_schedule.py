"""How long an SAE trains and how its learning rate decays: a fixed budget or a plateau.

Both modes keep the learning rate constant, then decay it linearly to 0 over the last 20 % of
the steps taken. ``until = "tokens"`` trains exactly ``train_tokens``. ``until = "plateau"``
holds out rows of the training data, scores every SAE on them every ``eval_every`` steps, and
starts the decay once doubling the tokens seen lowered the held-out FVU by less than
``plateau_tolerance`` (relative): FVU(~t) > (1 - tolerance) · FVU(~t / 2), each side a mean
over a window of scores (``doubling_gain``). ``train_tokens`` then
caps the run; an SAE that reaches the cap first decays over its last 20 % as in the fixed mode,
and its record says it stopped at the cap, not on a plateau.

``doubling_gain`` measures it on any curve (held-out scores, or the noisier training-batch
curve of a fixed budget): how much the last doubling of training still helped, i.e. how far an
SAE was from its plateau when its decay began.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch

DECAY_FRACTION = 0.2
HELDOUT_ROWS = 8_192  # at most; and at most a tenth of the training rows
MIN_EVALS = 4  # held-out scores needed before a plateau may be declared


def heldout_count(n_rows: int) -> int:
    """Rows held out of ``n_rows`` training rows: min(8,192, n/10)."""
    return min(HELDOUT_ROWS, n_rows // 10)


def heldout_split(n_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (training rows, held-out rows) of ``n_rows`` (``heldout_count`` held out)."""
    n_held = heldout_count(n_rows)
    digest = hashlib.sha256(f"heldout:{seed}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    perm = torch.randperm(n_rows, generator=gen)
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def eval_every(cap_steps: int) -> int:
    """Steps between held-out scores: about 256 over the cap, at least every step."""
    return max(1, cap_steps // 256)


def doubling_gain(points: Sequence[dict[str, Any]], until_tokens: float = math.inf
                  ) -> float | None:
    """How much the last doubling of tokens lowered the FVU, relative: ``1 - late / early``.

    Points are ``{"tokens": .., "fvu": ..}`` in order of tokens; those up to ``until_tokens``
    count. With t the last one's tokens, ``late`` is the mean FVU over (3t/4, t] and ``early``
    over (3t/8, t/2] (means, so one noisy score neither declares nor hides a plateau).
    ``None`` when no point lies in the early window.
    """
    points = [p for p in points if p["tokens"] <= until_tokens]
    if not points:
        return None
    t = points[-1]["tokens"]
    late = [float(p["fvu"]) for p in points if p["tokens"] > 0.75 * t]
    early = [float(p["fvu"]) for p in points if 0.375 * t < p["tokens"] <= 0.5 * t]
    if not early or not sum(early) > 0:
        return None
    return 1.0 - (sum(late) / len(late)) / (sum(early) / len(early))


def plateaued(points: Sequence[dict[str, Any]], tolerance: float) -> bool:
    """Whether the held-out FVU gained less than ``tolerance`` over the last doubling."""
    if len(points) < MIN_EVALS:
        return False
    gain = doubling_gain(points)
    return gain is not None and gain < tolerance


def decay_after(step: int, cap_steps: int) -> tuple[int, float]:
    """(last step, decay steps) for a decay that starts after ``step`` constant-rate steps.

    The decay takes a fifth of all steps, so ``step`` is four fifths of them; never past
    the cap.
    """
    end = min(cap_steps, step + math.ceil(step * DECAY_FRACTION / (1 - DECAY_FRACTION)))
    return end, float(max(1, end - step))


def lr_factor(step: int, end: int, decay_steps: float) -> float:
    """Multiplier of the learning rate at ``step``: 1, then linear to 0 at ``end``."""
    return min(1.0, (end - step) / decay_steps)
