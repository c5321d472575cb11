"""SAE training: sparse gradients, seeded batches, quality, resume (checked against sae_lens)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sae_darkmatter.config import SAETrainConfig
from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes import TopKSAE, load_sae, train_sae
from sae_darkmatter.saes import train as train_mod

# float32 reconstructions that differ only in summation order (embedding_bag vs dense matmul)
RTOL, ATOL = 1e-5, 1e-5


def _random_topk(d_in: int = 48, d_sae: int = 192, k: int = 8, seed: int = 0) -> TopKSAE:
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d_in, d_sae, k, generator=gen)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen))
    return sae


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x64, e = x.double(), (x - x_hat).double()
    return float(e.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())


@pytest.fixture(scope="module")
def sae_lens():
    """The real library (a dev dependency): a missing install must fail, not skip."""
    import sae_lens

    return sae_lens




# --------------------------------------------------------------------------- training


def _sparse_data(n: int, d: int = 32, m: int = 64, k: int = 4, seed: int = 0):
    """x = 7 * (sparse non-negative combination of k of m unit directions) + 3."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(m, d, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=gen).argsort(1)[:, :k]
    z = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, k, generator=gen) * 2 + 0.5)
    return z @ dirs * 7 + 3, dirs


def test_sparse_gradients_equal_dense_autograd():
    sae = _random_topk(d_in=20, d_sae=50, k=5)
    xb = torch.randn(40, 20)
    dead = torch.arange(50) % 3 == 0
    train_mod._train_step(sae, torch.optim.SGD(sae.parameters(), lr=0.0), xb, dead,
                          torch.zeros(50, dtype=torch.int64))
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}

    # dense reference: the same loss written with plain autograd ops
    sae.zero_grad()
    pre = (xb - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(5, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    residual = xb - (z @ sae.W_dec + sae.b_dec)
    fvu = residual.pow(2).sum() / (xb - xb.mean(0)).pow(2).sum()
    k_aux = min(10, int(dead.sum()))
    aux = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, aux.indices, aux.values)
    r = residual.detach()
    auxk = (z_aux @ sae.W_dec - r).pow(2).sum() / (r - r.mean(0)).pow(2).sum()
    (fvu + train_mod.AUXK_COEF * auxk).backward()
    w, g = sae.W_dec.detach(), sae.W_dec.grad
    sae.W_dec.grad = g - (g * w).sum(1, keepdim=True) * w
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_batch_stream_is_seeded_epoch_permutations():
    stream = train_mod._BatchStream(n_rows=10, batch_size=4, seed=3)
    rows = torch.cat([stream.rows(s) for s in range(5)])  # 20 rows = exactly 2 epochs
    assert sorted(rows[:10].tolist()) == list(range(10)) == sorted(rows[10:].tolist())
    assert not torch.equal(rows[:10], rows[10:])
    again = train_mod._BatchStream(n_rows=10, batch_size=4, seed=3)
    assert torch.equal(again.rows(3), stream.rows(3))
    assert not torch.equal(train_mod._BatchStream(10, 4, seed=4).rows(0), stream.rows(0))
    assert train_mod._BatchStream(n_rows=3, batch_size=8, seed=0).rows(0).shape == (8,)


def test_training_recovers_sparse_structure(tmp_path, sae_lens):
    x, dirs = _sparse_data(8192)
    cfg = SAETrainConfig(ks=(4,), train_tokens=24_576, batch_size=256, checkpoint_every=1000)
    sae = train_sae(x, width=128, k=4, cfg=cfg, out_dir=tmp_path, progress=False,
                    metadata={"hook_name": "synthetic"})
    info = json.loads((tmp_path / "training.json").read_text())
    assert info["steps"] == 96 and info["tokens_seen"] == 24_576
    assert not (tmp_path / "checkpoint.pt").exists()

    saved = load_sae(tmp_path)
    with torch.no_grad():
        fvu = _fvu(x, saved(x))
    assert fvu < 0.1
    # the scale is folded: raw-space FVU of the saved SAE matches the scaled-space training FVU
    assert abs(fvu - info["last_batch_fvu"]) < 0.02
    with torch.no_grad():
        assert info["final_train_fvu"] == pytest.approx(_fvu(x[:16384], saved(x[:16384])), rel=1e-5)
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


def test_training_validates_inputs(tmp_path):
    cfg = SAETrainConfig(ks=(4,), train_tokens=256, batch_size=64)
    with pytest.raises(ShapeMismatchError, match="2-D"):
        train_sae(torch.randn(10), width=16, k=4, cfg=cfg, out_dir=tmp_path)
    with pytest.raises(DarkMatterError, match="must exceed k"):
        train_sae(torch.randn(10, 4), width=4, k=4, cfg=cfg, out_dir=tmp_path)
    bad = torch.randn(10, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(DarkMatterError, match="NaN"):
        train_sae(bad, width=16, k=4, cfg=cfg, out_dir=tmp_path)


_CHILD = textwrap.dedent(
    """
    import sys, torch
    from sae_darkmatter.config import SAETrainConfig
    from sae_darkmatter.saes import train_sae
    torch.set_num_threads(int(sys.argv[2]))
    x = torch.load(sys.argv[3], weights_only=True)
    cfg = SAETrainConfig(ks=(4,), train_tokens=int(sys.argv[4]), batch_size=64, checkpoint_every=2)
    train_sae(x, width=96, k=4, cfg=cfg, out_dir=sys.argv[1], progress=False)
    """
)


def test_killed_training_resumes_bit_identically(tmp_path, caplog):
    x, _ = _sparse_data(1000, seed=1)
    torch.save(x, tmp_path / "x.pt")
    tokens = 64 * 600
    cfg = SAETrainConfig(ks=(4,), train_tokens=tokens, batch_size=64, checkpoint_every=2)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(killed), str(torch.get_num_threads()),
         str(tmp_path / "x.pt"), str(tokens)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoint.pt").exists():
            assert child.poll() is None, "training ended before a checkpoint appeared"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert not (killed / "training.json").exists()
    step = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 600

    with caplog.at_level("INFO", logger="sae_darkmatter.saes.train"):
        resumed = train_sae(x, width=96, k=4, cfg=cfg, out_dir=killed, progress=False)
    assert f"resuming SAE training from step {step}" in caplog.text
    straight = train_sae(x, width=96, k=4, cfg=cfg, out_dir=tmp_path / "straight", progress=True)
    for name, p in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], p), name
