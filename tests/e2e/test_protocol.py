"""The paper's protocol (``--protocol paper``) and the checks that stop a run before any work."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sae_darkmatter import TopKSAE, paper_protocol, run, save_sae
from sae_darkmatter.cli import app
from sae_darkmatter.config import (
    CrossLayerConfig,
    DownstreamConfig,
    ErrorSAEConfig,
    HarvestConfig,
    PursuitConfig,
    RunConfig,
)
from sae_darkmatter.presets import PAPER_PROBE_TRAIN_TOKENS
from sae_darkmatter.store import ActivationStore

runner = CliRunner()


def test_paper_protocol_settings():
    trained = paper_protocol(RunConfig())
    c, f = trained.harvest.corpus, trained.split.filter
    assert (c.context_length, c.n_contexts) == (1024, 750)  # 300 left after 60 % train the SAEs
    assert (f.skip_positions, f.stop_position, f.max_norm_ratio) == (200, 1023, None)
    assert trained.split.probe_train_tokens == 150_000 and trained.decompose.bias
    assert trained.downstream.splice_all_after_skip
    assert paper_protocol(RunConfig(saes=("some/folder",))).harvest.corpus.n_contexts == 300


@pytest.fixture(scope="module")
def long_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer, d=64 Llama that allows 1,024 positions, with the real SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("long-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_paper_protocol_counts(long_llama_dir, tmp_path):
    """300 contexts of 1,024 tokens; statistics on positions 200..1022 (823 per context) bar
    special tokens; 150,000 probe-train tokens, the rest held out (the paper's 96,900)."""
    sae_dir = tmp_path / "sae"
    save_sae(TopKSAE(64, 128, 8, generator=torch.Generator().manual_seed(0)), sae_dir,
             metadata={"model_name": str(long_llama_dir), "hook_name": "resid_post.1"})
    cfg = paper_protocol(RunConfig(saes=(str(sae_dir),)))
    cfg = dataclasses.replace(  # the analyses that need more than the decomposition are off
        cfg, harvest=HarvestConfig(corpus=cfg.harvest.corpus, batch_size=10, contexts_per_shard=100,
                                   with_loss=False),
        pursuit=PursuitConfig(enabled=False), cross_layer=CrossLayerConfig(enabled=False),
        error_saes=ErrorSAEConfig(enabled=False), downstream=DownstreamConfig(enabled=False))
    metrics = run(cfg, tmp_path / "run", progress=False)
    data = metrics["data"]
    assert (data["tokens_total"], data["positions_from"], data["positions_before"]) == (
        300 * 1024,
        200,
        1023,
    )
    assert data["excluded_positions"] == 300 * (200 + 1)
    assert data["tokens_kept"] + data["excluded_special_tokens"] == 300 * 823 == 246_900
    assert 0 < data["excluded_special_tokens"] < 3_000  # the EOS between stdlib documents
    assert data["probe_train_tokens"] == PAPER_PROBE_TRAIN_TOKENS
    assert data["probe_test_tokens"] == data["tokens_kept"] - PAPER_PROBE_TRAIN_TOKENS
    store = ActivationStore.open(tmp_path / "run" / "store")
    assert store.context_length == 1024 and store.committed_contexts == 300


def test_protocol_and_quick_do_not_mix(tmp_path):
    res = runner.invoke(app, ["run", "--quick", "--protocol", "paper", "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--quick and --protocol paper cannot be combined" in res.output
    res = runner.invoke(app, ["run", "--protocol", "papr", "-o", str(tmp_path / "r")])
    assert (
        res.exit_code == 2
        and "unknown protocol 'papr'; choose one of ['default', 'paper']" in res.output
    )


def test_a_context_longer_than_the_model_allows_fails_at_once(tiny_model_dir, tmp_path):
    start = time.monotonic()
    res = runner.invoke(
        app,
        [
            "harvest",
            "--model",
            str(tiny_model_dir),
            "--context-length",
            "100000",
            "-o",
            str(tmp_path / "s"),
        ],
    )
    assert res.exit_code == 2, res.output
    assert "context_length (100,000) exceeds the 256 positions model" in " ".join(
        res.output.split()
    )
    assert time.monotonic() - start < 30 and not (tmp_path / "s").exists()
    # the paper protocol's 1,024-token contexts on the same model: stopped the same way
    res = runner.invoke(app, ["run", "--protocol", "paper", "--model", str(tiny_model_dir),
                              "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "(1,024) exceeds the 256 positions" in " ".join(
        res.output.split()
    )
    assert not (tmp_path / "r" / "store").exists()


@pytest.fixture(scope="module")
def small_store(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A 32-context store of the tiny Llama and an SAE folder for it."""
    from sae_darkmatter.config import CorpusConfig, ModelConfig
    from sae_darkmatter.harvest import harvest

    root = tmp_path_factory.mktemp("small")
    harvest(
        HarvestConfig(
            model=ModelConfig(name=str(tiny_model_dir)),
            corpus=CorpusConfig(n_contexts=32, context_length=32),
            hooks=("resid_post.2",),
            contexts_per_shard=32,
        ),
        root / "store",
        progress=False,
    )
    save_sae(
        TopKSAE(64, 64, 4, generator=torch.Generator().manual_seed(0)), root / "sae", metadata={}
    )
    return root / "store", root / "sae"


@pytest.mark.parametrize("command", ["harvest", "run", "train", "decompose", "report"])
def test_an_output_path_that_is_a_file_is_refused(tiny_model_dir, small_store, tmp_path, command):
    store, sae = small_store
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    args = {"harvest": ["harvest", "--model", str(tiny_model_dir)],
            "run": ["run", "--model", str(tiny_model_dir)],
            "train": ["train", "--store", str(store), "--widths", "32", "--k", "4"],
            "decompose": ["decompose", "--sae", str(sae), "--store", str(store)],
            "report": ["report", str(tmp_path)]}[command]
    for out, why in (
        (taken, "it is a file"),
        (taken / "sub", f"it lies inside {taken}, which is a file"),
    ):
        start = time.monotonic()
        res = runner.invoke(app, [*args, "-o", str(out)])
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert f"{out} cannot be the folder for" in text and why in text, text
        assert time.monotonic() - start < 30  # before the work, not after it
    assert taken.read_text() == "keep me"


def test_fewer_contexts_per_forward_when_logits_are_large(tiny_model_dir, tmp_path, monkeypatch):
    """With the loss on, a harvest forwards only as many contexts as keep the logits within
    ``LOGITS_BUDGET`` (Gemma 3 at 1,024 tokens: 2); the stored values are the same."""
    import numpy as np

    from sae_darkmatter import harvest as harvest_module
    from sae_darkmatter import models
    from sae_darkmatter.config import CorpusConfig, ModelConfig

    cfg = HarvestConfig(
        model=ModelConfig(name=str(tiny_model_dir)),
        hooks=("resid_post.1",),
        corpus=CorpusConfig(n_contexts=32, context_length=64),
        contexts_per_shard=32,
        with_loss=True,  # the logits, and so the budget, only with the loss
    )
    whole = harvest_module.harvest(cfg, tmp_path / "a", progress=False)
    calls: list[int] = []
    forward = harvest_module.forward_capture
    monkeypatch.setattr(
        harvest_module,
        "forward_capture",
        lambda lm, ids, *a, **k: calls.append(len(ids)) or forward(lm, ids, *a, **k),
    )
    monkeypatch.setattr(models, "LOGITS_BUDGET", 3 * 64 * 49152)  # 3 contexts of this vocabulary
    small = harvest_module.harvest(cfg, tmp_path / "b", progress=False)
    assert calls == [3] * 10 + [2]  # instead of 2 forwards of 16
    rows = np.arange(whole.n_rows)
    torch.testing.assert_close(
        small.gather("resid_post.1", rows), whole.gather("resid_post.1", rows), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(small.column("loss"), whole.column("loss"), rtol=1e-5, atol=1e-5)
