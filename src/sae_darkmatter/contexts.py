"""Pack the corpus's documents into fixed-length contexts, as the model (and its SAEs) expect.

Two packings, both deterministic:

- **SAELens's** (its ``ActivationsStore``): with ``prepend_bos`` every context opens with the
  BOS token; documents follow one another with the separator token between two documents of
  the same context (never at the start of a context, nor when the document already starts
  with it); a document longer than the room left continues in the next context, after that
  context's BOS. Used whenever contexts start with a BOS or the separator is set, so a store
  harvested for an SAE that SAELens trained holds the token ids SAELens would have fed it
  (tested against ``sae_lens``'s ``ActivationsStore``).
- **The stream** (no BOS and ``separator = "auto"``: the default for models whose tokenizer
  adds no BOS, such as SmolLM2, GPT-2 and Qwen): documents joined by EOS (else BOS, else
  nothing) into one token stream that is cut into consecutive windows, so a separator may open
  a context. This is how every store was packed before BOS handling existed; it is kept so
  that their results and cache keys stay the same.

The per-token loss still pairs position ``t`` with the cross-entropy of predicting token
``t + 1``: with a BOS at position 0, the first loss is that of the first text token given only
the BOS, and the last position has none.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from sae_darkmatter.config import CorpusConfig
from sae_darkmatter.corpus import documents
from sae_darkmatter.errors import DarkMatterError, EmptyCorpusError

log = logging.getLogger(__name__)

_TOKENIZE_BATCH = 32
_PROGRESS_MIN_TOKENS = 200_000


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token first when asked for special tokens.

    Asked of the tokenizer's output rather than its ``add_bos_token`` flag, which not every
    tokenizer class sets (Llama 3 adds its BOS through a post-processor; transformers reports
    ``add_bos_token = False`` for Gemma's tokenizer, which does add ``<bos>``).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


@dataclass(frozen=True)
class Packing:
    """How documents become contexts: ``bos`` opens every context (``None``: nothing does),
    ``separator`` goes between documents, ``stream`` selects the stream packing (module doc)."""

    bos: int | None
    separator: int | None
    stream: bool

    @property
    def prepend_bos(self) -> bool:
        return self.bos is not None

    def summary(self) -> dict[str, Any]:
        """What a store records of its packing (``prepend_bos`` and the token ids)."""
        return {"prepend_bos": self.prepend_bos, "bos_token_id": self.bos,
                "separator_token_id": self.separator,
                "packing": "stream" if self.stream else "saelens"}

    def cache_key(self) -> dict[str, Any] | None:
        """The part of a harvest's cache key: ``None`` for the stream packing (so stores made
        before BOS handling keep their keys), else the packing itself."""
        return None if self.stream else self.summary()


def packing_for(cfg: CorpusConfig, tokenizer: Any, *, model: str = "the model") -> Packing:
    """Resolve ``cfg.prepend_bos`` and ``cfg.separator`` against ``tokenizer``.

    Raises a ``DarkMatterError`` when a token that is asked for does not exist, or when contexts
    of one token would hold nothing but the BOS.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prepend = tokenizer_adds_bos(tokenizer) if cfg.prepend_bos == "auto" else cfg.prepend_bos
    if prepend and bos is None:
        raise DarkMatterError(
            f"harvest.corpus.prepend_bos = true, but the tokenizer of {model} has no BOS token; "
            "set prepend_bos = \"auto\" or false")
    if prepend and cfg.context_length < 2:
        raise DarkMatterError(
            f"harvest.corpus.context_length ({cfg.context_length}) leaves no room after the BOS "
            "token that opens every context; use a longer context or prepend_bos = false")
    if cfg.separator == "auto":
        if not prepend:
            legacy = next((t for t in (eos, bos) if t is not None), None)
            return Packing(None, None if legacy is None else int(legacy), stream=True)
        separator = bos
    elif cfg.separator == "none":
        separator = None
    else:
        separator = bos if cfg.separator == "bos" else eos
        if separator is None:
            raise DarkMatterError(
                f"harvest.corpus.separator = {cfg.separator!r}, but the tokenizer of {model} "
                f'has no {cfg.separator.upper()} token; choose another separator or "none"'
            )
    return Packing(int(bos) if prepend else None, None if separator is None else int(separator),
                   stream=False)


def build_contexts(cfg: CorpusConfig, tokenizer: Any, packing: Packing | None = None) -> np.ndarray:
    """Token ids int64 [n, cfg.context_length], n = cfg.n_contexts unless the text runs out.

    Documents are tokenized lazily in small batches without special tokens, then packed by
    ``packing`` (default: ``packing_for(cfg, tokenizer)``).
    """
    length, wanted = cfg.context_length, cfg.n_contexts
    if length < 1 or wanted < 1:
        raise DarkMatterError(f"context_length and n_contexts must be >= 1, got {length}, {wanted}")
    packing = packing or packing_for(cfg, tokenizer)
    empty: list[Path] = []
    texts = (d for d in documents(cfg, empty) if d.strip())
    need = length * wanted
    counted = _Count()
    with Progress(transient=True, disable=need < _PROGRESS_MIN_TOKENS) as progress:
        task = progress.add_task(f"tokenizing {cfg.source}", total=need)
        rows = []
        for row in pack(counted(_tokenized(texts, tokenizer)), length, packing):
            rows.append(row)
            progress.update(task, completed=len(rows) * length)
            if len(rows) == wanted:
                break
    if counted.docs == 0:
        detail = ""
        if empty:
            names = ", ".join(str(f) for f in empty[:5]) + (", ..." if len(empty) > 5 else "")
            detail = f": {len(empty)} file(s) hold no text ({names})"
        raise EmptyCorpusError(f"corpus source {cfg.source!r} holds no usable text{detail}")
    if not rows:
        raise EmptyCorpusError(
            f"corpus source {cfg.source!r} gave only {counted.tokens} tokens, "
            f"fewer than one context of {length}"
        )
    if len(rows) < wanted:
        log.warning(
            "corpus %r ran out: %d documents (%d tokens) give %d of %d contexts of %d tokens",
            cfg.source, counted.docs, counted.tokens, len(rows), wanted, length,
        )
    return np.stack(rows)


class _Count:
    """Counts the non-empty documents (and their tokens) that pass through it."""

    def __init__(self) -> None:
        self.docs = self.tokens = 0

    def __call__(self, docs: Iterable[list[int]]) -> Iterator[list[int]]:
        for ids in docs:
            self.docs += 1
            self.tokens += len(ids)
            yield ids


def _tokenized(texts: Iterator[str], tokenizer: Any) -> Iterator[list[int]]:
    """Token ids of each text (no special tokens added), empty ones skipped."""
    while batch := list(itertools.islice(texts, _TOKENIZE_BATCH)):
        yield from (
            list(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"] if ids
        )


def pack(docs: Iterable[list[int]], length: int, packing: Packing) -> Iterator[np.ndarray]:
    """Contexts (int64 [length] each) from documents' token ids, as ``packing`` says (module
    doc); a last, partial context is dropped."""
    return (_pack_stream if packing.stream else _pack_saelens)(docs, length, packing)


def _pack_stream(docs: Iterable[list[int]], length: int, packing: Packing) -> Iterator[np.ndarray]:
    """Documents joined by the separator into one stream, cut into consecutive windows."""
    sep = [] if packing.separator is None else [packing.separator]
    buf: list[int] = []
    for i, ids in enumerate(docs):
        buf += (sep if i else []) + ids
        while len(buf) >= length:
            yield np.asarray(buf[:length], dtype=np.int64)
            del buf[:length]


def _pack_saelens(docs: Iterable[list[int]], length: int, packing: Packing) -> Iterator[np.ndarray]:
    """SAELens's packing (module doc): BOS first, separators only between documents."""
    bos, sep = packing.bos, packing.separator
    row: list[int] = []
    for ids in docs:
        at = 0
        while at < len(ids):
            if not row:
                if bos is not None and ids[at] != bos:
                    row.append(bos)
            elif at == 0 and sep is not None and ids[0] != sep:
                row.append(sep)  # may fill the context; the document then opens the next one
            take = min(length - len(row), len(ids) - at)
            row += ids[at : at + take]
            at += take
            if len(row) == length:
                yield np.asarray(row, dtype=np.int64)
                row = []


def special_token_ids(tokenizer: Any) -> list[int]:
    """Sorted ids of all special tokens: bos/eos/pad/unk and added special tokens."""
    ids = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {})
    ids.update(i for i, tok in added.items() if tok.special)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            ids.add(getattr(tokenizer, attr))
    return sorted(int(i) for i in ids)
