"""The rules by which a run follows its SAEs' training settings (``adopt_sae_metadata``).

Each SAE is a real SAE folder saved by ``sae_lens`` with the metadata SAELens's trainer writes
(``SAEMetadata``), loaded by ``open_sae``; the tokenizer is the real SmolLM2 one (a BOS token
that the tokenizer never adds)."""

from __future__ import annotations

import logging

import pytest
from sae_lens.registry import get_sae_class
from sae_lens.saes.sae import SAEMetadata

from sae_darkmatter.adopt import adopt_sae_metadata
from sae_darkmatter.config import (
    CorpusConfig,
    HarvestConfig,
    ModelConfig,
    RunConfig,
    SplitConfig,
    TokenFilter,
)
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.saes.formats import open_sae


def _sae(tmp_path, name: str, **meta):
    cls, cfg_cls = get_sae_class("standard")
    meta = SAEMetadata(
        model_name="HuggingFaceTB/SmolLM2-135M", hook_name="blocks.3.hook_resid_post", **meta
    )
    cls(cfg_cls(d_in=16, d_sae=32, metadata=meta)).save_model(tmp_path / name)
    return name, open_sae(tmp_path / name)


def _adopt(cfg, saes, tok, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sae_darkmatter.adopt"):
        out = adopt_sae_metadata(cfg, dict(saes), tokenizer=tok)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return out, warnings


def test_open_settings_follow_the_sae(tmp_path, smollm2_tokenizer, caplog):
    saes = [
        _sae(
            tmp_path,
            "a",
            context_size=256,
            prepend_bos=True,
            seqpos_slice=(4, -8),
            model_from_pretrained_kwargs={
                "dtype": "torch.bfloat16",
                "center_writing_weights": False,
            },
        )
    ]
    cfg, warnings = _adopt(RunConfig(), saes, smollm2_tokenizer, caplog)
    c, f = cfg.harvest.corpus, cfg.split.filter
    assert (cfg.harvest.model.name, cfg.harvest.hooks) == (
        "HuggingFaceTB/SmolLM2-135M",
        ("resid_post.3",),
    )
    assert (c.context_length, c.prepend_bos, c.separator) == (
        256,
        True,
        "auto",
    )  # auto = BOS with a BOS
    assert (f.skip_positions, f.stop_position) == (4, 248)  # (4, -8) of 256 positions
    assert cfg.harvest.model.dtype == "bfloat16"
    assert warnings == []  # nothing differs: it follows


def test_a_run_setting_wins_with_one_warning_each(tmp_path, smollm2_tokenizer, caplog):
    saes = [_sae(tmp_path, "a", context_size=256, prepend_bos=True, seqpos_slice=(4, None),
                 model_from_pretrained_kwargs={"fold_ln": True})]
    mine = RunConfig(
        harvest=HarvestConfig(corpus=CorpusConfig(context_length=64, prepend_bos=False)),
        split=SplitConfig(filter=TokenFilter(skip_positions=2, exclude_special=False)),
    )
    cfg, warnings = _adopt(mine, saes, smollm2_tokenizer, caplog)
    assert (cfg.harvest.corpus.context_length, cfg.harvest.corpus.prepend_bos) == (64, False)
    assert cfg.split.filter.skip_positions == 2
    text = "\n".join(warnings)
    assert "context_size 256, but this run uses harvest.corpus.context_length = 64" in text
    assert "prepend_bos True, but this run uses harvest.corpus.prepend_bos = False" in text
    assert "uses split.filter.skip_positions = 2: it is measured on positions it never saw" in text
    assert "fold_ln=True, which changes its activations" in text
    assert len(warnings) == 4, warnings
    assert cfg.harvest.corpus.separator == "bos"  # SAELens separates documents by BOS


def test_saes_that_disagree_make_the_run_choose(tmp_path, smollm2_tokenizer, caplog):
    saes = [_sae(tmp_path, "a", context_size=128), _sae(tmp_path, "b", context_size=1024)]
    with pytest.raises(DarkMatterError, match=r"different context_size \(a: 128, b: 1024\); set "
                                              r"harvest.corpus.context_length to choose one"):
        adopt_sae_metadata(RunConfig(), dict(saes), tokenizer=smollm2_tokenizer)
    chosen = RunConfig(harvest=HarvestConfig(corpus=CorpusConfig(context_length=512)))
    cfg, warnings = _adopt(chosen, saes, smollm2_tokenizer, caplog)
    assert cfg.harvest.corpus.context_length == 512 and len(warnings) == 2  # one per SAE
    # positions only narrow: every SAE's positions are kept, no choice needed
    saes = [_sae(tmp_path, "c", seqpos_slice=(1, 100)), _sae(tmp_path, "d", seqpos_slice=(8, None))]
    cfg, warnings = _adopt(RunConfig(), saes, smollm2_tokenizer, caplog)
    assert (cfg.split.filter.skip_positions, cfg.split.filter.stop_position) == (
        8,
        100,
    ) and not warnings


def test_bos_where_the_tokenizer_has_none_is_no_bos(tmp_path, caplog):
    """SAELens prepends nothing when the tokenizer has no BOS (Qwen): neither does the run."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1},
                                                                                unk_token="[UNK]")),
                                   eos_token="a")
    saes = [_sae(tmp_path, "a", prepend_bos=True)]
    cfg, warnings = _adopt(
        RunConfig(harvest=HarvestConfig(model=ModelConfig(name="m"))), saes, bare, caplog
    )
    assert (cfg.harvest.corpus.prepend_bos, cfg.harvest.corpus.separator) == ("auto", "none")
    assert not warnings
