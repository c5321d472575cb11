"""Text sources and context packing, checked against independent tokenization."""

from __future__ import annotations

import ast
import json
import logging
import os
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sae_darkmatter.config import CorpusConfig
from sae_darkmatter.contexts import build_contexts, special_token_ids
from sae_darkmatter.corpus import (
    MAX_DOC_CHARS,
    corpus_fingerprint,
    iter_documents,
    split_paragraphs,
)
from sae_darkmatter.errors import DarkMatterError, EmptyCorpusError

RECORDS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "",  # empty records carry no text and add no separator
    "Sparse autoencoders leave a residual: the dark matter.",
    "x = [i ** 2 for i in range(10)]  # squares",
]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _word_tokenizer(**special: str) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with chosen special tokens (ids 0..3)."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", "[BOS]", "[PAD]", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **special)


def test_packing_matches_independent_tokenization(tmp_path, smollm2_tokenizer, caplog):
    tok = smollm2_tokenizer
    source = _jsonl(tmp_path / "docs.jsonl", [{"text": r, "id": i} for i, r in enumerate(RECORDS)])
    stream: list[int] = []
    for text in RECORDS:
        ids = tok.encode(text, add_special_tokens=False)
        if ids:
            stream += ([tok.eos_token_id] if stream else []) + ids
    assert tok.eos_token_id == 2  # <|im_end|> in the Instruct GGUF

    length = 8
    few = build_contexts(CorpusConfig(source=str(source), n_contexts=2, context_length=length), tok)
    assert few.dtype == np.int64 and few.shape == (2, length)
    np.testing.assert_array_equal(few.ravel(), stream[: 2 * length])

    n_all = len(stream) // length
    with caplog.at_level(logging.WARNING, logger="sae_darkmatter.contexts"):
        cfg = CorpusConfig(source=str(source), n_contexts=1000, context_length=length)
        got = build_contexts(cfg, tok)
    np.testing.assert_array_equal(got, np.array(stream[: n_all * length]).reshape(n_all, length))
    n_text = len(stream) - 3  # the 3 separators are not document tokens
    assert f"4 documents ({n_text} tokens) give {n_all} of 1000 contexts" in caplog.text


def test_separator_falls_back_from_eos_to_bos_to_none(tmp_path):
    source = tmp_path / "abc.jsonl"
    _jsonl(source, [{"text": "a b"}, {"text": "c"}, {"text": "b a"}])
    cfg = CorpusConfig(source=str(source), n_contexts=1, context_length=7)
    with_eos = build_contexts(cfg, _word_tokenizer(eos_token="[EOS]", bos_token="[BOS]"))
    np.testing.assert_array_equal(with_eos[0], [4, 5, 1, 6, 1, 5, 4])
    with_bos = build_contexts(cfg, _word_tokenizer(bos_token="[BOS]"))
    np.testing.assert_array_equal(with_bos[0], [4, 5, 2, 6, 2, 5, 4])
    cfg5 = CorpusConfig(source=str(source), n_contexts=1, context_length=5)
    np.testing.assert_array_equal(build_contexts(cfg5, _word_tokenizer())[0], [4, 5, 6, 5, 4])


def test_stdlib_corpus(smollm2_tokenizer):
    tok = smollm2_tokenizer
    cfg = CorpusConfig(source="stdlib", n_contexts=100, context_length=128, seed=0)
    t0 = time.perf_counter()
    a = build_contexts(cfg, tok)
    assert time.perf_counter() - t0 < 20  # measured ~0.1 s
    assert a.shape == (100, 128) and a.dtype == np.int64
    np.testing.assert_array_equal(a, build_contexts(cfg, tok))
    other = build_contexts(CorpusConfig(source="stdlib", n_contexts=100, seed=1), tok)
    assert not np.array_equal(a, other)

    text = tok.decode(a.ravel())
    topics_py = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    assign = next(n for n in ast.parse(topics_py.read_text()).body if isinstance(n, ast.Assign))
    topics = "\n".join(ast.literal_eval(assign.value).values())
    docs = list(iter_documents(CorpusConfig(source="stdlib")))
    # Documents alternate prose (reference-manual topics) and code, so both are in 100 contexts.
    prose = [d for d in docs[:20:2] if d[:60] in text]
    code = [d for d in docs[1:20:2] if d[:60] in text]
    assert prose and code
    assert all(d.splitlines()[0] in topics for d in docs[:20:2])
    assert any("def " in d or "import " in d for d in code)
    assert sum(len(d) > MAX_DOC_CHARS for d in docs) < 5  # only single giant lines


def test_split_paragraphs():
    paras = [("word " * 50).strip() + str(i) for i in range(40)]  # ~255 chars each
    text = "\n\n\n".join(paras[:20]) + "\n  \n" + "\n\n".join(paras[20:])
    pieces = list(split_paragraphs(text, max_chars=1000))
    assert "\n\n".join(pieces) == "\n\n".join(paras)
    assert all(len(p) <= 1000 for p in pieces) and len(pieces) == 14  # 3 paragraphs per piece
    long_para = "\n".join(f"line {i:02d}" for i in range(10))  # 10 lines of 7 chars
    assert list(split_paragraphs(long_para, max_chars=20)) == [
        "\n".join(f"line {i:02d}" for i in range(j, min(j + 2, 10))) for j in range(0, 10, 2)
    ]
    assert list(split_paragraphs("x" * 50, max_chars=10)) == ["x" * 50]  # lines are never cut
    assert list(split_paragraphs(" \n\n \n")) == []


def test_folder_of_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    _jsonl(tmp_path / "b.jsonl", [{"body": "json one"}, {"body": None}, {"body": "json two"}])
    (tmp_path / "sub").mkdir()
    table = pa.table({"id": [1, 2, 3], "body": ["pq one", None, "pq three"]})
    pq.write_table(table, tmp_path / "sub" / "c.parquet")
    (tmp_path / "notes.md").write_text("ignored: not a corpus file type")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.txt").write_text("ignored: hidden folder")

    docs = list(iter_documents(CorpusConfig(source=str(tmp_path), text_field="body")))
    assert docs == [
        "first paragraph\n\nsecond paragraph", "json one", "json two", "pq one", "pq three"
    ]
    one_file = CorpusConfig(source=str(tmp_path / "sub" / "c.parquet"), text_field="body")
    single = iter_documents(one_file)
    assert list(single) == ["pq one", "pq three"]


def test_hf_source_from_local_dataset_folder(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "hello world"}, {"text": "second row"}])
    docs = iter_documents(CorpusConfig(source=f"hf:{tmp_path}", split="train"))
    assert list(docs) == ["hello world", "second row"]
    with pytest.raises(DarkMatterError, match=r"row 1: no field 'body' \(available keys: \['text'"):
        list(iter_documents(CorpusConfig(source=f"hf:{tmp_path}", text_field="body")))


def test_hf_unavailable_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DarkMatterError, match=r"nobody/no-such-dataset.*\.jsonl or \.parquet"):
        iter_documents(CorpusConfig(source="hf:nobody/no-such-dataset"))


def test_source_errors(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n  \n")
    with pytest.raises(EmptyCorpusError, match=f"'{empty}' holds no usable text"):
        build_contexts(CorpusConfig(source=str(empty)), tok)
    short = tmp_path / "short.txt"
    short.write_text("only a few tokens")
    with pytest.raises(EmptyCorpusError, match=r"only 4 tokens, fewer than one context of 128"):
        build_contexts(CorpusConfig(source=str(short)), tok)

    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"content": "x", "meta": 1}])
    keys = r"bad.jsonl, line 2: no field 'text' \(available keys: \['content', 'meta'\]\)"
    with pytest.raises(DarkMatterError, match=keys):
        list(iter_documents(CorpusConfig(source=str(bad))))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DarkMatterError, match=r"broken.jsonl, line 2: invalid JSON"):
        list(iter_documents(CorpusConfig(source=str(broken))))
    numbers = _jsonl(tmp_path / "num.jsonl", [{"text": 3}])
    with pytest.raises(DarkMatterError, match=r"line 1: text field holds int"):
        list(iter_documents(CorpusConfig(source=str(numbers))))

    pq.write_table(pa.table({"content": ["x"], "lang": ["en"]}), tmp_path / "t.parquet")
    columns = r"no column 'text' \(columns: \['content', 'lang'\]\)"
    with pytest.raises(DarkMatterError, match=columns):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "t.parquet"))))

    for missing in (tmp_path / "nope.txt", tmp_path / "nodir"):
        with pytest.raises(DarkMatterError, match=f"not found: {missing}"):
            iter_documents(CorpusConfig(source=str(missing)))
    with pytest.raises(DarkMatterError, match=r"unknown corpus source 'wikipedia'; use 'stdlib'"):
        iter_documents(CorpusConfig(source="wikipedia"))
    (tmp_path / "x.md").write_text("text")
    with pytest.raises(DarkMatterError, match=r"unsupported type '\.md'"):
        iter_documents(CorpusConfig(source=str(tmp_path / "x.md")))
    (tmp_path / "vacant").mkdir()
    with pytest.raises(EmptyCorpusError, match="vacant holds no .txt, .jsonl or .parquet"):
        iter_documents(CorpusConfig(source=str(tmp_path / "vacant")))


def test_special_token_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = special_token_ids(tok)
    assert ids == sorted(set(ids))
    assert {tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, 0} <= set(ids)
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    added = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert added <= set(ids)
    assert special_token_ids(_word_tokenizer(eos_token="[EOS]", pad_token="[PAD]")) == [0, 1, 3]


def test_corpus_fingerprint(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("some text")
    cfg = CorpusConfig(source=str(tmp_path))
    fp = corpus_fingerprint(cfg)
    assert fp == corpus_fingerprint(CorpusConfig(source=str(tmp_path)))
    assert fp != corpus_fingerprint(CorpusConfig(source=str(tmp_path), n_contexts=7))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fp_touched = corpus_fingerprint(cfg)
    assert fp_touched != fp
    (tmp_path / "b.jsonl").write_text("")
    assert corpus_fingerprint(cfg) != fp_touched
    stdlib = corpus_fingerprint(CorpusConfig())
    assert stdlib == corpus_fingerprint(CorpusConfig()) != corpus_fingerprint(CorpusConfig(seed=1))
