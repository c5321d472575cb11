"""Matryoshka BatchTopK training: the loss adds each inner prefix's error (checked against a
dense numpy reference), the trained prefixes reconstruct on their own where a plain BatchTopK
SAE's do not, and the saved folder records its widths for sae_lens and ``--prefixes auto``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae_darkmatter.config import SAETrainConfig
from sae_darkmatter.errors import ConfigError
from sae_darkmatter.saes.archs.base import total_variance
from sae_darkmatter.saes.archs.batchtopk import BatchTopKTrainer
from sae_darkmatter.saes.archs.matryoshka import MatryoshkaTrainer, prefix_widths
from sae_darkmatter.saes.formats import open_sae
from sae_darkmatter.saes.train import train_grid

D, N_FEATURES = 24, 64


def _zipf_data(n: int = 8000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse sums of 64 random unit directions, feature i firing with probability ~ 1/(i+1)
    (a few frequent features, many rare ones: what Matryoshka prefixes should pick up), and
    the part of them that the 8 most frequent features make."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(N_FEATURES, D, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    p = (1.0 / torch.arange(1, N_FEATURES + 1)).clamp(max=0.6)
    codes = (torch.rand(n, N_FEATURES, generator=gen) < p) * (1 + torch.rand(n, N_FEATURES,
                                                                              generator=gen))
    return codes @ dirs, codes[:, :8] @ dirs[:8]


def test_the_loss_adds_every_inner_prefix_error():
    x, _ = _zipf_data(512)
    tr = MatryoshkaTrainer(D, 32, 4, b_dec=x.mean(0), seed=1, prefixes=(4, 8, 16))
    with torch.no_grad():
        tr.W_enc_t.mul_(3)  # spread the pre-activations so every prefix has latents in use
    fw = tr(x)
    total = total_variance(x)
    dead = torch.zeros(32, dtype=torch.bool)
    with torch.no_grad():
        loss = float(tr.loss(fw, total, dead, 0.5))
        base = float(BatchTopKTrainer.loss(tr, fw, total, dead, 0.5))
    assert fw.codes is not None
    z = np.zeros((x.shape[0], 32))  # the selected latents, dense
    z[fw.codes.rows.numpy(), fw.codes.cols.numpy()] = fw.values.detach().numpy()
    w, b, xs = tr.W_dec.detach().double().numpy(), tr.b_dec.detach().double().numpy(), x.double()
    inner = sum(float(((xs.numpy() - (z[:, :m] @ w[:m] + b)) ** 2).sum()) for m in (4, 8, 16))
    assert all((fw.codes.cols < m).any() for m in (4, 8, 16))
    assert loss == pytest.approx(base + inner / float(total), rel=1e-5)


def _prefix_fvu(folder, x: torch.Tensor, m: int) -> float:
    sae = open_sae(folder).sae
    with torch.no_grad():
        z = sae.encode(x)
        z[:, m:] = 0
        err = (x - sae.decode(z)).double()
    return float(err.pow(2).sum() / (x - x.mean(0)).double().pow(2).sum())


def test_trained_prefixes_reconstruct_on_their_own(tmp_path, sae_lens):
    x, frequent = _zipf_data()
    common = {"widths": (64,), "ks": (4,), "train_tokens": 48_000, "batch_size": 256,
              "device": "cpu", "matryoshka_fractions": (0.125, 0.25, 0.5)}
    meta = {"model_name": "synthetic", "hook_name": "resid_post.0"}
    [plain] = train_grid(x, SAETrainConfig(architecture="batchtopk", **common), tmp_path,
                         metadata=meta, progress=False)
    [nested] = train_grid(x, SAETrainConfig(architecture="matryoshka_batchtopk", **common),
                          tmp_path, metadata=meta, progress=False)
    assert nested.name == "matryoshka_batchtopk-w64-k4"
    # every prefix of the Matryoshka SAE reconstructs better than the same number of a plain
    # SAE's latents (in its initialisation's order), the first 8 even better than the 8 most
    # frequent true features with their true values; the whole SAE pays a little for it
    # (measured: 0.50 / 0.64 / 0.61 at 8 latents; 0.134 vs 0.116 at all 64)
    nested_fvu = {m: _prefix_fvu(nested, x, m) for m in (8, 16, 32, 64)}
    plain_fvu = {m: _prefix_fvu(plain, x, m) for m in (8, 16, 32, 64)}
    frequent_fvu = float((x - frequent).double().pow(2).sum()
                         / (x - x.mean(0)).double().pow(2).sum())
    assert nested_fvu[8] < min(plain_fvu[8], frequent_fvu) - 0.1, (nested_fvu, plain_fvu)
    assert all(nested_fvu[m] < plain_fvu[m] for m in (16, 32)), (nested_fvu, plain_fvu)
    assert nested_fvu[64] < plain_fvu[64] + 0.05
    # the widths are where SAELens keeps them; sae_lens loads the JumpReLU SAE as saved
    cfg = json.loads((nested / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    widths = cfg["metadata"]["training_architecture_details"]["matryoshka_widths"]
    assert widths == [8, 16, 32, 64] == open_sae(nested).provenance["matryoshka_widths"]
    assert json.loads((nested / "training.json").read_text())["matryoshka_widths"] == widths
    with torch.no_grad():
        torch.testing.assert_close(sae_lens.SAE.load_from_disk(str(nested))(x),
                                   open_sae(nested).sae(x), rtol=1e-5, atol=1e-5)


def test_prefix_widths_and_bad_fractions():
    assert prefix_widths(64, (0.0625, 0.125, 0.25, 0.5)) == (4, 8, 16, 32)
    assert prefix_widths(8, (0.01, 0.1, 0.99)) == (1, 7)  # kept within 1..width-1, distinct
    for bad in ((), (0.5, 0.25), (0.25, 1.0), (0.0, 0.5)):
        with pytest.raises(ConfigError, match="train.matryoshka_fractions must be strictly"):
            SAETrainConfig(architecture="matryoshka_batchtopk", matryoshka_fractions=bad)
