"""Context packing: BOS handling on real tokenizers, and SAELens's packing rules against SAELens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens.tokenization_and_batching import concat_and_batch_sequences

from sae_darkmatter.config import CorpusConfig, HarvestConfig, ModelConfig, fingerprint
from sae_darkmatter.contexts import (
    Packing,
    build_contexts,
    pack,
    packing_for,
    tokenizer_adds_bos,
)
from sae_darkmatter.corpus import corpus_fingerprint
from sae_darkmatter.errors import ConfigValueError, DarkMatterError
from sae_darkmatter.harvest import harvest_fingerprint

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Sparse autoencoders leave a residual: the dark matter of the model. " * 3,
    "x = [i ** 2 for i in range(10)]  # squares",
    "Short.",
]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _docs(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def test_bos_is_detected_from_what_the_tokenizer_does(gemma3_tokenizer, smollm2_tokenizer):
    gemma, smol = gemma3_tokenizer, smollm2_tokenizer
    assert gemma.bos_token_id == 2 and gemma("a").input_ids[0] == 2
    assert tokenizer_adds_bos(gemma)  # although transformers reports add_bos_token = False for it
    assert not tokenizer_adds_bos(smol)  # SmolLM2 has a BOS token (<|im_start|>) but never adds it
    cfg = CorpusConfig()
    assert packing_for(cfg, gemma) == Packing(bos=2, separator=2, stream=False)
    assert packing_for(cfg, smol) == Packing(bos=None, separator=smol.eos_token_id, stream=True)
    assert packing_for(CorpusConfig(prepend_bos=False), gemma) == Packing(None, 1, stream=True)
    assert packing_for(CorpusConfig(prepend_bos=True), smol) == Packing(1, 1, stream=False)
    assert packing_for(CorpusConfig(separator="eos"), gemma) == Packing(2, 1, stream=False)
    assert packing_for(CorpusConfig(separator="none"), smol) == Packing(None, None, stream=False)


def test_gemma_contexts_start_with_bos_and_separate_documents_by_bos(tmp_path, gemma3_tokenizer):
    tok = gemma3_tokenizer
    source = _jsonl(tmp_path / "docs.jsonl", TEXTS * 4)
    length = 24
    ctx = build_contexts(
        CorpusConfig(source=str(source), n_contexts=50, context_length=length), tok
    )
    assert (ctx[:, 0] == tok.bos_token_id).all()
    theirs = concat_and_batch_sequences(  # SAELens's packing of the same documents
        iter(torch.tensor(ids) for ids in _docs(tok, TEXTS * 4)), length,
        begin_batch_token_id=tok.bos_token_id, sequence_separator_token_id=tok.bos_token_id)
    np.testing.assert_array_equal(ctx, torch.stack(list(theirs)).numpy())
    assert (ctx[:, 1:] == tok.bos_token_id).any()  # BOS also separates documents
    text = tok.decode(ctx[0])
    assert text.startswith("<bos>The quick brown fox") and "<bos>def add" in text


def test_smollm2_contexts_are_unchanged_by_bos_handling(smollm2_tokenizer):
    """The default for a model without BOS is the stream packing every store used before: the
    same token ids, and the same harvest fingerprint formula (model, corpus, settings)."""
    tok = smollm2_tokenizer
    cfg = CorpusConfig(n_contexts=64)
    ctx = build_contexts(cfg, tok)
    stream: list[int] = []
    for ids in _docs(tok, _stdlib_texts(cfg, 400)):
        if ids:
            stream += ([tok.eos_token_id] if stream else []) + ids
    np.testing.assert_array_equal(ctx.ravel(), stream[: ctx.size])
    harvest = HarvestConfig(model=ModelConfig(name="smollm2"), corpus=cfg)
    before = fingerprint(harvest, corpus_fingerprint(cfg))  # the key before BOS handling existed
    assert harvest_fingerprint(harvest, packing_for(cfg, tok)) == before
    bos = CorpusConfig(n_contexts=64, prepend_bos=True)
    forced = build_contexts(bos, tok)
    assert (forced[:, 0] == tok.bos_token_id).all() and not (ctx[:, 0] == tok.bos_token_id).all()
    assert harvest_fingerprint(HarvestConfig(corpus=bos), packing_for(bos, tok)) != before


def _stdlib_texts(cfg: CorpusConfig, n: int) -> list[str]:
    from sae_darkmatter.corpus import iter_documents

    docs = (d for d in iter_documents(cfg) if d.strip())
    return [next(docs) for _ in range(n)]


def test_a_bos_choice_changes_the_cache_key_of_models_that_take_one(gemma3_tokenizer):
    tok = gemma3_tokenizer
    keys = {}
    for choice in ("auto", True, False):
        cfg = HarvestConfig(corpus=CorpusConfig(prepend_bos=choice))
        keys[choice] = harvest_fingerprint(cfg, packing_for(cfg.corpus, tok))
    old = HarvestConfig()
    assert keys["auto"] != fingerprint(old, corpus_fingerprint(old.corpus))  # no silent reuse
    assert keys["auto"] != keys[False]  # same contexts as an explicit true, other config
    assert len(set(keys.values())) == 3


def test_bad_bos_and_separator_settings_fail_before_work(tmp_path, smollm2_tokenizer):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1},
                                                                                unk_token="[UNK]")))
    with pytest.raises(
        DarkMatterError, match=r"prepend_bos = true, but the tokenizer of 'm' has no BOS"
    ):
        packing_for(CorpusConfig(prepend_bos=True), bare, model="'m'")
    with pytest.raises(
        DarkMatterError, match=r"separator = 'eos', but the tokenizer .* has no EOS"
    ):
        packing_for(CorpusConfig(separator="eos"), bare)
    with pytest.raises(DarkMatterError, match=r"context_length \(1\) leaves no room after the BOS"):
        packing_for(CorpusConfig(context_length=1, prepend_bos=True), smollm2_tokenizer)
    assert packing_for(CorpusConfig(context_length=1), smollm2_tokenizer).stream  # no BOS: fine
    with pytest.raises(
        ConfigValueError,
        match=r"harvest.corpus.prepend_bos must be true, false or \"auto\", got 'yes'",
    ):
        CorpusConfig(prepend_bos="yes")
    with pytest.raises(
        ConfigValueError, match=r"separator must be one of \['auto', 'bos', 'eos', 'none'\]"
    ):
        CorpusConfig(separator="pad")


# ---------------------------------------------------------------------------- against SAELens

_TOKENS = st.lists(st.integers(0, 9), min_size=0, max_size=40)


@settings(max_examples=150, deadline=None)
@given(docs=st.lists(_TOKENS, min_size=1, max_size=12), length=st.integers(2, 17),
       bos=st.sampled_from([None, 0, 1]), sep=st.sampled_from([None, 0, 1, 2]))
def test_saelens_packing_equals_saelens(docs, length, bos, sep):
    """Our packing equals ``sae_lens``'s ``concat_and_batch_sequences`` on any documents:
    empty ones, ones that start with the BOS or separator, ones longer than a context, a
    separator that exactly fills a context, and the same token as BOS and separator."""
    theirs = [t.tolist() for t in concat_and_batch_sequences(
        iter(torch.tensor(d, dtype=torch.long) for d in docs), length,
        begin_batch_token_id=bos, sequence_separator_token_id=sep)]
    ours = [
        c.tolist() for c in pack((d for d in docs if d), length, Packing(bos, sep, stream=False))
    ]
    assert ours == theirs


def test_gguf_tokenizers_add_bos_as_their_files_say(
    gemma3_gguf, gemma3_tokenizer, smollm2_tokenizer
):
    """The BOS choice of a .gguf model follows its ``tokenizer.ggml.add_bos_token``: true for
    Gemma 3, false for SmolLM2 (whose tokenizer still has a BOS token, <|im_start|>)."""
    from gguf import GGUFReader

    from sae_darkmatter.models import embedded_gguf_path

    for path, tok in ((gemma3_gguf, gemma3_tokenizer), (embedded_gguf_path(), smollm2_tokenizer)):
        field = GGUFReader(str(path)).fields["tokenizer.ggml.add_bos_token"]
        assert tokenizer_adds_bos(tok) is bool(field.contents()) and tok.bos_token_id is not None
    assert tokenizer_adds_bos(gemma3_tokenizer) and not tokenizer_adds_bos(smollm2_tokenizer)
