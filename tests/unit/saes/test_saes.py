"""SAE package: TopK math, SAELens-format I/O (checked against sae_lens itself), training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import SRC
from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes import (
    SAE,
    GatedSAE,
    JumpReLUSAE,
    ReLUSAE,
    TopKSAE,
    load_sae,
    load_sae_config,
    save_sae,
)
from sae_darkmatter.saes.latents import encode_decode

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


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_encode_decode_equals_the_dense_path(kind):
    """``encode_decode`` (sparse for TopK) gives the dense path's x̂, L0 and fired latents."""
    sae = _random_topk() if kind == "topk" else ReLUSAE(48, 192)
    if kind == "topk":
        with torch.no_grad():  # some selected pre-activations negative: ReLU zeroes them
            sae.b_enc.sub_(1.8)
    x = torch.randn(100, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = sae.encode(x)
        x_hat, latents = encode_decode(sae, x)
    torch.testing.assert_close(x_hat, sae.decode(z), rtol=RTOL, atol=ATOL)
    assert (latents.indices is None) == (kind != "topk")
    assert torch.equal(latents.l0(), (z != 0).sum(1))
    assert torch.equal(latents.fired(), (z != 0).any(0))
    assert 0 < int(latents.l0().min()) and (kind != "topk" or int(latents.l0().min()) < sae.k)


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


_OURS = {"topk": TopKSAE, "standard": ReLUSAE, "jumprelu": JumpReLUSAE, "gated": GatedSAE}


def _random_affine(arch: str, seed: int = 0, **kw) -> TopKSAE | ReLUSAE | JumpReLUSAE | GatedSAE:
    """One of our SAEs with nonzero biases (and thresholds that zero some latents)."""
    if arch == "topk":
        return _random_topk(seed=seed, **kw)
    gen = torch.Generator().manual_seed(seed)
    sae = _OURS[arch](48, 192, generator=gen, **kw)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(192, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(48, generator=gen))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(192, generator=gen) * 2)
        if arch == "gated":
            sae.r_mag.copy_(torch.randn(192, generator=gen) * 0.5)
            sae.b_mag.copy_(torch.randn(192, generator=gen) * 0.5)
    return sae


@pytest.mark.parametrize("arch", list(_OURS))
def test_saved_folder_loads_in_sae_lens(tmp_path, sae_lens, arch):
    from sae_lens.registry import get_sae_class

    sae = _random_affine(arch)
    meta = {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post", "context_size": 16}
    save_sae(sae, tmp_path / "sae", metadata=meta)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg_cls = get_sae_class(arch)[1]
    assert cfg_cls.from_dict(cfg).to_dict() == cfg  # SAELens reads and writes it unchanged
    assert list(cfg) == list(cfg_cls(d_in=2, d_sae=2, **({"k": 1} if arch == "topk" else {}))
                             .to_dict())  # the keys SAELens writes, in its order
    assert cfg["metadata"]["hook_name"] == meta["hook_name"]

    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert type(theirs) is get_sae_class(arch)[0]
    for name, tensor in theirs.state_dict().items():  # every tensor, the threshold included
        assert torch.equal(tensor, sae.state_dict()["b_enc" if name == "b_gate" else name]), name
    x = torch.randn(200, 48) * 3
    with torch.no_grad():
        z = sae.encode(x)
        assert 0 < (z != 0).float().mean() < 1  # some latents on, some off
        # same ops in the same order up to the decode: latents agree bit for bit
        assert torch.equal(theirs.encode(x), z)
        torch.testing.assert_close(sae(x), theirs(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("arch", list(_OURS))
def test_round_trip_is_bit_exact(tmp_path, arch):
    for apply_b_dec in (True, False):
        sae = _random_affine(arch, apply_b_dec_to_input=apply_b_dec)
        save_sae(sae, tmp_path / f"s{apply_b_dec}", metadata={})
        (tmp_path / "plain").mkdir(exist_ok=True)  # the folder gets the usual (umask) mode
        assert (tmp_path / f"s{apply_b_dec}").stat().st_mode == (tmp_path / "plain").stat().st_mode
        back = load_sae(tmp_path / f"s{apply_b_dec}")
        assert type(back) is type(sae)
        assert getattr(back, "k", None) == getattr(sae, "k", None)
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
        "cfg.json", "checksums.json", "sae_weights.safetensors", "training.json"]


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
        ("gated", {}),
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
    assert type(ours) is _OURS[arch]
    assert (ours.d_in, ours.d_sae) == (24, 64)
    x = torch.randn(300, 24) * 2
    with torch.no_grad():
        z_ours, z_theirs = ours.encode(x), theirs.encode(x)
        assert (z_theirs != 0).any(dim=1).float().mean() > 0.5  # a meaningful comparison
        torch.testing.assert_close(z_ours, z_theirs, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ours(x), theirs(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("rescale", [False, True])
def test_batchtopk_saved_for_inference_loads_as_jumprelu(tmp_path, sae_lens, rescale):
    """SAELens saves a trained BatchTopK SAE as JumpReLU with its global threshold per latent."""
    from sae_lens.saes.batchtopk_sae import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
    )

    trained = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        d_in=24, d_sae=64, k=8, rescale_acts_by_decoder_norm=rescale))
    _fill_random(trained, seed=5)
    trained.topk_threshold.fill_(0.4)
    trained.save_inference_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"

    ours, theirs = load_sae(tmp_path), sae_lens.SAE.load_from_disk(tmp_path)
    assert isinstance(ours, JumpReLUSAE)
    x = torch.randn(300, 24) * 2
    with torch.no_grad():
        z = ours.encode(x)
        assert 0 < (z != 0).float().mean() < 0.9  # the threshold does cut
        torch.testing.assert_close(z, theirs.encode(x), rtol=RTOL, atol=ATOL)
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

    write(architecture="skip_transcoder")
    with pytest.raises(DarkMatterError, match="a SAELens skip_transcoder, not an SAE: .*"
                                              "open_transcoder"):
        load_sae(tmp_path)
    write(architecture="clt")
    with pytest.raises(DarkMatterError, match="'clt' is not supported"):
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


def test_save_rejects_unknown_class(tmp_path):
    from sae_darkmatter.saes import AffineSAE

    with pytest.raises(DarkMatterError, match="cannot save a AffineSAE"):
        save_sae(AffineSAE(4, 8), tmp_path / "x", metadata={})
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", list(_OURS))
def test_forward_splits_rows_by_width_with_the_same_reconstruction(arch, monkeypatch):
    """``forward`` encodes at most ``latent_rows(d_sae)`` rows at a time (a 1M-wide SAE: 64),
    so its memory does not grow with rows x width; inputs of any leading shape keep it."""
    from sae_darkmatter.saes import topk

    sae = _random_affine(arch, seed=3)
    x = torch.randn(5, 200, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = sae.reconstruct(x.reshape(-1, 48))
        monkeypatch.setattr(topk, "LATENT_BLOCK", 192 * 37)  # 37 rows per block
        assert topk.latent_rows(192) == 37 and topk.latent_rows(1 << 20) == 1
        blocked = sae(x)
    assert blocked.shape == x.shape
    torch.testing.assert_close(blocked.reshape(-1, 48), whole, rtol=1e-6, atol=1e-6)


def test_loading_saes_does_not_import_the_trainer():
    """``from sae_darkmatter.saes import SAE`` stays light; training names come on first use."""
    import os
    import subprocess
    import sys

    code = ("import sys; from sae_darkmatter.saes import SAE, load_sae; "
            "assert 'sae_darkmatter.saes.train' not in sys.modules; "
            "from sae_darkmatter.saes import train_sae; "
            "assert 'sae_darkmatter.saes.train' in sys.modules")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
