"""open_sae on local folders: format detection, provenance, and outputs checked against sparsify
itself, sae_lens itself, and plain-torch references of dictionary_learning's documented forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import PicklePayload, flip_byte
from sae_darkmatter.errors import CorruptSAEError, DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes import GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE, save_sae
from sae_darkmatter.saes.formats import LoadedSAE, detect_format, open_sae

# All comparisons are float32 with |x| ~ 2, weights ~ 0.3: outputs reach ~30 and are sums of
# 24-64 products. Implementations differing only in summation order (matmul vs embedding_bag,
# W_enc*exp(r) vs exp(r)*(x@W_enc)) differ by a few ulps of such sums (measured at most 7.6e-6
# at |out| ~ 30, where one ulp is 1.9e-6); atol + rtol*|out| with 1e-5 allows ~3e-4 there and
# 1e-5 near zero, while any real difference in the maths (a missing bias, a transpose, another
# threshold rule) moves outputs by ~0.1 or more.
RTOL = ATOL = 1e-5
D_IN, D_SAE = 24, 64


def _x(n: int = 400, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def _randn(*shape: int, gen: torch.Generator, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


# --------------------------------------------------------------------------- sparsify


def _sparsify_coder(sparsify, seed: int, enc_shift: float = 0.0, **cfg):
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=6, **cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(_randn(*p.shape, gen=gen))
        coder.encoder.bias.add_(enc_shift)
    return coder


@pytest.mark.parametrize("enc_shift", [0.0, -6.0])
def test_sparsify_folder_matches_sparsify(tmp_path, sparsify, enc_shift):
    """ReLU->topk (sparsify) and topk->ReLU (ours) give the same latents and reconstruction,
    also when fewer than k pre-activations are positive (enc_shift=-6)."""
    coder = _sparsify_coder(sparsify, seed=0, enc_shift=enc_shift)
    coder.save_to_disk(tmp_path / "layers.3")
    # sparsify's CLI writes its run config (RunConfig: model, dataset, ctx_len, ...) here
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model": "EleutherAI/pythia-70m",
                "dataset": "EleutherAI/fineweb-edu-dedup-10b",
                "ctx_len": 2048,
            }
        )
    )

    loaded = open_sae(tmp_path / "layers.3")
    assert isinstance(loaded.sae, TopKSAE) and loaded.sae.k == 6
    x = _x()
    with torch.no_grad():
        out = coder(x)
        dense = torch.zeros(len(x), D_SAE).scatter_(1, out.latent_indices, out.latent_acts)
        n_pos = (dense > 0).sum(1)
        if enc_shift:
            assert (n_pos < 6).float().mean() > 0.5  # the case where the orders differ
        else:
            assert (n_pos == 6).all()
        torch.testing.assert_close(loaded.sae.encode(x), dense, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(loaded.sae(x), out.sae_out, rtol=RTOL, atol=ATOL)
    assert loaded.provenance == {
        "library": "sparsify", "source": str(tmp_path / "layers.3"), "architecture": "topk",
        "loaded_as": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": 6, "dtype": "float32",
        "model_name": "EleutherAI/pythia-70m", "model": "EleutherAI/pythia-70m",
        "hook_name": "resid_post.3", "original_hook_name": "layers.3", "notes": [],
        "trained_with": {"context_size": 2048, "dataset_path": "EleutherAI/fineweb-edu-dedup-10b"},
    }


def test_sparsify_parent_folder_lists_hookpoints(tmp_path, sparsify):
    for name in ("layers.10", "layers.2.mlp"):
        _sparsify_coder(sparsify, seed=1).save_to_disk(tmp_path / name)
    with pytest.raises(DarkMatterError, match=r"holds 2 SAEs.*layers\.2\.mlp, .*layers\.10"):
        open_sae(tmp_path)
    mlp = open_sae(tmp_path / "layers.2.mlp").provenance
    assert mlp["hook_name"] == "mlp_out.2" and "sandwich" in mlp["notes"][0]
    assert mlp["model_name"] is None and mlp["model"] is None  # no run config.json beside


@pytest.mark.parametrize(("cfg", "message"), [
    ({"transcode": True}, "a sparsify transcoder, not a plain SAE: its error is y - y_hat.*"
                          "open_transcoder"),
    ({"skip_connection": True}, "a sparsify skip connection, not a plain SAE"),
    ({"activation": "groupmax"}, "activation='groupmax' is not supported"),
])
def test_sparsify_unsupported_kinds(tmp_path, sparsify, cfg, message):
    _sparsify_coder(sparsify, seed=2, **cfg).save_to_disk(tmp_path / "layers.1")
    with pytest.raises(DarkMatterError, match=message):
        open_sae(tmp_path / "layers.1")


# --------------------------------------------------------------------------- SAELens folders


def test_saelens_folder_provenance(tmp_path, sae_lens):
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = get_sae_class("gated")
    theirs = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(
        model_name="gpt2-small", hook_name="blocks.4.hook_mlp_out")))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(_randn(*p.shape, gen=gen))
    theirs.to(torch.bfloat16).save_model(tmp_path)  # stored as bf16, loaded as float32

    loaded = open_sae(tmp_path / "sae_weights.safetensors")  # a file inside works too
    assert isinstance(loaded.sae, GatedSAE) and loaded.sae.W_enc.dtype == torch.float32
    prov = loaded.provenance
    assert (prov["library"], prov["source"], prov["architecture"], prov["dtype"]) == (
        "sae_lens", str(tmp_path), "gated", "bfloat16")
    assert (prov["model_name"], prov["model"]) == ("gpt2-small", "gpt2")
    assert (prov["hook_name"], prov["original_hook_name"]) == ("mlp_out.4", "blocks.4.hook_mlp_out")
    reference = sae_lens.SAE.load_from_disk(tmp_path, dtype="float32")  # bf16 widens exactly
    x = _x()
    with torch.no_grad():
        assert 0.02 < (loaded.sae.encode(x) > 0).float().mean() < 0.98
        torch.testing.assert_close(loaded.sae(x), reference(x), rtol=RTOL, atol=ATOL)


def test_own_folder_provenance(tmp_path):
    sae = JumpReLUSAE(D_IN, D_SAE, generator=torch.Generator().manual_seed(4))
    save_sae(sae, tmp_path / "mine", metadata={"model_name": "smollm2", "hook_name": "attn_out.5"})
    prov = open_sae(str(tmp_path / "mine")).provenance
    assert prov["library"] == "sae_darkmatter"
    assert (prov["model_name"], prov["model"], prov["hook_name"]) == ("smollm2", "smollm2",
                                                                        "attn_out.5")
    assert (prov["k"], prov["loaded_as"], prov["notes"]) == (None, "jumprelu", [])
    json.dumps(prov)  # the pipeline writes it into result files


def test_norm_factor_only_for_saelens(tmp_path, sparsify):
    _sparsify_coder(sparsify, seed=5).save_to_disk(tmp_path)
    with pytest.raises(DarkMatterError, match="norm_scaling_factor applies only to SAELens"):
        open_sae(tmp_path, norm_scaling_factor=2.0)


def test_unknown_folder_names_formats(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(DarkMatterError) as err:
        open_sae(tmp_path)
    for needed in ("cfg.json + sae_weights.safetensors", "cfg.json + sae.safetensors",
                   "ae.pt + config.json", "weights.bin"):
        assert needed in str(err.value)
    with pytest.raises(DarkMatterError, match="no SAE folder at"):
        open_sae(tmp_path / "missing")
    (tmp_path / "ae.pt").write_bytes(b"")
    with pytest.raises(DarkMatterError, match="ae.pt but no config.json"):
        detect_format(tmp_path)


# --------------------------------------------------------------------------- dictionary_learning
# References follow dictionary_learning's documented forward passes (dictionary.py,
# trainers/top_k.py, trainers/batch_top_k.py, trainers/matryoshka_batch_top_k.py), on
# checkpoints in its layout: torch.save(ae.state_dict()) + config.json {"trainer": {...}}.


def _relu_topk(post: torch.Tensor, k: int) -> torch.Tensor:
    top = post.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(post).scatter_(-1, top.indices, top.values)


def _dl_case(dict_class: str, gen: torch.Generator, threshold: float = 0.5):
    """(state dict in dictionary_learning's names, reference encode, reference decode)."""
    def r(*shape: int) -> torch.Tensor:
        return _randn(*shape, gen=gen)

    enc_w, enc_b, dec_w, b = r(D_SAE, D_IN), r(D_SAE), r(D_IN, D_SAE), r(D_IN)
    thr = torch.tensor(threshold)
    if dict_class == "AutoEncoder":
        state = {"bias": b, "encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w}
        return state, lambda x: ((x - b) @ enc_w.T + enc_b).relu(), lambda f: f @ dec_w.T + b
    if dict_class == "AutoEncoderNew":
        state = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w,
                 "decoder.bias": b}
        return state, lambda x: (x @ enc_w.T + enc_b).relu(), lambda f: f @ dec_w.T + b
    if dict_class == "GatedAutoEncoder":
        r_mag, mag_b = r(D_SAE), r(D_SAE)
        state = {"decoder_bias": b, "encoder.weight": enc_w, "r_mag": r_mag, "gate_bias": enc_b,
                 "mag_bias": mag_b, "decoder.weight": dec_w}

        def gated(x):
            x_enc = (x - b) @ enc_w.T
            return (x_enc + enc_b > 0).float() * (r_mag.exp() * x_enc + mag_b).relu()
        return state, gated, lambda f: f @ dec_w.T + b
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        state = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w,
                 "b_dec": b, "k": torch.tensor(6, dtype=torch.int), "threshold": thr}

        def post(x):
            return ((x - b) @ enc_w.T + enc_b).relu()
        if dict_class == "AutoEncoderTopK":  # forward: encode(use_threshold=False)
            return state, lambda x: _relu_topk(post(x), 6), lambda f: f @ dec_w.T + b
        return state, lambda x: post(x) * (post(x) > thr), lambda f: f @ dec_w.T + b
    W_enc, W_dec = enc_w.T.contiguous(), dec_w.T.contiguous()
    if dict_class == "MatryoshkaBatchTopKSAE":
        state = {"W_enc": W_enc, "b_enc": enc_b, "W_dec": W_dec, "b_dec": b,
                 "k": torch.tensor(6, dtype=torch.int), "threshold": thr,
                 "group_sizes": torch.tensor([16, 48])}

        def post_m(x):
            return ((x - b) @ W_enc + enc_b).relu()
        return state, lambda x: post_m(x) * (post_m(x) > thr), lambda f: f @ W_dec + b
    assert dict_class == "JumpReluAutoEncoder"
    theta = torch.rand(D_SAE, generator=gen)
    state = {"W_enc": W_enc, "b_enc": enc_b, "W_dec": W_dec, "b_dec": b, "threshold": theta}

    def jump(x):  # apply_b_dec_to_input is False for this class
        pre = x @ W_enc + enc_b
        return (pre * (pre > theta)).relu()
    return state, jump, lambda f: f @ W_dec + b


def _write_dl(path: Path, dict_class: str, state: dict[str, torch.Tensor], **trainer) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "ae.pt")
    config = {"trainer": {"trainer_class": "X", "dict_class": dict_class, "activation_dim": D_IN,
                          "dict_size": D_SAE, "layer": 3, "lm_name": "google/gemma-2-2b",
                          "submodule_name": "resid_post_layer_3", **trainer},
              "buffer": {"d_submodule": D_IN, "io": "out"}}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(("dict_class", "ours", "threshold"), [
    ("AutoEncoder", ReLUSAE, 0.5),
    ("AutoEncoderNew", ReLUSAE, 0.5),
    ("GatedAutoEncoder", GatedSAE, 0.5),
    ("AutoEncoderTopK", TopKSAE, 0.5),
    ("BatchTopKSAE", JumpReLUSAE, 0.5),
    ("BatchTopKSAE", JumpReLUSAE, -1.0),  # the untrained sentinel: plain ReLU
    ("MatryoshkaBatchTopKSAE", JumpReLUSAE, 0.7),
    ("JumpReluAutoEncoder", JumpReLUSAE, 0.5),
])
def test_dictionary_learning_matches_reference(tmp_path, dict_class, ours, threshold):
    state, encode, decode = _dl_case(dict_class, torch.Generator().manual_seed(6), threshold)
    trainer = {"k": 6} if "TopK" in dict_class else {}
    loaded = open_sae(_write_dl(tmp_path / "trainer_0", dict_class, state, **trainer))
    assert type(loaded.sae) is ours
    x = _x()
    with torch.no_grad():
        f = encode(x)
        assert 0.02 < (f > 0).float().mean() < 0.98  # latents both on and off
        torch.testing.assert_close(loaded.sae.encode(x), f, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(loaded.sae(x), decode(f), rtol=RTOL, atol=ATOL)
    prov = loaded.provenance
    assert (prov["library"], prov["architecture"], prov["dtype"]) == (
        "dictionary_learning", dict_class, "float32")
    assert (prov["model"], prov["hook_name"], prov["original_hook_name"]) == (
        "google/gemma-2-2b", "resid_post.3", "resid_post_layer_3")
    assert prov["k"] == (6 if ours is TopKSAE else None)


def test_dictionary_learning_parent_and_hooks(tmp_path):
    gen = torch.Generator().manual_seed(7)
    for i, sub in enumerate(("resid_pre_layer_0", "resid_pre_layer_5")):
        _write_dl(tmp_path / f"trainer_{i}", "AutoEncoder", _dl_case("AutoEncoder", gen)[0],
                  submodule_name=sub)
    with pytest.raises(DarkMatterError, match=r"holds 2 SAEs.*trainer_0, .*trainer_1"):
        open_sae(tmp_path)
    first, second = (open_sae(tmp_path / f"trainer_{i}" / "ae.pt").provenance for i in (0, 1))
    assert first["hook_name"] is None and "embedding" in first["notes"][0]
    assert second["hook_name"] == "resid_post.4"


def test_dictionary_learning_bad_input(tmp_path):
    gen = torch.Generator().manual_seed(8)
    state = _dl_case("AutoEncoderTopK", gen)[0]
    _write_dl(tmp_path / "a", "AutoEncoderTopK", state, k=5)
    with pytest.raises(DarkMatterError, match=r"k is ambiguous \[5, 6\]"):
        open_sae(tmp_path / "a")
    _write_dl(tmp_path / "b", "CrossCoder", state)
    with pytest.raises(DarkMatterError, match="'CrossCoder' is not supported; supported: "):
        open_sae(tmp_path / "b")
    _write_dl(tmp_path / "c", "AutoEncoder", {**_dl_case("AutoEncoder", gen)[0],
                                              "bias": torch.zeros(D_IN + 1)})
    with pytest.raises(
        ShapeMismatchError, match=r"ae\.pt: bias has shape \(25,\), expected \(24,\)"
    ):
        open_sae(tmp_path / "c")
    renamed = {("enc.w" if n == "encoder.weight" else n): t
               for n, t in _dl_case("AutoEncoder", gen)[0].items()}
    _write_dl(tmp_path / "d", "AutoEncoder", renamed)
    with pytest.raises(
        DarkMatterError, match=r"missing \['encoder.weight'\], unexpected \['enc.w'\]"
    ):
        open_sae(tmp_path / "d")
    (tmp_path / "d" / "ae.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DarkMatterError, match=r"ae\.pt: refused to load: .*Unsupported operand"):
        open_sae(tmp_path / "d")


def test_pickle_payload_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    state = {**_dl_case("AutoEncoder", torch.Generator().manual_seed(9))[0]}
    folder = _write_dl(tmp_path / "evil", "AutoEncoder", state)
    torch.save({**state, "extra": PicklePayload(marker)}, folder / "ae.pt")

    with pytest.raises(
        DarkMatterError, match=r"evil/ae\.pt: refused to load: .*GLOBAL io\.open was not an allowed"
    ):
        open_sae(folder)
    assert not marker.exists()
    torch.load(folder / "ae.pt", weights_only=False)  # a plain unpickle does run it
    assert marker.exists()


def test_loaded_sae_is_frozen(tmp_path):
    save_sae(ReLUSAE(4, 8), tmp_path, metadata={})
    loaded = open_sae(tmp_path)
    assert isinstance(loaded, LoadedSAE)
    with pytest.raises(AttributeError):
        loaded.sae = None  # type: ignore[misc]


# --------------------------------------------------------------------------- damaged files


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_damaged_own_folder_names_the_file(tmp_path):
    """Our folders carry sha256 checksums: one flipped weight byte (which safetensors alone would
    load as a silently wrong number) and a truncation are both refused, naming the file."""
    sae = TopKSAE(D_IN, D_SAE, k=4)
    save_sae(sae, tmp_path / "a", metadata={})
    sums = json.loads((tmp_path / "a" / "checksums.json").read_text())
    assert set(sums) == {"sae_weights.safetensors", "cfg.json"}
    open_sae(tmp_path / "a")  # intact: loads

    weights = tmp_path / "a" / "sae_weights.safetensors"
    flip_byte(weights, 100)
    from safetensors.torch import load_file

    load_file(weights)  # the flip is invisible to the file format itself...
    with pytest.raises(CorruptSAEError, match=rf"{weights}.* sha256 does not match"):
        open_sae(tmp_path / "a")  # ...but not to the checksum

    save_sae(sae, tmp_path / "b", metadata={})
    (tmp_path / "b" / "checksums.json").unlink()  # e.g. a folder copied without it
    _truncate(tmp_path / "b" / "sae_weights.safetensors")
    with pytest.raises(
        CorruptSAEError, match=r"b/sae_weights\.safetensors is not a readable safetensors file"
    ):
        open_sae(tmp_path / "b")

    save_sae(sae, tmp_path / "c", metadata={})
    (tmp_path / "c" / "checksums.json").unlink()
    _truncate(tmp_path / "c" / "cfg.json", keep=0.5)
    with pytest.raises(CorruptSAEError, match=r"c/cfg\.json is not valid JSON"):
        open_sae(tmp_path / "c")


def test_damaged_foreign_files_name_the_file(tmp_path, sparsify):
    coder = _sparsify_coder(sparsify, seed=3)
    coder.save_to_disk(tmp_path / "layers.1")
    _truncate(tmp_path / "layers.1" / "sae.safetensors")
    with pytest.raises(
        CorruptSAEError, match=r"layers\.1/sae\.safetensors is not a readable safetensors"
    ):
        open_sae(tmp_path / "layers.1")

    folder = _write_dl(
        tmp_path / "dl", "AutoEncoder", _dl_case("AutoEncoder", torch.Generator().manual_seed(4))[0]
    )
    _truncate(folder / "ae.pt")
    with pytest.raises(CorruptSAEError, match=r"dl/ae\.pt: not a readable torch state dict"):
        open_sae(folder)
