"""SAE package: TopK math, SAELens-format I/O (checked against sae_lens itself), training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_darkmatter.config import SAETrainConfig
from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes import (
    SAE,
    JumpReLUSAE,
    ReLUSAE,
    TopKSAE,
    load_sae,
    load_sae_config,
    save_sae,
    train_sae,
)
from sae_darkmatter.saes import train as train_mod

# float32 reconstructions that differ only in summation order (embedding_bag vs dense matmul):
# each output sums k products of size ~|z|*|W_dec|, so the difference is a few ulps of that sum.
RTOL, ATOL = 1e-5, 1e-5


def _random_topk(d_in: int = 48, d_sae: int = 192, k: int = 8, seed: int = 0, **kw) -> TopKSAE:
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d_in, d_sae, k, generator=gen, **kw)
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


# --------------------------------------------------------------------------- TopK math


def test_topk_encode_matches_numpy_reference():
    sae = _random_topk()
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    z = sae.encode(x)
    assert z.shape == (64, 192) and (z >= 0).all()
    assert ((z != 0).sum(1) <= sae.k).all()

    p = sae.state_dict()
    pre = (x.numpy() - p["b_dec"].numpy()) @ p["W_enc"].numpy() + p["b_enc"].numpy()
    top = np.argsort(-pre, axis=1)[:, : sae.k]
    expected = np.zeros_like(pre)
    np.put_along_axis(expected, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    np.testing.assert_allclose(z.detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_topk_relu_after_selection():
    """SAELens order: the k largest pre-activations are kept even if negative, then ReLU'd."""
    sae = _random_topk()
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)
    x = torch.randn(5, 48)
    values, indices = sae.encode_topk(x)
    assert values.shape == indices.shape == (5, sae.k)
    assert (values == 0).all() and (sae.encode(x) == 0).all()
    torch.testing.assert_close(sae(x), sae.b_dec.expand(5, -1))


def test_decode_topk_equals_dense_decode():
    sae = _random_topk()
    x = torch.randn(100, 48)
    with torch.no_grad():
        dense = sae.decode(sae.encode(x))
        sparse = sae.decode_topk(*sae.encode_topk(x))
        torch.testing.assert_close(sparse, dense, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(sae(x), dense, rtol=RTOL, atol=ATOL)


def test_protocol_and_properties():
    for sae in (_random_topk(), ReLUSAE(8, 16), JumpReLUSAE(8, 16)):
        assert isinstance(sae, SAE)
    sae = _random_topk(d_in=12, d_sae=40, k=3)
    assert (sae.d_in, sae.d_sae, sae.k) == (12, 40, 3)
    assert sae.W_enc.shape == (12, 40) and sae.W_dec.shape == (40, 12)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))
    with pytest.raises(ValueError, match="k must be"):
        TopKSAE(12, 40, 41)


# --------------------------------------------------------------------------- I/O vs SAELens


def test_saved_folder_loads_in_sae_lens(tmp_path, sae_lens):
    from sae_lens.saes.topk_sae import TopKSAEConfig

    sae = _random_topk()
    meta = {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post", "context_size": 16}
    save_sae(sae, tmp_path / "sae", metadata=meta)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert TopKSAEConfig.from_dict(cfg).to_dict() == cfg  # SAELens reads and writes it unchanged
    assert cfg["metadata"]["hook_name"] == meta["hook_name"]

    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert type(theirs).__name__ == "TopKSAE" and theirs.cfg.k == sae.k
    x = torch.randn(200, 48) * 3
    with torch.no_grad():
        # same ops in the same order up to the decode: latents agree bit for bit
        assert torch.equal(theirs.encode(x), sae.encode(x))
        torch.testing.assert_close(sae(x), theirs(x), rtol=RTOL, atol=ATOL)


def test_round_trip_is_bit_exact(tmp_path):
    for apply_b_dec in (True, False):
        sae = _random_topk(apply_b_dec_to_input=apply_b_dec)
        save_sae(sae, tmp_path / f"s{apply_b_dec}", metadata={})
        (tmp_path / "plain").mkdir(exist_ok=True)  # the folder gets the usual (umask) mode
        assert (tmp_path / f"s{apply_b_dec}").stat().st_mode == (tmp_path / "plain").stat().st_mode
        back = load_sae(tmp_path / f"s{apply_b_dec}")
        assert isinstance(back, TopKSAE) and back.k == sae.k
        assert back.apply_b_dec_to_input is apply_b_dec
        for name, p in sae.state_dict().items():
            assert torch.equal(back.state_dict()[name], p), name


def test_save_into_existing_folder_keeps_other_files(tmp_path):
    (tmp_path / "training.json").write_text("{}")
    save_sae(_random_topk(seed=1), tmp_path, metadata={})
    save_sae(_random_topk(seed=2), tmp_path, metadata={})
    assert (tmp_path / "training.json").read_text() == "{}"
    assert torch.equal(load_sae(tmp_path).W_dec, _random_topk(seed=2).W_dec)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cfg.json", "sae_weights.safetensors", "training.json"]


def _fill_random(sae, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("topk", {"k": 6}),
        ("topk", {"k": 6, "apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True}),
        ("standard", {}),
        ("jumprelu", {"apply_b_dec_to_input": False}),
    ],
)
def test_load_folder_written_by_sae_lens(tmp_path, sae_lens, arch, extra):
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    sae_cls, cfg_cls = get_sae_class(arch)
    theirs = sae_cls(cfg_cls(d_in=24, d_sae=64, metadata=SAEMetadata(hook_name="h"), **extra))
    _fill_random(theirs)
    if arch == "jumprelu":
        with torch.no_grad():
            theirs.threshold.copy_(torch.rand(64) * 0.5)
    theirs.save_model(tmp_path)

    ours = load_sae(tmp_path)
    assert type(ours) is {"topk": TopKSAE, "standard": ReLUSAE, "jumprelu": JumpReLUSAE}[arch]
    assert (ours.d_in, ours.d_sae) == (24, 64)
    x = torch.randn(300, 24) * 2
    with torch.no_grad():
        z_ours, z_theirs = ours.encode(x), theirs.encode(x)
        assert (z_theirs != 0).any(dim=1).float().mean() > 0.5  # a meaningful comparison
        torch.testing.assert_close(z_ours, z_theirs, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ours(x), theirs(x), rtol=RTOL, atol=ATOL)


def test_expected_average_norm_scaling_is_folded(tmp_path, sae_lens):
    """A folder trained on s*x (unfolded) reconstructs raw x as sae_lens(s*x)/s."""
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    theirs = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32,
                                           normalize_activations="expected_average_only_in"))
    _fill_random(theirs, seed=3)
    theirs.save_model(tmp_path)
    with pytest.raises(DarkMatterError, match="norm_scaling_factor"):
        load_sae(tmp_path)

    s = 0.37
    x = torch.randn(50, 16) * 5
    with torch.no_grad():
        expected = theirs(x * s) / s
        torch.testing.assert_close(load_sae(tmp_path, norm_scaling_factor=s)(x), expected)
        (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
        torch.testing.assert_close(load_sae(tmp_path)(x), expected)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(DarkMatterError, match=r"missing cfg\.json, sae_weights\.safetensors"):
        load_sae(tmp_path)
    save_sae(_random_topk(), tmp_path, metadata={})
    cfg = load_sae_config(tmp_path)

    def write(**changes):
        (tmp_path / "cfg.json").write_text(json.dumps({**cfg, **changes}))

    write(architecture="gated")
    with pytest.raises(DarkMatterError, match="'gated' is not supported"):
        load_sae(tmp_path)
    write(normalize_activations="layer_norm")
    with pytest.raises(DarkMatterError, match="normalize_activations='layer_norm'"):
        load_sae(tmp_path)
    write(d_in=47)
    with pytest.raises(ShapeMismatchError, match=r"W_\w+ has shape .* implies"):
        load_sae(tmp_path)
    write(architecture="jumprelu")
    with pytest.raises(DarkMatterError, match=r"missing \['threshold'\]"):
        load_sae(tmp_path)


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
