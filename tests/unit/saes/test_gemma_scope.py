"""Gemma Scope 2 and Gemma 3: the registry's ``gemma_3`` conversion offline, the settings a run
takes from such an SAE, and the real Gemma 3 270M with and without ``<bos>``."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import cached_hub_repo
from sae_darkmatter.adopt import adopt_sae_metadata
from sae_darkmatter.config import CorpusConfig, HarvestConfig, ModelConfig, RunConfig
from sae_darkmatter.harvest import harvest
from sae_darkmatter.saes import JumpReLUSAE
from sae_darkmatter.saes.formats import open_sae

RELEASE, SAE_ID = "gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_medium"
REPO, FOLDER = "google/gemma-scope-2-270m-pt", "resid_post/layer_12_width_16k_l0_medium"
D_IN, D_SAE = 640, 96  # the real width is 16k: the loader reads the shapes from the file


def _gemma_scope_2_files(cache, *, with_config: bool) -> dict[str, torch.Tensor]:
    """A Gemma Scope 2 SAE in the layout of its Hub repo: ``<folder>/params.safetensors`` (w_enc
    [d_in, d_sae], w_dec [d_sae, d_in], b_enc, b_dec, threshold) and optionally ``config.json``."""
    gen = torch.Generator().manual_seed(7)
    params = {"w_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.05,
              "w_dec": torch.randn(D_SAE, D_IN, generator=gen) * 0.05,
              "b_enc": torch.randn(D_SAE, generator=gen) * 0.1,
              "b_dec": torch.randn(D_IN, generator=gen) * 0.1,
              "threshold": torch.rand(D_SAE, generator=gen) * 0.3}
    folder = cached_hub_repo(cache, REPO) / FOLDER
    folder.mkdir(parents=True)
    save_file(params, str(folder / "params.safetensors"))
    if with_config:
        (folder / "config.json").write_text(json.dumps(
            {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
             "hf_hook_point_in": "model.layers.12.output"}))
    return params


@pytest.mark.parametrize("with_config", [True, False])
def test_gemma_scope_2_loads_offline_as_sae_lens_loads_it(hub_cache, monkeypatch, with_config):
    """Ours offline from the cache; sae_lens's own ``gemma_3`` loader as the reference. sae_lens
    asks the Hub for tensor shapes over HTTP (which fails offline even with the file cached), so
    for the reference alone that one call reads the cached file."""
    from huggingface_hub import hf_hub_download
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders
    from safetensors import safe_open

    params = _gemma_scope_2_files(hub_cache, with_config=with_config)
    loaded = open_sae(f"saelens:{RELEASE}/{SAE_ID}")

    def shapes_from_cache(repo_id, filename):
        with safe_open(hf_hub_download(repo_id, filename), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    monkeypatch.setattr(pretrained_sae_loaders, "get_safetensors_tensor_shapes", shapes_from_cache)
    theirs = SAE.from_pretrained(RELEASE, SAE_ID)
    assert isinstance(loaded.sae, JumpReLUSAE) and (loaded.sae.d_in, loaded.sae.d_sae) == (
        D_IN,
        D_SAE,
    )
    x = torch.randn(400, D_IN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = loaded.sae.encode(x)
        assert 0.05 < (z > 0).float().mean() < 0.95  # the thresholds cut inside the data
        torch.testing.assert_close(z, theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.sae(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.sae.W_dec, params["w_dec"])
    prov = loaded.provenance
    assert (prov["model"], prov["hook_name"], prov["original_hook_name"], prov["dtype"]) == (
        "google/gemma-3-270m", "resid_post.12", "blocks.12.hook_resid_post", "float32")
    assert prov["trained_with"] == {"prepend_bos": True, "context_size": 1024,
                                    "dataset_path": "monology/pile-uncopyrighted"}


def test_a_gemma_scope_2_run_takes_its_settings(hub_cache, gemma3_tokenizer, caplog):
    """`darkmatter run --sae saelens:gemma-scope-2-270m-pt-res/...` harvests Gemma 3 270M at
    resid_post.12 in contexts of 1,024 tokens with <bos> first, and says the corpus differs."""
    _gemma_scope_2_files(hub_cache, with_config=False)
    spec = f"saelens:{RELEASE}/{SAE_ID}"
    loaded = {"sae": open_sae(spec)}
    with caplog.at_level(logging.INFO, logger="sae_darkmatter.adopt"):
        cfg = adopt_sae_metadata(RunConfig(saes=(spec,)), loaded, tokenizer=gemma3_tokenizer)
    assert (cfg.harvest.model.name, cfg.harvest.hooks) == (
        "google/gemma-3-270m",
        ("resid_post.12",),
    )
    assert cfg.harvest.corpus.context_length == 1024
    assert cfg.harvest.corpus.prepend_bos == "auto"  # Gemma's tokenizer adds <bos> already
    assert "harvest.corpus.context_length = 1024, as the SAEs were trained" in caplog.text
    assert (
        "trained on text from monology/pile-uncopyrighted; this run reads 'stdlib'" in caplog.text
    )

    caplog.clear()  # a setting the run chooses wins, with one warning naming both values
    mine = RunConfig(saes=(spec,), harvest=HarvestConfig(corpus=CorpusConfig(
        context_length=256, prepend_bos=False, source="hf:monology/pile-uncopyrighted")))
    cfg = adopt_sae_metadata(mine, loaded, tokenizer=gemma3_tokenizer)
    assert (cfg.harvest.corpus.context_length, cfg.harvest.corpus.prepend_bos) == (256, False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert any("context_size 1024, but this run uses harvest.corpus.context_length = 256" in w
               for w in warnings)
    assert any("prepend_bos True, but this run uses harvest.corpus.prepend_bos = False" in w
               for w in warnings)


@pytest.mark.slow
def test_gemma3_270m_needs_its_bos(tmp_path, gemma3_gguf):
    """The real Gemma 3 270M on the same stdlib texts: with <bos> first (the default, from its
    tokenizer) its next-token loss is far lower than without; the stored loss pairs each
    position with the prediction of the next token (position 0: the first text token given
    only <bos>)."""
    losses = {}
    for bos in ("auto", False):
        corpus = CorpusConfig(n_contexts=8, context_length=128, prepend_bos=bos)
        cfg = HarvestConfig(model=ModelConfig(name=str(gemma3_gguf)), corpus=corpus,
                            hooks=("resid_post.12",), batch_size=8, contexts_per_shard=8,
                            with_loss=True)
        store = harvest(cfg, tmp_path / str(bos), progress=False)
        tokens = store.column("tokens").reshape(8, 128)
        assert bool((tokens[:, 0] == 2).all()) is (bos == "auto")
        assert store.meta["prepend_bos"] is (bos == "auto")
        loss = store.column("loss").reshape(8, 128)
        assert np.isnan(loss[:, -1]).all() and np.isfinite(loss[:, :-1]).all()
        losses[bos] = float(loss[:, 32:-1].mean())
    # benchmarks/bench_gemma3.py, 16,384 tokens of 128-token contexts: 2.64 vs 4.00 nats.
    assert losses["auto"] < losses[False] - 0.5, losses
