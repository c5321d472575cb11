"""SAE training: each architecture's quality on synthetic data, one-pass grids, resume after
SIGKILL, names and config errors (the kernels and losses are in test_train_kernels.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from helpers import SRC, float64_fvu, training_sae
from sae_darkmatter.config import SAETrainConfig, from_dict
from sae_darkmatter.errors import ConfigError, DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes import JumpReLUSAE, ReLUSAE, load_sae, save_sae, train_sae
from sae_darkmatter.saes.archs import ARCHITECTURES
from sae_darkmatter.saes.train import sae_folder_name, train_grid
from sae_darkmatter.saes.train_data import BatchStream

# float32 reconstructions that differ only in summation order (embedding_bag vs dense matmul)
RTOL, ATOL = 1e-5, 1e-5
COEF_FIELD = {"topk": "ks", "batchtopk": "ks", "relu": "l1_coefficients",
              "jumprelu": "l0_coefficients"}


def _sparse_data(n: int, d: int = 32, m: int = 64, k: int = 4, seed: int = 0):
    """x = 7 * (sparse non-negative combination of k of m unit directions) + 3."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(m, d, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=gen).argsort(1)[:, :k]
    z = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, k, generator=gen) * 2 + 0.5)
    return z @ dirs * 7 + 3, dirs


# --------------------------------------------------------------------------- training quality


def test_batch_stream_is_seeded_epoch_permutations():
    stream = BatchStream(n_rows=10, batch_size=4, seed=3)
    rows = torch.cat([stream.rows(s) for s in range(5)])  # 20 rows = exactly 2 epochs
    assert sorted(rows[:10].tolist()) == list(range(10)) == sorted(rows[10:].tolist())
    assert not torch.equal(rows[:10], rows[10:])
    again = BatchStream(n_rows=10, batch_size=4, seed=3)
    assert torch.equal(again.rows(3), stream.rows(3))
    assert not torch.equal(BatchStream(10, 4, seed=4).rows(0), stream.rows(0))
    assert BatchStream(n_rows=3, batch_size=8, seed=0).rows(0).shape == (8,)


def test_topk_training_recovers_sparse_structure(tmp_path, sae_lens):
    x, dirs = _sparse_data(8192)
    cfg = SAETrainConfig(ks=(4,), train_tokens=24_576, batch_size=256, checkpoint_every=1000)
    sae = train_sae(x, width=128, k=4, cfg=cfg, out_dir=tmp_path, progress=False,
                    metadata={"hook_name": "synthetic"})
    info = json.loads((tmp_path / "training.json").read_text())
    assert info["steps"] == 96 and info["tokens_seen"] == 24_576
    assert not (tmp_path / "checkpoint.pt").exists()

    saved = load_sae(tmp_path)
    with torch.no_grad():
        fvu = float64_fvu(x, saved(x))
    assert fvu < 0.1
    # the scale is folded: raw-space FVU of the saved SAE matches the scaled-space training FVU
    assert abs(fvu - info["last_batch_fvu"]) < 0.02
    with torch.no_grad():
        assert info["final_train_fvu"] == pytest.approx(
            float64_fvu(x[:16384], saved(x[:16384])), rel=1e-5
        )
    # most true directions are found by some decoder row
    cos = (dirs @ (saved.W_dec / saved.W_dec.norm(dim=1, keepdim=True)).T).max(1).values
    assert (cos > 0.9).float().mean() > 0.8
    assert torch.equal(sae.W_dec, saved.W_dec)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), saved(x), rtol=RTOL, atol=1e-4)

    # a finished folder with the same config is returned without training
    mtime = (tmp_path / "training.json").stat().st_mtime_ns
    again = train_sae(x, width=128, k=4, cfg=cfg, out_dir=tmp_path, progress=False)
    assert torch.equal(again.W_enc, saved.W_enc)
    assert (tmp_path / "training.json").stat().st_mtime_ns == mtime


# Synthetic data: 64 true directions, 4 active per token, W=128, 96 steps of 256 rows; the
# noise-free data allows FVU -> 0, predicting the mean (b_dec alone) gives FVU 1. Measured FVU /
# L0 / true directions found: topk 0.081 / 4 / 100 %, batchtopk 0.096 / 3.85 / 100 %, relu
# (L1 0.3) 0.071 / 17 / 100 % (L1 shrinkage is compensated by extra small latents), jumprelu
# (L0 0.1) 0.077 / 7.1 / 97 %. Bounds: those values + ~30-40 % (other BLAS / thread counts).
QUALITY = {"batchtopk": (4, 0.13, 4.6), "relu": (0.3, 0.09, 25), "jumprelu": (0.1, 0.11, 10)}


@pytest.mark.parametrize("arch", ["batchtopk", "relu", "jumprelu"])
def test_each_architecture_trains_and_loads_in_sae_lens(arch, tmp_path, sae_lens):
    x, dirs = _sparse_data(8192)
    value, max_fvu, max_l0 = QUALITY[arch]
    cfg = SAETrainConfig(architecture=arch, widths=(128,), **{COEF_FIELD[arch]: (value,)},
                         train_tokens=24_576, batch_size=256, checkpoint_every=1000)
    (path,) = train_grid(x, cfg, tmp_path, progress=False, metadata={"hook_name": "syn"})
    assert path == tmp_path / sae_folder_name(arch, 128, value)
    info = json.loads((path / "training.json").read_text())
    saved = load_sae(path)
    assert isinstance(saved, ReLUSAE if arch == "relu" else JumpReLUSAE)
    with torch.no_grad():
        z = saved.encode(x)
        fvu, l0 = float64_fvu(x, saved.decode(z)), float((z > 0).sum(1).float().mean())
        assert info["final_train_fvu"] == pytest.approx(float64_fvu(x, saved(x)), rel=1e-5)
    assert fvu < max_fvu and l0 < max_l0
    assert info["final_train_l0"] == pytest.approx(l0, rel=1e-6)
    cos = (dirs @ (saved.W_dec / saved.W_dec.norm(dim=1, keepdim=True)).T).max(1).values
    assert (cos > 0.9).float().mean() > 0.8
    torch.testing.assert_close(saved.W_dec.norm(dim=1), torch.ones(128) / info["input_scale"])
    if arch == "batchtopk":  # the estimated threshold reproduces the training-time L0 (k = 4)
        assert info["final_train_l0"] == pytest.approx(4, rel=0.15)
        torch.testing.assert_close(saved.threshold, torch.full((128,), info["threshold"]))
    theirs = sae_lens.SAE.load_from_disk(path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), saved(x), rtol=RTOL, atol=1e-4)


def test_training_json_reports_quality_and_curve(tmp_path):
    x, _ = _sparse_data(2048)
    cfg = SAETrainConfig(architecture="relu", widths=(64,), l1_coefficients=(0.3,),
                         train_tokens=64 * 130, batch_size=64, checkpoint_every=1000)
    (path,) = train_grid(x, cfg, tmp_path, progress=False)
    info = json.loads((path / "training.json").read_text())
    assert info["architecture"] == "relu" and info["width"] == 64
    assert info["sparsity"] == {"name": "l1_coefficient", "value": 0.3}
    assert info["dead_latents"] == round(info["dead_fraction"] * 64)
    assert info["tokens_per_second"] > 0 and 0 < info["final_train_fvu"] < 1
    curve = info["curve"]
    assert [c["tokens"] for c in curve] == [64 * 2 * i for i in range(1, 66)]
    assert set(curve[0]) == {"tokens", "fvu", "l0", "dead_fraction"}
    assert curve[-1]["fvu"] == info["last_batch_fvu"] and curve[-1]["fvu"] < curve[0]["fvu"]


# --------------------------------------------------------------------------- grids and resume


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_grid_equals_training_each_alone(arch, tmp_path):
    x, _ = _sparse_data(1000, seed=2)
    values = (3, 5) if arch in ("topk", "batchtopk") else (0.1, 0.3)
    cfg = SAETrainConfig(architecture=arch, widths=(48, 64), **{COEF_FIELD[arch]: values},
                         train_tokens=64 * 30, batch_size=64, checkpoint_every=1000)
    dirs = train_grid(x, cfg, tmp_path / "grid", progress=False)
    assert [d.name for d in dirs] == [sae_folder_name(arch, w, v) for v in values
                                      for w in (48, 64)]
    for path in dirs:
        info = json.loads((path / "training.json").read_text())
        alone = train_sae(x, width=info["width"], sparsity=info["sparsity"]["value"], cfg=cfg,
                          out_dir=tmp_path / "alone" / path.name, progress=False)
        grid_sae = load_sae(path)
        for name, p in alone.state_dict().items():
            assert torch.equal(grid_sae.state_dict()[name], p), (path.name, name)
        alone_info = json.loads((tmp_path / "alone" / path.name / "training.json").read_text())
        assert alone_info["curve"] == info["curve"]


def test_grid_skips_finished_saes(tmp_path):
    x, _ = _sparse_data(1000, seed=2)
    cfg = SAETrainConfig(widths=(48,), ks=(3,), train_tokens=64 * 10, batch_size=64)
    (first,) = train_grid(x, cfg, tmp_path, progress=False)
    mtime = (first / "training.json").stat().st_mtime_ns
    wider = SAETrainConfig(widths=(48, 64), ks=(3,), train_tokens=64 * 10, batch_size=64)
    dirs = train_grid(x, wider, tmp_path, progress=False)
    assert dirs == [first, tmp_path / "topk-w64-k3"]
    assert (first / "training.json").stat().st_mtime_ns == mtime
    assert (dirs[1] / "training.json").is_file()


_CHILD = textwrap.dedent(
    """
    import sys, torch
    from sae_darkmatter.config import SAETrainConfig
    from sae_darkmatter.saes.train import train_grid
    torch.set_num_threads(int(sys.argv[2]))
    x = torch.load(sys.argv[3], weights_only=True)
    cfg = SAETrainConfig(architecture="batchtopk", widths=(64, 96), ks=(3, 4),
                         train_tokens=int(sys.argv[4]), batch_size=64, checkpoint_every=2,
                         until=sys.argv[5])
    train_grid(x, cfg, sys.argv[1], progress=False)
    """
)


@pytest.mark.parametrize("until", ["tokens", "plateau"])
def test_killed_grid_resumes_bit_identically(until, tmp_path, caplog):
    """SIGKILL mid-run, then one SAE loses its checkpoint (as if killed while saving it): the
    resumed grid restarts that SAE from 0, resumes the others, and ends bit-identical (with
    the same held-out scores and stopping step under a plateau rule)."""
    x, _ = _sparse_data(1000, seed=1)
    torch.save(x, tmp_path / "x.pt")
    steps = 200
    # checkpoint_every is not part of the fingerprint: only the child saves every 2 steps
    cfg = SAETrainConfig(architecture="batchtopk", widths=(64, 96), ks=(3, 4),
                         train_tokens=64 * steps, batch_size=64, checkpoint_every=1000,
                         until=until)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(killed), str(torch.get_num_threads()),
         str(tmp_path / "x.pt"), str(64 * steps), until], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(killed.glob("*/checkpoint.pt"))) < 4:
            assert child.poll() is None, "training ended before every SAE had a checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert not list(killed.glob("*/training.json"))
    checkpoints = sorted(killed.glob("*/checkpoint.pt"))
    step = torch.load(checkpoints[-1], weights_only=True)["step"]
    assert 0 < step < steps
    checkpoints[0].unlink()

    with caplog.at_level("INFO", logger="sae_darkmatter.saes"):
        resumed = train_grid(x, cfg, killed, progress=False)
    assert "resuming SAE training from step" in caplog.text
    straight = train_grid(x, cfg, tmp_path / "straight", progress=False)
    for a, b in zip(resumed, straight, strict=True):
        sa, sb = load_sae(a).state_dict(), load_sae(b).state_dict()
        for name, p in sb.items():
            assert torch.equal(sa[name], p), (a.name, name)
        ia, ib = (json.loads((p / "training.json").read_text()) for p in (a, b))
        assert ia["curve"] == ib["curve"] and ia["threshold"] == ib["threshold"]
        assert ia["schedule"] == ib["schedule"] and ia["steps"] == ib["steps"]


# --------------------------------------------------------------------------- names and errors


def test_registry_matches_the_config_and_exports_its_classes(tmp_path):
    """Every trainable name has one record; its trainer exports the record's inference class,
    which saves under its SAELens name and loads back as itself."""
    assert tuple(ARCHITECTURES) == SAETrainConfig.ARCHITECTURES
    for name, arch in ARCHITECTURES.items():
        assert SAETrainConfig(architecture=name).sparsity_field() == arch.sparsity_field
        sae = training_sae(name, sparsity=5).export(2.0)
        assert type(sae) is arch.sae_class
        save_sae(sae, tmp_path / name, metadata={})
        cfg = json.loads((tmp_path / name / "cfg.json").read_text())
        assert cfg["architecture"] == arch.sae_class.saelens_architecture
        assert type(load_sae(tmp_path / name)) is arch.sae_class



def test_sae_folder_names_are_stable_and_distinct():
    assert sae_folder_name("topk", 512, 32) == "topk-w512-k32"
    assert sae_folder_name("batchtopk", 512, 32) == "batchtopk-w512-k32"
    assert sae_folder_name("relu", 512, 0.03) == "relu-w512-l1_3e-02"
    assert sae_folder_name("relu", 512, 0.025) == "relu-w512-l1_2.5e-02"
    assert sae_folder_name("jumprelu", 4096, 1) == "jumprelu-w4096-l0_1e+00"
    assert sae_folder_name("matryoshka_batchtopk", 512, 32) == "matryoshka_batchtopk-w512-k32"
    assert sae_folder_name("batchtopk", 512, 32, skip=True) == "skip-transcoder-batchtopk-w512-k32"


def test_bad_configs_get_specific_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"one of \['topk', 'batchtopk', 'relu', 'jumprelu', "
                                          r"'matryoshka_batchtopk'\]"):
        SAETrainConfig(architecture="gated")
    with pytest.raises(ConfigError, match="train.l1_coefficients must be a non-empty list"):
        SAETrainConfig(architecture="relu", l1_coefficients=())
    with pytest.raises(ConfigError, match="train.ks must be .* positive ints"):
        SAETrainConfig(ks=(2.5,))
    with pytest.raises(ConfigError, match="train.batch_size must be >= 1"):
        SAETrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="train.architecture"):
        from_dict(SAETrainConfig, {"architecture": "RELU"})
    assert from_dict(SAETrainConfig, {"architecture": "jumprelu", "l0_coefficients": [1, 2]}
                     ).sparsity_values() == (1, 2)

    x = torch.randn(10, 4)
    cfg = SAETrainConfig(ks=(4,), train_tokens=256, batch_size=64)
    with pytest.raises(ShapeMismatchError, match="2-D"):
        train_sae(torch.randn(10), width=16, k=4, cfg=cfg, out_dir=tmp_path)
    with pytest.raises(DarkMatterError, match="must exceed k"):
        train_sae(x, width=4, k=4, cfg=cfg, out_dir=tmp_path)
    with pytest.raises(DarkMatterError, match="must exceed k"):
        train_grid(x, SAETrainConfig(widths=(8, 16), ks=(8,)), tmp_path)
    with pytest.raises(DarkMatterError, match="exactly one of k= and sparsity="):
        train_sae(x, width=16, cfg=cfg, out_dir=tmp_path)
    relu = SAETrainConfig(architecture="relu", train_tokens=256, batch_size=64)
    with pytest.raises(DarkMatterError, match="pass sparsity= for relu"):
        train_sae(x, width=16, k=4, cfg=relu, out_dir=tmp_path)
    with pytest.raises(DarkMatterError, match="repeated SAEs"):
        train_grid(x, SAETrainConfig(architecture="relu", l1_coefficients=(1, 1.0)), tmp_path)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(DarkMatterError, match="NaN"):
        train_sae(bad, width=16, k=4, cfg=cfg, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())
