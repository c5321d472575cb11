"""Transcoders: the class, and open_transcoder on folders written by sae_lens and sparsify
themselves (and SAELens's registry, offline), each output checked against that library's own
forward on the same inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import cached_hub_repo
from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes import JumpReLUSAE, ReLUSAE, TopKSAE, save_sae
from sae_darkmatter.saes import topk as topk_module
from sae_darkmatter.saes.formats import open_sae
from sae_darkmatter.saes.transcoder import Transcoder
from sae_darkmatter.saes.transcoder_formats import open_transcoder

RTOL = ATOL = 1e-5  # float32, same maths up to summation order (see test_sae_formats.py)
D_IN, D_SAE, D_OUT = 24, 64, 16  # d_out != d_in: a transposed W_dec or W_skip cannot fit


def _x(n: int = 300, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


# --------------------------------------------------------------------------- the class


def test_transcoder_parts_add_up():
    gen = torch.Generator().manual_seed(0)
    sparse = TopKSAE(D_IN, D_SAE, 5, d_out=D_OUT, apply_b_dec_to_input=False, generator=gen)
    w_skip = torch.randn(D_OUT, D_IN, generator=gen)
    tc = Transcoder(sparse, w_skip)
    x = _x(7)
    z = tc.encode(x)
    assert (tc.d_in, tc.d_out, tc.d_sae, tc.has_skip) == (D_IN, D_OUT, D_SAE, True)
    assert z.shape == (7, D_SAE) and ((z != 0).sum(1) <= 5).all()
    torch.testing.assert_close(tc.skip(x), x @ w_skip.T)
    torch.testing.assert_close(tc(x), z @ sparse.W_dec + sparse.b_dec + x @ w_skip.T)
    plain = Transcoder(sparse)
    assert not plain.has_skip and torch.equal(plain.skip(x), torch.zeros(7, D_OUT))
    assert torch.equal(plain(x), sparse(x))
    with pytest.raises(ValueError, match=r"W_skip must be \[d_out, d_in\] = \[16, 24\]"):
        Transcoder(sparse, w_skip.T)
    with pytest.raises(ValueError, match="apply_b_dec_to_input .* needs d_out == d_in"):
        ReLUSAE(D_IN, D_SAE, d_out=D_OUT)


def test_wide_inputs_are_split_into_blocks_of_the_output_width(monkeypatch):
    """forward splits inputs into latent_rows blocks; the pieces are d_out wide."""
    sparse = JumpReLUSAE(D_IN, D_SAE, d_out=D_OUT, apply_b_dec_to_input=False,
                         generator=torch.Generator().manual_seed(1))
    x = _x(50)
    whole = sparse(x)
    monkeypatch.setattr(topk_module, "LATENT_BLOCK", 8 * D_SAE)  # 8 rows at a time
    assert whole.shape == (50, D_OUT)
    torch.testing.assert_close(sparse(x), whole, rtol=RTOL, atol=ATOL)  # blocks: other roundings


# --------------------------------------------------------------------------- SAELens folders

# architecture -> (our sparse class, skip)
SAELENS = {
    "transcoder": (ReLUSAE, False),
    "skip_transcoder": (ReLUSAE, True),
    "jumprelu_transcoder": (JumpReLUSAE, False),
    "jumprelu_skip_transcoder": (JumpReLUSAE, True),
}


def _saelens_transcoder(arch: str, seed: int, hook_in: str = "blocks.4.mlp.hook_in", **cfg):
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = get_sae_class(arch)
    meta = SAEMetadata(model_name="gpt2-small", hook_name=hook_in,
                       hook_name_out="blocks.4.hook_mlp_out")
    theirs = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False,
                         metadata=meta, **cfg))
    _randomize(theirs, seed)
    return theirs


@pytest.mark.parametrize("arch", sorted(SAELENS))
def test_saelens_transcoder_folder_matches_sae_lens(tmp_path, sae_lens, arch):
    theirs = _saelens_transcoder(arch, seed=2)
    theirs.save_model(tmp_path)
    loaded = open_transcoder(tmp_path)
    tc = loaded.transcoder
    sparse_cls, skip = SAELENS[arch]
    assert type(tc.sparse) is sparse_cls and tc.has_skip is skip
    assert not tc.sparse.apply_b_dec_to_input
    from_disk = sae_lens.SAE.load_from_disk(tmp_path)  # what sae_lens itself reads back
    x = _x()
    with torch.no_grad():
        z = tc.encode(x)
        assert 0.02 < (z > 0).float().mean() < 0.98  # neither dead nor dense
        torch.testing.assert_close(z, theirs.encode(x), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(tc.decode(z), theirs.decode(z), rtol=RTOL, atol=ATOL)
        want_skip = x @ theirs.W_skip.T if skip else torch.zeros(len(x), D_OUT)
        torch.testing.assert_close(tc.skip(x), want_skip, rtol=RTOL, atol=ATOL)
        for reference in (theirs, from_disk):
            torch.testing.assert_close(tc(x), reference(x), rtol=RTOL, atol=ATOL)
    prov = loaded.provenance
    assert (loaded.hook_in, loaded.hook_out) == ("mlp_in.4", "mlp_out.4")
    assert (prov["original_hook_name"], prov["original_hook_name_out"]) == (
        "blocks.4.mlp.hook_in", "blocks.4.hook_mlp_out")
    assert (prov["library"], prov["architecture"], prov["loaded_as"]) == ("sae_lens", arch, arch)
    assert (prov["d_in"], prov["d_out"], prov["d_sae"], prov["skip"], prov["k"]) == (
        D_IN, D_OUT, D_SAE, skip, None)
    assert (prov["model"], prov["dtype"], prov["notes"]) == ("gpt2", "float32", [])


def test_open_sae_refuses_a_transcoder_with_a_pointer(tmp_path, sae_lens):
    _saelens_transcoder("skip_transcoder", seed=3).save_model(tmp_path)
    with pytest.raises(DarkMatterError, match="a SAELens skip_transcoder, not an SAE.*"
                                              "open_transcoder"):
        open_sae(tmp_path)


def test_saelens_hook_mlp_in_is_read_as_the_mlp_input_with_a_note(tmp_path, sae_lens):
    _saelens_transcoder("jumprelu_transcoder", seed=4, hook_in="blocks.4.hook_mlp_in").save_model(
        tmp_path)
    loaded = open_transcoder(tmp_path)
    assert loaded.hook_in == "mlp_in.4"
    assert "HookedTransformer" in loaded.provenance["notes"][0]


@pytest.mark.parametrize(("edit", "error", "message"), [
    ({"normalize_activations": "layer_norm"}, DarkMatterError,
     "normalize_activations='layer_norm'.*without restoring its output"),
    ({"normalize_activations": "expected_average_only_in"}, DarkMatterError,
     "records no scaling factor"),
    ({"apply_b_dec_to_input": True}, DarkMatterError, "b_dec is an output bias"),
    ({"d_out": None}, DarkMatterError, "needs d_out"),
    ({"d_out": D_IN}, ShapeMismatchError, r"W_dec has shape \(64, 16\).*d_out=24\) implies"),
])
def test_saelens_transcoder_settings_we_cannot_reproduce_are_refused(
        tmp_path, sae_lens, edit, error, message):
    _saelens_transcoder("skip_transcoder", seed=5).save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg.update({k: v for k, v in edit.items() if v is not None})
    for key in (k for k, v in edit.items() if v is None):
        del cfg[key]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(error, match=message):
        open_transcoder(tmp_path)


def test_saelens_skip_weights_are_checked(tmp_path, sae_lens):
    _saelens_transcoder("skip_transcoder", seed=6).save_model(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    state = load_file(weights)
    save_file({**state, "W_skip": state["W_skip"].T.contiguous()}, weights)
    with pytest.raises(ShapeMismatchError,
                       match=r"W_skip has shape \(24, 16\).* implies \(16, 24\)"):
        open_transcoder(tmp_path)
    del state["W_skip"]
    save_file(state, weights)
    with pytest.raises(DarkMatterError, match=r"'skip_transcoder': missing \['W_skip'\]"):
        open_transcoder(tmp_path)


def test_an_sae_opens_as_the_transcoder_from_its_hook_to_itself(tmp_path):
    sae = JumpReLUSAE(D_IN, D_SAE, generator=torch.Generator().manual_seed(7))
    save_sae(sae, tmp_path / "mine", metadata={"model_name": "smollm2", "hook_name": "mlp_in.5"})
    loaded = open_transcoder(tmp_path / "mine")
    assert (loaded.hook_in, loaded.hook_out) == ("mlp_in.5", "mlp_in.5")
    assert loaded.provenance["loaded_as"] == "jumprelu" and not loaded.transcoder.has_skip
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded.transcoder(x), sae(x))


# --------------------------------------------------------------------------- SAELens registry


def test_registry_transcoder_offline(sae_lens, hub_cache):
    theirs = _saelens_transcoder("jumprelu_skip_transcoder", seed=8)
    theirs.save_model(cached_hub_repo(hub_cache, "acme/transcoders") / "layer_4")
    loaded = open_transcoder("saelens:acme/transcoders/layer_4")
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(loaded.transcoder(x), theirs(x), rtol=RTOL, atol=ATOL)
    prov = loaded.provenance
    assert (loaded.hook_in, loaded.hook_out, prov["skip"]) == ("mlp_in.4", "mlp_out.4", True)
    assert prov["source"] == "saelens:acme/transcoders/layer_4"
    assert prov["loaded_as"] == "jumprelu_skip_transcoder" and prov["d_out"] == D_OUT
    with pytest.raises(DarkMatterError, match="open_transcoder"):
        open_sae("saelens:acme/transcoders/layer_4")


# --------------------------------------------------------------------------- sparsify folders


def _sparsify_coder(sparsify, seed: int, **cfg):
    d = D_IN  # sparsify's transcoders and skip connections keep the input width
    coder = sparsify.SparseCoder(d, sparsify.SparseCoderConfig(num_latents=D_SAE, k=6, **cfg))
    _randomize(coder, seed)
    return coder


@pytest.mark.parametrize(("transcode", "skip"), [(True, False), (True, True), (False, True)])
def test_sparsify_folder_matches_sparsify(tmp_path, sparsify, transcode, skip):
    coder = _sparsify_coder(sparsify, seed=9, transcode=transcode, skip_connection=skip)
    coder.save_to_disk(tmp_path / "layers.3.mlp")
    loaded = open_transcoder(tmp_path / "layers.3.mlp")
    tc = loaded.transcoder
    assert isinstance(tc.sparse, TopKSAE) and tc.sparse.k == 6 and tc.has_skip is skip
    assert tc.sparse.apply_b_dec_to_input is not transcode  # sparsify: x - b_dec unless transcoding
    x = _x()
    with torch.no_grad():
        out = coder(x)
        dense = torch.zeros(len(x), D_SAE).scatter_(1, out.latent_indices, out.latent_acts)
        z = tc.encode(x)
        torch.testing.assert_close(z, dense, rtol=RTOL, atol=ATOL)
        sparse_part = coder.decode(out.latent_acts, out.latent_indices)
        torch.testing.assert_close(tc.decode(z), sparse_part, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(tc.skip(x), out.sae_out - sparse_part, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(tc(x), out.sae_out, rtol=RTOL, atol=ATOL)
    prov = loaded.provenance
    hooks = ("mlp_in.3", "mlp_out.3") if transcode else ("mlp_out.3", "mlp_out.3")
    assert (loaded.hook_in, loaded.hook_out) == hooks
    assert prov["original_hook_name"] == prov["original_hook_name_out"] == "layers.3.mlp"
    assert prov["loaded_as"] == ("topk_skip_transcoder" if skip else "topk_transcoder")
    assert (prov["library"], prov["skip"], prov["d_out"]) == ("sparsify", skip, D_IN)
    assert len(prov["notes"]) == 1 and "sandwich" in prov["notes"][0]  # the raw MLP output
    what = "transcoder" if transcode else "skip connection"
    with pytest.raises(DarkMatterError, match=f"a sparsify {what}.*open_transcoder"):
        open_sae(tmp_path / "layers.3.mlp")


def test_sparsify_sae_opens_as_a_transcoder_to_itself(tmp_path, sparsify):
    coder = _sparsify_coder(sparsify, seed=10)
    coder.save_to_disk(tmp_path / "layers.2")
    loaded = open_transcoder(tmp_path / "layers.2")
    assert (loaded.hook_in, loaded.hook_out, loaded.provenance["loaded_as"]) == (
        "resid_post.2", "resid_post.2", "topk")
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(loaded.transcoder(x), coder(x).sae_out, rtol=RTOL, atol=ATOL)
    with pytest.raises(DarkMatterError, match="applies only to SAELens SAEs"):
        open_transcoder(tmp_path / "layers.2", norm_scaling_factor=2.0)


def test_gemma_scope_2_affine_transcoder_offline(hub_cache, monkeypatch, sae_lens):
    """A Gemma Scope 2 skip ("affine") transcoder in its Hub layout (``params.safetensors``
    with ``affine_skip_connection`` stored ``[d_in, d_out]``), through the registry's
    ``gemma_3`` conversion; checked against sae_lens and the documented maths in plain torch:
    ``y = jumprelu(x @ w_enc + b_enc) @ w_dec + b_dec + x @ affine_skip_connection``."""
    from huggingface_hub import hf_hub_download
    from sae_lens.loading import pretrained_sae_loaders
    from safetensors import safe_open

    sae_id = "transcoder/layer_9_width_16k_l0_small_affine"
    d, gen = 48, torch.Generator().manual_seed(11)
    p = {"w_enc": torch.randn(d, D_SAE, generator=gen) * 0.2,
         "w_dec": torch.randn(D_SAE, d, generator=gen) * 0.2,
         "b_enc": torch.randn(D_SAE, generator=gen) * 0.1,
         "b_dec": torch.randn(d, generator=gen) * 0.1,
         "threshold": torch.rand(D_SAE, generator=gen) * 0.5,
         "affine_skip_connection": torch.randn(d, d, generator=gen) * 0.2}
    folder = cached_hub_repo(hub_cache, "google/gemma-scope-2-270m-pt") / sae_id
    folder.mkdir(parents=True)
    save_file(p, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "affine_connection": True}))
    loaded = open_transcoder(f"saelens:gemma-scope-2-270m-pt-transcoders/{sae_id}")

    def shapes_from_cache(repo_id, filename):
        with safe_open(hf_hub_download(repo_id, filename), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    monkeypatch.setattr(pretrained_sae_loaders, "get_safetensors_tensor_shapes", shapes_from_cache)
    theirs = sae_lens.SAE.from_pretrained("gemma-scope-2-270m-pt-transcoders", sae_id)
    x = torch.randn(300, d, generator=gen) * 2
    pre = x @ p["w_enc"] + p["b_enc"]
    documented = ((pre * (pre > p["threshold"])) @ p["w_dec"] + p["b_dec"]
                  + x @ p["affine_skip_connection"])
    with torch.no_grad():
        assert 0.02 < (loaded.transcoder.encode(x) > 0).float().mean() < 0.98
        for reference in (theirs(x), documented):
            torch.testing.assert_close(loaded.transcoder(x), reference, rtol=RTOL, atol=ATOL)
    prov = loaded.provenance
    assert (prov["architecture"], prov["loaded_as"], prov["model"]) == (
        "jumprelu_skip_transcoder", "jumprelu_skip_transcoder", "google/gemma-3-270m")
    assert (loaded.hook_in, loaded.hook_out) == ("mlp_in.9", "mlp_out.9")
    assert (prov["original_hook_name"], prov["original_hook_name_out"]) == (
        "blocks.9.hook_mlp_in", "blocks.9.hook_mlp_out")
