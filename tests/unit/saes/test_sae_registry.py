"""SAELens registry specs: parsing against the real registry, name translation, offline errors,
and a real offline load from a Hugging Face cache laid out on disk (no mocks of sae_lens/hub)."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from helpers import cached_hub_repo
from sae_darkmatter.errors import (
    CorruptSAEError,
    DarkMatterError,
    ModelNotAvailableError,
)
from sae_darkmatter.saes import GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE
from sae_darkmatter.saes.formats import open_sae
from sae_darkmatter.saes.hooks import translate_hook, translate_module_input
from sae_darkmatter.saes.registry import hf_model_id, parse_spec

RTOL = ATOL = 1e-5  # float32, same ops up to summation order (see test_sae_formats.py)


def _random_sae_lens(sae_lens, arch: str, seed: int, **cfg):
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = get_sae_class(arch)
    meta = SAEMetadata(model_name="gpt2-small", hook_name="blocks.3.hook_resid_pre")
    sae = cls(cfg_cls(d_in=16, d_sae=48, metadata=meta, **cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return sae


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("tl", "ours", "noted"),
    [
        ("blocks.7.hook_resid_post", "resid_post.7", False),
        ("blocks.7.hook_mlp_out", "mlp_out.7", False),
        ("blocks.7.hook_attn_out", "attn_out.7", False),
        ("blocks.7.hook_resid_pre", "resid_post.6", True),
        ("blocks.0.hook_resid_pre", None, True),
        ("blocks.7.attn.hook_z", None, True),
        ("blocks.7.hook_resid_mid", None, True),
        (
            "model.layers.7",
            "resid_post.7",
            False,
        ),  # Hugging Face module paths (HookedProxyLM, sparsify)
        (
            "model.layers.7.mlp",
            "mlp_out.7",
            True,
        ),  # noted: sandwich-norm models read after the norm
        ("gpt_neox.layers.2.attention", "attn_out.2", True),
        ("resid_post.3", "resid_post.3", False),  # ours pass through
        ("mlp_in.3", "mlp_in.3", False),
        # transcoder inputs and outputs
        ("blocks.7.mlp.hook_in", "mlp_in.7", False),
        ("blocks.7.hook_mlp_in", "mlp_in.7", True),  # HookedTransformer: the residual before ln2
        ("blocks.7.mlp.hook_out", "mlp_out.7", True),  # raw: before a sandwich post-norm
        ("blocks.7.ln2.hook_normalized", None, True),  # before the norm's weight
        (None, None, False),
    ],
)
def test_translate_hook(tl, ours, noted):
    hook, note = translate_hook(tl)
    assert hook == ours and (note is not None) is noted


@pytest.mark.parametrize(
    ("path", "ours", "noted"),
    [
        ("layers.7.mlp", "mlp_in.7", False),  # sparsify's transcoder hookpoints
        ("model.layers.7.mlp", "mlp_in.7", False),
        ("h.7.mlp", "mlp_in.7", False),
        ("layers.7", "resid_post.6", True),
        ("layers.0", None, True),  # the embeddings
        ("layers.7.self_attn", None, True),  # after the pre-attention norm: not a hook of ours
        ("embed_tokens", None, True),
    ],
)
def test_translate_module_input(path, ours, noted):
    hook, note = translate_module_input(path)
    assert hook == ours and (note is not None) is noted


def test_hf_model_id():
    assert hf_model_id("gpt2-small") == "gpt2"
    assert hf_model_id("gemma-2-2b") == "google/gemma-2-2b"
    assert hf_model_id("gemma-3-270m") == "google/gemma-3-270m"  # Gemma Scope 2's model
    assert hf_model_id("org/some-model") == "org/some-model"
    assert hf_model_id("no-such-model-xyz") is None and hf_model_id(None) is None


# --------------------------------------------------------------------------- specs


def test_parse_spec_longest_known_release(sae_lens):
    assert parse_spec("saelens:gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82") == (
        "gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")
    assert parse_spec("gpt2-small-res-jb/blocks.4.hook_resid_pre") == (
        "gpt2-small-res-jb", "blocks.4.hook_resid_pre")
    assert parse_spec("saelens:acme/tiny/layer_3/res") == ("acme/tiny", "layer_3/res")


def test_unknown_names_suggest_close_matches(sae_lens):
    with pytest.raises(
        DarkMatterError, match=r"names no SAELens release; close matches: \['gpt2-small-res-jb'"
    ):
        parse_spec("saelens:gpt2-small-res-jbb/blocks.4.hook_resid_pre")
    with pytest.raises(
        DarkMatterError,
        match=r"has no SAE 'blocks.4.hook_resid_prex'; close matches: \['blocks.4.hook_resid_pre'",
    ):
        parse_spec("saelens:gpt2-small-res-jb/blocks.4.hook_resid_prex")


def test_missing_sae_lens_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # what `import` sees when not installed
    with pytest.raises(ModelNotAvailableError, match=r"pip install sae-darkmatter\[saelens\]"):
        open_sae("saelens:gpt2-small-res-jb/blocks.4.hook_resid_pre")


def test_offline_not_cached_fails_fast(sae_lens, hub_cache):
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as err:
        open_sae("saelens:gpt2-small-res-jb/blocks.4.hook_resid_pre")
    assert time.monotonic() - start < 5  # no retries (~25 s when online without a network)
    message = str(err.value)
    assert "gpt2-small-res-jb/blocks.4.hook_resid_pre" in message
    assert "not in the local Hugging Face cache" in message and str(hub_cache) in message


# --------------------------------------------------------------------------- offline loads


@pytest.mark.parametrize(("arch", "cfg", "ours"), [
    ("jumprelu", {"apply_b_dec_to_input": False}, JumpReLUSAE),
    ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}, TopKSAE),
    ("standard", {}, ReLUSAE),
    ("gated", {}, GatedSAE),
])
def test_offline_load_from_hub_cache(sae_lens, hub_cache, arch, cfg, ours):
    theirs = _random_sae_lens(sae_lens, arch, seed=len(arch), **cfg)
    theirs.save_model(cached_hub_repo(hub_cache, "acme/tiny-saes") / "layer_3" / "res")

    loaded = open_sae("saelens:acme/tiny-saes/layer_3/res")
    via_sae_lens = sae_lens.SAE.from_pretrained("acme/tiny-saes", "layer_3/res")
    assert type(loaded.sae) is ours
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        z = loaded.sae.encode(x)
        assert 0.02 < (z > 0).float().mean() < 0.98
        for reference in (theirs, via_sae_lens):
            torch.testing.assert_close(loaded.sae(x), reference(x), rtol=RTOL, atol=ATOL)
    prov = loaded.provenance
    assert (prov["library"], prov["source"], prov["repo_id"], prov["repo_path"]) == (
        "sae_lens", "saelens:acme/tiny-saes/layer_3/res", "acme/tiny-saes", "layer_3/res")
    assert (prov["architecture"], prov["dtype"], prov["d_in"], prov["d_sae"]) == (
        arch, "float32", 16, 48)
    assert prov["k"] == cfg.get("k")
    assert (prov["model_name"], prov["model"]) == ("gpt2-small", "gpt2")
    assert (prov["hook_name"], prov["original_hook_name"]) == ("resid_post.2",
                                                                "blocks.3.hook_resid_pre")


@pytest.mark.filterwarnings("ignore:norm_scaling_factor not found:UserWarning")
def test_offline_norm_scaling_factor_passes_through(sae_lens, hub_cache):
    """Outside the registry SAELens knows no factor: ours asks for it, then folds it."""
    theirs = _random_sae_lens(sae_lens, "standard", seed=9,
                              normalize_activations="expected_average_only_in")
    theirs.save_model(cached_hub_repo(hub_cache, "acme/scaled") / "sae")
    with pytest.raises(DarkMatterError, match="needs the activation scaling factor"):
        open_sae("saelens:acme/scaled/sae")
    s = 0.25
    loaded = open_sae("saelens:acme/scaled/sae", norm_scaling_factor=s)
    x = torch.randn(50, 16) * 4
    with torch.no_grad():
        torch.testing.assert_close(loaded.sae(x), theirs(x * s) / s, rtol=RTOL, atol=ATOL)


def test_damaged_hub_cache_file_names_the_sae(sae_lens, hub_cache):
    theirs = _random_sae_lens(sae_lens, "standard", seed=5)
    folder = cached_hub_repo(hub_cache, "acme/broken-saes") / "layer_1"
    theirs.save_model(folder)
    weights = folder / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CorruptSAEError, match=r"acme/broken-saes/layer_1: its cached weights file is damaged"
    ):
        open_sae("saelens:acme/broken-saes/layer_1")
