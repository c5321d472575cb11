"""Tiny causal LMs of every supported family, saved as local model folders (gpu_check's inputs).

Nothing is downloaded: each model is built from a ``transformers`` config with random weights
and saved with ``save_pretrained`` next to a byte-level tokenizer made here (256 byte tokens plus
``<pad>``, ``<bos>``, ``<eos>``). Families whose real tokenizers put a BOS first (Llama 3,
Mistral, Gemma 2/3) get a tokenizer that does, so their harvests take the BOS packing; the others
(Qwen2/3, Phi-3, GPT-2, GPT-NeoX) get one that does not, so theirs take the stream packing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

PAD, BOS, EOS = 0, 1, 2
SPECIALS = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS}
VOCAB = len(SPECIALS) + 256
N_LAYERS, D, D_MLP, POSITIONS = 3, 64, 128, 256
# Random weights ~ N(0, WEIGHT_STD) instead of HF's 0.02, so each block changes the residual
# stream visibly and a device bug in any block shows in the activations.
WEIGHT_STD = 0.1

_IDS: dict[str, Any] = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
_GQA: dict[str, Any] = dict(hidden_size=D, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
            max_position_embeddings=POSITIONS, **_IDS)
# The local layers' window (4) is shorter than the contexts, so local and global masks both act.
_SLIDING = ["sliding_attention", "sliding_attention", "full_attention"]

CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**_GQA),
    "gemma2": lambda: Gemma2Config(**_GQA, head_dim=16, sliding_window=4),
    "gemma3": lambda: Gemma3TextConfig(**_GQA, head_dim=16, sliding_window=4,
                                       layer_types=_SLIDING),
    "qwen2": lambda: Qwen2Config(**_GQA),
    "qwen3": lambda: Qwen3Config(**_GQA, head_dim=16),
    "mistral": lambda: MistralConfig(**_GQA, sliding_window=4),
    "phi3": lambda: Phi3Config(**_GQA),
    "gpt2": lambda: GPT2Config(n_embd=D, n_layer=N_LAYERS, n_head=4, vocab_size=VOCAB,
                               n_positions=POSITIONS, **_IDS),
    "neox": lambda: GPTNeoXConfig(hidden_size=D, intermediate_size=D_MLP,
                                  num_hidden_layers=N_LAYERS, num_attention_heads=4,
                                  vocab_size=VOCAB, max_position_embeddings=POSITIONS,
                                  use_parallel_residual=True, **_IDS),
}
FAMILIES = tuple(CONFIGS)
ADDS_BOS = frozenset({"llama", "gemma2", "gemma3", "mistral"})
# Each family's run (`darkmatter run --config`): a few hundred 32-token contexts, a 3-width TopK
# grid, transcoders of one MLP and every analysis at its smallest useful size.
RUN_TOML = """
[harvest]
batch_size = 16
contexts_per_shard = 64
with_loss = true
[harvest.model]
name = "{model}"
[harvest.corpus]
source = "{corpus}"
n_contexts = {n_contexts}
context_length = 32
[train]
widths = [64, 128, 256]
ks = [8]
train_tokens = 20000
batch_size = 256
[decompose]
chunk_rows = 1024
[pursuit]
max_tokens = 1000
[cross_layer]
chunk_rows = 1024
[downstream]
n_contexts = 4
max_contexts = 4  # no stopping-rule rounds: CPU and device splice the same contexts
n_boot = 200
[error_saes]
chunk_rows = 1024
[error_saes.train]
widths = [64]
ks = [4, 8]
train_tokens = 4000
batch_size = 256
[transcoders]
enabled = true
[transcoders.train]
widths = [64, 128]
ks = [8]
train_tokens = 8000
batch_size = 256
"""


def byte_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte); ``adds_bos``: ``<bos>`` goes first."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {**SPECIALS, **{ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # pyright: ignore[reportAttributeAccessIssue]
    tok.decoder = decoders.ByteLevel()  # pyright: ignore[reportAttributeAccessIssue]
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(  # pyright: ignore[reportAttributeAccessIssue]
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def build_model(family: str, folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny random ``family`` model and its tokenizer into ``folder``; return it."""
    if family not in CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose from {list(FAMILIES)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, WEIGHT_STD)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    byte_tokenizer(family in ADDS_BOS).save_pretrained(folder)
    return folder


def build_timing_model(folder: Path, *, seed: int = 0) -> Path:
    """A larger random Llama (d 512, 8 layers, ~25M parameters) for the timings."""
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=VOCAB,
                      max_position_embeddings=POSITIONS, **_IDS)
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    byte_tokenizer(True).save_pretrained(folder)
    return folder
