"""A harvest that follows an SAE's SAELens metadata equals SAELens's own ``ActivationsStore``.

For an SAE saved by ``sae_lens`` (metadata: model, hook, context size, ``prepend_bos``, a
``seqpos_slice``), ``darkmatter run --sae <folder>`` resolves its settings with
``adopt_sae_metadata`` and harvests; SAELens's ``ActivationsStore.from_sae`` reads the same
texts through a ``HookedProxyLM`` of the same model. Both must hold the same token ids per
context and the same activations. Tiny Gemma 3 (real Gemma tokenizer, which adds ``<bos>``) and
Llama (real SmolLM2 tokenizer, which adds none) models, with ``prepend_bos`` true and false.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sae_lens import SAE
from sae_lens.load_model import HookedProxyLM
from sae_lens.registry import get_sae_class
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.activations_store import ActivationsStore
from transformers import AutoModelForCausalLM, Gemma3TextConfig
from typer.testing import CliRunner

from sae_darkmatter.adopt import adopt_sae_metadata
from sae_darkmatter.cli import app
from sae_darkmatter.config import CorpusConfig, HarvestConfig, ModelConfig, RunConfig
from sae_darkmatter.contexts import tokenizer_adds_bos
from sae_darkmatter.harvest import harvest
from sae_darkmatter.models import load_model
from sae_darkmatter.pipeline import open_saes

CONTEXT = 24
TEXTS = [
    "The residual stream carries information between the layers of a transformer.",
    "def add(a, b):\n    return a + b",
    "Sparse autoencoders reconstruct activations from a few active latents; what they miss "
    "is the dark matter, and part of it is linearly predictable from the activation itself.",
    "Short text.",
    "import os\nfor root, dirs, files in os.walk('.'):\n    print(root, len(files))",
    "A sentence that runs a little longer than the others, so that it spills over the end of "
    "one context and continues in the next one after that context's first token.",
] * 3


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory, gemma3_tokenizer) -> Path:
    """A 2-layer Gemma 3 with random weights and the real Gemma 3 tokenizer, saved to disk."""
    tok = gemma3_tokenizer
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, sliding_window=8, max_position_embeddings=256,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gemma3")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _saelens_sae(folder: Path, model_dir: Path, prepend_bos: bool) -> Path:
    """A JumpReLU SAE saved by sae_lens with the metadata SAELens's trainer writes."""
    cls, cfg_cls = get_sae_class("jumprelu")
    meta = SAEMetadata(
        model_name=str(model_dir),
        hook_name="model.layers.1",
        context_size=CONTEXT,
        prepend_bos=prepend_bos,
        seqpos_slice=(1, None),
        model_from_pretrained_kwargs={},
    )
    cls(cfg_cls(d_in=64, d_sae=32, metadata=meta)).save_model(folder)
    return folder


@pytest.mark.parametrize("prepend_bos", [True, False])
@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_harvest_for_an_sae_equals_saelens_activations_store(
        tmp_path, family, prepend_bos, tiny_gemma3_dir, tiny_model_dir):
    model_dir = tiny_gemma3_dir if family == "gemma3" else tiny_model_dir
    sae_dir = _saelens_sae(tmp_path / "sae", model_dir, prepend_bos)
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))

    # Ours: the settings `darkmatter run --sae <folder> --corpus texts.jsonl` resolves.
    cfg = RunConfig(saes=(str(sae_dir),), harvest=HarvestConfig(
        corpus=CorpusConfig(source=str(corpus), n_contexts=1000), with_loss=False))
    cfg = adopt_sae_metadata(cfg, open_saes(cfg.saes))
    assert cfg.harvest.model.name == str(model_dir) and cfg.harvest.hooks == ("resid_post.1",)
    assert cfg.harvest.corpus.context_length == CONTEXT
    assert cfg.split.filter.skip_positions == 1  # seqpos_slice (1, None): our default already
    store = harvest(cfg.harvest, tmp_path / "store", progress=False)
    assert store.meta["prepend_bos"] is prepend_bos
    shown = CliRunner().invoke(app, ["info", "--store", str(tmp_path / "store")]).output
    bos_id = store.meta["bos_token_id"]
    assert (f"contexts of {CONTEXT} (BOS token {bos_id} first)" if prepend_bos
            else f"contexts of {CONTEXT} (no BOS prepended)") in " ".join(shown.split())
    n = store.committed_contexts
    ours_ids = torch.from_numpy(store.column("tokens")).view(n, CONTEXT)
    ours = store.gather("resid_post.1", torch.arange(n * CONTEXT).numpy()).view(n, CONTEXT, 64)

    # Theirs: SAELens's ActivationsStore for the same SAE, on its own copy of the model.
    lm = load_model(ModelConfig(name=str(model_dir)))
    # transformers 5 reports add_bos_token = False for Gemma's tokenizer, which adds <bos>;
    # HookedProxyLM reads the flag to strip that BOS from each text (as TransformerLens's
    # to_tokens(prepend_bos=False) never adds it), so the flag is set to what the tokenizer does.
    lm.tokenizer.add_bos_token = tokenizer_adds_bos(lm.tokenizer)
    proxy = HookedProxyLM(lm.model, lm.tokenizer, hook_names=["model.layers.1"])
    theirs_store = ActivationsStore.from_sae(
        proxy, SAE.load_from_disk(sae_dir), dataset=Dataset.from_dict({"text": TEXTS}),
        streaming=False, store_batch_size_prompts=n, n_batches_in_buffer=2,
        train_batch_size_tokens=n * CONTEXT, total_tokens=n * CONTEXT, device="cpu")
    theirs_ids = theirs_store.get_batch_tokens(n)
    theirs = theirs_store.get_activations(theirs_ids)  # positions 1.. (seqpos_slice)

    assert n >= 8 and torch.equal(ours_ids, theirs_ids.cpu())
    bos = lm.tokenizer.bos_token_id
    assert bool((ours_ids[:, 0] == bos).all()) is prepend_bos
    # Same float32 kernels on the same weights and ids: equal up to summation order.
    torch.testing.assert_close(
        ours[:, 1:], theirs.reshape(n, CONTEXT - 1, 64), rtol=1e-5, atol=1e-5
    )
