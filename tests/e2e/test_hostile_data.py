"""Hostile corpora and harvests (bad encodings, empty files, non-finite activations or
loss) get specific errors, never garbage.

Each test feeds one kind of bad input and asserts the error class and what its message names
(keys, files, offsets, sizes, token positions), or agreement with an independent reference.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch

from sae_darkmatter.config import (
    CorpusConfig,
    HarvestConfig,
    ModelConfig,
)
from sae_darkmatter.contexts import build_contexts
from sae_darkmatter.corpus import iter_documents
from sae_darkmatter.errors import (
    CorpusEncodingError,
    EmptyCorpusError,
    NonFiniteError,
)
from sae_darkmatter.harvest import check_finite_shard, harvest
from sae_darkmatter.models import load_model
from sae_darkmatter.store import ActivationStore

# ------------------------------------------------------------------------------------ corpus


def test_non_utf8_text_file_names_file_offset_and_line(tmp_path, smollm2_tokenizer):
    path = tmp_path / "latin1.txt"
    data = "first line\nna\u00efve second line\n".encode("latin-1")
    path.write_bytes(data)
    offset = data.index(b"\xef")
    cfg = CorpusConfig(source=str(path), n_contexts=1, context_length=4)
    with pytest.raises(CorpusEncodingError) as info:
        build_contexts(cfg, smollm2_tokenizer)
    msg = str(info.value)
    assert str(path) in msg and f"byte 0xef at byte offset {offset} (line 2)" in msg
    assert 'encoding_errors = "replace"' in msg
    # The documented way to accept it: undecodable bytes read as U+FFFD.
    docs = list(iter_documents(dataclasses.replace(cfg, encoding_errors="replace")))
    assert docs == ["first line\nna\ufffdve second line"]


def test_utf16_file_and_bad_jsonl_line(tmp_path):
    u16 = tmp_path / "u16.txt"
    u16.write_bytes("hello".encode("utf-16"))
    with pytest.raises(
        CorpusEncodingError, match=r"UTF-16 byte-order mark\): byte 0xff at byte offset 0"
    ):
        list(iter_documents(CorpusConfig(source=str(u16))))
    jl = tmp_path / "bad.jsonl"
    lines = [b'{"text": "ok"}\n', b'{"text": "fine"}\n', b'{"text": "caf\xe9"}\n']
    jl.write_bytes(b"".join(lines))
    offset = len(lines[0]) + len(lines[1]) + lines[2].index(b"\xe9")
    with pytest.raises(
        CorpusEncodingError,
        match=rf"bad\.jsonl is not valid UTF-8: byte 0xe9 at byte offset {offset} \(line 3\)",
    ):
        list(iter_documents(CorpusConfig(source=str(jl))))


def test_empty_files_are_named(tmp_path, smollm2_tokenizer, caplog):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("")
    (folder / "b.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    cfg = CorpusConfig(source=str(folder), n_contexts=1, context_length=4)
    with pytest.raises(EmptyCorpusError) as info:
        build_contexts(cfg, smollm2_tokenizer)
    msg = str(info.value)
    assert "holds no usable text: 2 file(s) hold no text" in msg
    assert str(folder / "a.txt") in msg and str(folder / "b.jsonl") in msg
    (folder / "c.txt").write_text("some real text to tokenize here, enough for a context")
    with caplog.at_level(logging.WARNING):
        ctx = build_contexts(cfg, smollm2_tokenizer)
    assert ctx.shape == (1, 4)
    assert f"corpus file {folder / 'a.txt'} holds no text" in caplog.text


# ------------------------------------------------------------------------------------ harvest


def _text_with_marker(n_sentences: int, marker_at: int) -> str:
    """Repeated sentences (~6 tokens each) with one "zebra" inserted after sentence
    ``marker_at``."""
    words = ["the cat sat on the mat"] * n_sentences
    words.insert(marker_at, "zebra")
    return " ".join(words)


@pytest.fixture()
def tiny_lm(tiny_model_dir):
    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))


def _harvest_cfg(path, **kw):
    corpus = CorpusConfig(source=str(path), n_contexts=8, context_length=16)
    return HarvestConfig(model=ModelConfig(name="unused", device="cpu"), corpus=corpus,
                         hooks=("resid_post.1",), batch_size=2, contexts_per_shard=4, **kw)


def test_harvest_refuses_nan_activations_with_positions(tmp_path, tiny_lm):
    text = tmp_path / "t.txt"
    text.write_text(_text_with_marker(60, 14))  # ~token 84: context 5
    cfg = _harvest_cfg(text, with_loss=False)
    contexts = build_contexts(cfg.corpus, tiny_lm.tokenizer)
    zebra = tiny_lm.tokenizer(" zebra", add_special_tokens=False)["input_ids"][0]
    where = np.argwhere(contexts == zebra)
    assert len(where) == 1 and where[0][0] >= 4  # in the second shard
    c = int(where[0][0])
    with torch.no_grad():
        tiny_lm.model.model.embed_tokens.weight[zebra] = math.nan
    with pytest.raises(NonFiniteError) as info:
        harvest(cfg, tmp_path / "store", lm=tiny_lm, progress=False)
    err = info.value
    # NaN enters at the marker and spreads over its whole context: the causal mask is added to
    # the attention scores, and NaN + (-inf) is NaN. Other contexts stay finite.
    t = contexts.shape[1]
    assert (
        err.places == [(c, q, "nan") for q in range(5)] and err.n_bad == t and err.n_total == 4 * t
    )
    msg = str(err)
    assert (
        f"hook 'resid_post.1': NaN or inf at {t} of {4 * t} tokens (context {c} position 0 (nan)"
        in msg
    )
    assert (
        "nothing from contexts 4..7 was stored (the store keeps the 4 contexts committed before)"
        in msg
    )
    store = ActivationStore.open(tmp_path / "store")
    assert store.committed_contexts == 4  # the first shard is kept, the bad one never landed
    assert all(bool(torch.isfinite(x).all()) for _, x in store.iter_chunks("resid_post.1"))


def test_shard_check_names_exact_positions_and_skips_the_last_loss():
    acts = {"h": torch.zeros(3, 5, 4)}
    acts["h"][1, 2, 0] = math.inf
    acts["h"][2, 4, 3] = math.nan
    loss = torch.zeros(3, 5)
    loss[:, -1] = math.nan  # no next token: NaN by design, not an error
    with pytest.raises(NonFiniteError) as info:
        check_finite_shard(acts, loss, 32, "float32")
    assert info.value.places == [(33, 2, "inf"), (34, 4, "nan")] and info.value.n_bad == 2
    assert "nothing from contexts 32..34 was stored" in str(info.value)
    check_finite_shard({"h": torch.zeros(3, 5, 4)}, loss, 32, "float32")  # finite: no error


def test_harvest_float16_overflow_and_loss_overflow(tmp_path, tiny_model_dir):
    text = tmp_path / "t.txt"
    text.write_text(_text_with_marker(60, 2))
    lm = load_model(ModelConfig(name=str(tiny_model_dir), dtype="float16", device="cpu"))
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight.mul_(1e3)  # residual > 65504 in float16
        lm.model.model.layers[0].mlp.down_proj.weight.mul_(1e5)
    cfg = dataclasses.replace(
        _harvest_cfg(text, with_loss=False), model=ModelConfig(name="unused", dtype="float16")
    )
    with pytest.raises(
        NonFiniteError, match=r"context 0 position 0 \((inf|nan)\).*float16 overflows above 65504"
    ):
        harvest(cfg, tmp_path / "s16", lm=lm, progress=False)

    lm = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    with torch.no_grad():
        lm.model.model.norm.weight.fill_(math.inf)  # final norm: hooked activations stay finite
    with pytest.raises(
        NonFiniteError, match=r"per-token loss \(from non-finite logits\): NaN or inf at 60 of 60"
    ):
        harvest(_harvest_cfg(text, with_loss=True), tmp_path / "sl", lm=lm, progress=False)
