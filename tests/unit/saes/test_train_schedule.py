"""Training length: the plateau rule, its learning-rate schedule, held-out rows, and the record
of how far each SAE was from its plateau (``saes.train_schedule``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import SRC  # noqa: F401  (tests/ on the path, as for the other trainer tests)
from sae_darkmatter.config import SAETrainConfig
from sae_darkmatter.errors import ConfigError, DarkMatterError
from sae_darkmatter.saes.train import train_grid
from sae_darkmatter.saes.train_schedule import (
    DECAY_FRACTION,
    decay_after,
    doubling_gain,
    heldout_split,
    lr_factor,
    plateaued,
)


def _curve(fvu, every=100):
    return [{"tokens": every * (i + 1), "fvu": float(f)} for i, f in enumerate(fvu)]


def test_doubling_gain_compares_window_means():
    # tokens 100..1600: late window (1200, 1600] holds 1300..1600, early (600, 800] 700..800
    fvu = np.linspace(1.0, 0.25, 16)
    points = _curve(fvu)
    late, early = fvu[12:16].mean(), fvu[6:8].mean()
    assert doubling_gain(points) == pytest.approx(1 - late / early, rel=1e-12)
    # only points up to until_tokens count
    assert doubling_gain(points, until_tokens=800) == pytest.approx(
        1 - fvu[6:8].mean() / fvu[3:4].mean(), rel=1e-12)
    assert doubling_gain(points[:1]) is None and doubling_gain([]) is None


def test_plateau_needs_a_small_gain_and_enough_scores():
    power_law = _curve(1000 * np.arange(1, 65, dtype=float) ** -0.5)  # 29 % per doubling
    flat = _curve([0.5] * 3 + [0.3] * 61)
    assert not plateaued(power_law, 0.01) and plateaued(flat, 0.01)
    assert not plateaued(flat[:3], 0.5)  # fewer than MIN_EVALS scores never plateau
    assert plateaued(power_law, 0.3)


def test_decay_takes_a_fifth_of_the_steps_and_never_passes_the_cap():
    assert decay_after(400, 10_000) == (500, 100.0)
    assert decay_after(9_000, 10_000) == (10_000, 1000.0)
    end, steps = decay_after(400, 10_000)
    factors = [lr_factor(s, end, steps) for s in range(398, 501)]
    assert factors[:3] == [1.0, 1.0, 1.0] and factors[-1] == 0.0
    assert np.allclose(np.diff(factors[2:]), -1 / 100)
    # a fixed budget: the old schedule, exactly
    n = 137
    assert all(lr_factor(s, n, DECAY_FRACTION * n) == min(1.0, (n - s) / (DECAY_FRACTION * n))
               for s in range(n))


def test_heldout_rows_are_a_seeded_tenth_disjoint_from_training_rows():
    train, held = heldout_split(1000, seed=3)
    assert len(held) == 100 and len(train) == 900
    assert torch.equal(torch.cat([train, held]).sort().values, torch.arange(1000))
    assert torch.equal(heldout_split(1000, seed=3)[1], held)
    assert not torch.equal(heldout_split(1000, seed=4)[1], held)
    assert len(heldout_split(10**6, seed=0)[1]) == 8192


def _sparse(n, d=32, m=64, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
    idx = torch.rand(n, m, generator=gen).argsort(1)[:, :k]
    z = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, k, generator=gen) * 2 + 0.5)
    return z @ dirs * 7 + 3


def test_plateau_stops_early_and_records_why(tmp_path):
    """On data a 16-latent k=1 SAE fits quickly (one of 8 directions per row), the plateau
    rule stops well before the cap; its record holds the held-out scores that triggered it; a
    fixed budget runs to the end."""
    x = _sparse(3000, d=16, m=8, k=1, seed=3)
    cap = 600
    base = dict(widths=(16,), ks=(1,), train_tokens=64 * cap, batch_size=64,
                checkpoint_every=10_000)
    (plat,) = train_grid(x, SAETrainConfig(**base, until="plateau", plateau_tolerance=0.02),
                         tmp_path / "plateau", progress=False)
    (fixed,) = train_grid(x, SAETrainConfig(**base), tmp_path / "tokens", progress=False)
    p, f = (json.loads((d / "training.json").read_text()) for d in (plat, fixed))
    s = p["schedule"]
    assert s["stopped"] == "plateau" and s["heldout_rows"] == 300
    assert p["steps"] < (1 - DECAY_FRACTION) * cap
    decay_step = s["decay_start_tokens"] // 64
    assert p["steps"] == decay_step + -(-decay_step // 4)  # the decay: a fifth of all steps
    assert s["heldout"][-1]["tokens"] == s["decay_start_tokens"]
    assert s["doubling_gain"] == doubling_gain(s["heldout"]) < 0.02
    assert all(doubling_gain(s["heldout"][:i]) is None or doubling_gain(s["heldout"][:i]) >= 0.02
               for i in range(4, len(s["heldout"])))  # it stopped at the first plateau
    assert f["steps"] == cap and f["schedule"]["stopped"] == "tokens"
    assert f["schedule"]["doubling_gain"] == doubling_gain(f["curve"], 0.8 * cap * 64)
    assert "heldout" not in f["schedule"]


def test_a_cap_reached_first_is_recorded_as_the_cap(tmp_path):
    x = _sparse(3000, seed=3)
    cfg = SAETrainConfig(widths=(64,), ks=(4,), train_tokens=64 * 40, batch_size=64,
                         until="plateau", plateau_tolerance=1e-6)
    (path,) = train_grid(x, cfg, tmp_path, progress=False)
    info = json.loads((path / "training.json").read_text())
    assert info["steps"] == 40 and info["schedule"]["stopped"] == "cap"
    assert info["schedule"]["decay_start_tokens"] == 32 * 64


def test_plateau_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="until"):
        SAETrainConfig(until="converged")
    with pytest.raises(ConfigError, match="plateau_tolerance"):
        SAETrainConfig(plateau_tolerance=0.0)
    with pytest.raises(DarkMatterError, match="at least 10"):
        train_grid(torch.randn(9, 8), SAETrainConfig(widths=(16,), ks=(2,), until="plateau"),
                   tmp_path, progress=False)
