"""Text sources, and packing their tokens into fixed-length contexts.

Sources (``CorpusConfig.source``):

- ``"stdlib"``: the running Python's standard library. English prose (the reference-manual
  topics in ``pydoc_data/topics.py``) and Python source code. Prose and code pieces are each
  shuffled with ``random.Random(seed)`` and then alternated, so every prefix of the corpus is
  about half prose (by piece) until the ~0.1M prose tokens run out; plain shuffling would give
  ~3 % prose, as the code is ~30x larger.
- a ``.txt`` / ``.jsonl`` / ``.parquet`` file, or a folder of them (sorted, recursive).
- ``"hf:<dataset>"`` or ``"hf:<dataset>:<config>"``: a Hugging Face dataset, streamed.

Text files must be UTF-8: a ``.txt`` or ``.jsonl`` file with other bytes stops with an error
naming the file and the byte offset, unless ``encoding_errors = "replace"`` reads them as
U+FFFD. The ``stdlib`` source always replaces (as it did before the option existed, so its
tokens do not change; the library's own files are UTF-8). A file that yields no text is named:
in the error when no file of the source has text, in a warning otherwise.

Long texts (stdlib files, ``.txt`` files) are cut at blank lines into pieces of at most
~4,000 characters (~1,000 tokens), each one document; jsonl/parquet/HF records stay whole.
``contexts`` packs the documents' tokens into fixed-length contexts.
"""

from __future__ import annotations

import ast
import itertools
import json
import logging
import os
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from sae_darkmatter.config import CorpusConfig, fingerprint
from sae_darkmatter.errors import CorpusEncodingError, DarkMatterError, EmptyCorpusError

log = logging.getLogger(__name__)

SOURCE_FORMS = (
    "'stdlib', a .txt/.jsonl/.parquet file or a folder of them, "
    "or 'hf:<dataset>' / 'hf:<dataset>:<config>'"
)
MAX_DOC_CHARS = 4000
# Tests, IDLE, 2to3 and turtle demos, and generated codec tables are not representative text.
_STDLIB_SKIP = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
     "__pycache__", "encodings"}
)
_BLANK_LINES = re.compile(r"\n\s*\n")
_FORMAT_VERSION = 1  # bump when document splitting or ordering changes


# ---------------------------------------------------------------------------- documents


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """The documents of ``cfg.source`` in a deterministic order.

    The source is checked now (missing paths, unknown forms, unavailable datasets raise
    immediately); the documents themselves are read lazily.
    """
    return documents(cfg, [])


def documents(cfg: CorpusConfig, empty: list[Path]) -> Iterator[str]:
    """``iter_documents``; local files read to the end without any text are added to ``empty``."""
    if cfg.source == "stdlib":
        return iter(_stdlib_documents(cfg.seed))
    if cfg.source.startswith("hf:"):
        return _hf_documents(cfg)
    files = _local_files(cfg.source)
    return itertools.chain.from_iterable(_file_documents(f, cfg, empty) for f in files)


def _file_documents(path: Path, cfg: CorpusConfig, empty: list[Path]) -> Iterator[str]:
    n = 0
    for doc in _READERS[path.suffix](path, cfg):
        n += bool(doc.strip())
        yield doc
    if n == 0:
        empty.append(path)
        log.warning("corpus file %s holds no text (empty or whitespace only)", path)


def split_paragraphs(text: str, max_chars: int = MAX_DOC_CHARS) -> Iterator[str]:
    """Cut ``text`` into pieces of at most ``max_chars``, at blank lines where possible.

    Paragraphs are grouped greedily; a paragraph longer than ``max_chars`` is cut between
    lines, and only a single line longer than that stays over the limit. Leading blank lines
    and trailing whitespace of paragraphs are dropped; indentation is kept.
    """
    return _group(_paragraphs(text, max_chars), max_chars, "\n\n")


def _paragraphs(text: str, max_chars: int) -> Iterator[str]:
    for para in _BLANK_LINES.split(text):
        para = para.lstrip("\n").rstrip()
        if len(para) <= max_chars:
            if para:
                yield para
        else:
            yield from _group(para.split("\n"), max_chars, "\n")


def _group(parts: Iterable[str], max_chars: int, sep: str) -> Iterator[str]:
    """Join consecutive ``parts`` with ``sep`` into chunks of at most ``max_chars``."""
    chunk: list[str] = []
    size = 0
    for part in parts:
        if chunk and size + len(sep) + len(part) > max_chars:
            yield sep.join(chunk)
            chunk, size = [], 0
        size += len(part) + (len(sep) if chunk else 0)
        chunk.append(part)
    if chunk:
        yield sep.join(chunk)


def _stdlib_documents(seed: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    prose = [p for text in _topics(root) for p in split_paragraphs(text)]
    code = [
        p
        for f in _stdlib_sources(root)
        for p in split_paragraphs(f.read_text(encoding="utf-8", errors="replace"))
    ]
    rng = random.Random(seed)
    rng.shuffle(prose)
    rng.shuffle(code)
    n = min(len(prose), len(code))
    return [d for pair in zip(prose, code) for d in pair] + prose[n:] + code[n:]


def _topics(root: Path) -> list[str]:
    """The prose values of ``pydoc_data/topics.py``, read as data (never imported)."""
    path = root / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            topics = ast.literal_eval(node.value)
            return [topics[k] for k in sorted(topics)]
    return []


def _stdlib_sources(root: Path) -> list[Path]:
    """Sorted ``.py`` files of the standard library outside the skipped folders."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    topics = root / "pydoc_data" / "topics.py"
    return sorted(f for f in found if f != topics)


def _local_files(source: str) -> list[Path]:
    """The files a local source names, or a DarkMatterError saying what is wrong."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file()
            and f.suffix in _READERS
            and not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        if not files:
            raise EmptyCorpusError(f"corpus folder {path} holds no .txt, .jsonl or .parquet files")
        return files
    if path.is_file():
        if path.suffix not in _READERS:
            raise DarkMatterError(
                f"corpus file {path}: unsupported type {path.suffix!r}; "
                f"use .txt, .jsonl or .parquet"
            )
        return [path]
    if path.suffix in _READERS or "/" in source or os.sep in source or source[:1] in ".~":
        raise DarkMatterError(f"corpus source not found: {source}")
    raise DarkMatterError(f"unknown corpus source {source!r}; use {SOURCE_FORMS}")


def _decode(raw: bytes, path: Path, errors: str, *, offset: int = 0, lineno: int = 1) -> str:
    """UTF-8 text of ``raw`` (bytes of ``path`` from byte ``offset``, line ``lineno`` on).

    With ``errors="strict"`` a byte that is not UTF-8 raises ``CorpusEncodingError`` naming
    the file, the byte offset and the line; ``"replace"`` reads such bytes as U+FFFD.
    """
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        line = lineno + raw.count(b"\n", 0, err.start)
        hint = " (it starts with a UTF-16 byte-order mark)" if offset == 0 and raw[:2] in (
            b"\xff\xfe", b"\xfe\xff") else ""
        raise CorpusEncodingError(
            f"corpus file {path} is not valid UTF-8{hint}: byte 0x{raw[err.start]:02x} at byte "
            f"offset {offset + err.start} (line {line}) ({err.reason}); convert the file to "
            f"UTF-8, or set harvest.corpus.encoding_errors = \"replace\" to read such bytes as "
            f"U+FFFD"
        ) from None


def _txt_documents(path: Path, cfg: CorpusConfig) -> Iterator[str]:
    yield from split_paragraphs(_decode(path.read_bytes(), path, cfg.encoding_errors))


def _jsonl_documents(path: Path, cfg: CorpusConfig) -> Iterator[str]:
    field = cfg.text_field
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, path, cfg.encoding_errors, offset=offset, lineno=lineno)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DarkMatterError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DarkMatterError(
                    f"{path}, line {lineno}: no field {field!r} (available keys: {keys}); "
                    f"set the corpus text_field"
                )
            yield from _as_text(record[field], f"{path}, line {lineno}")


def _parquet_documents(path: Path, cfg: CorpusConfig) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DarkMatterError(f"{path}: not a readable parquet file ({exc})") from None
    columns, field = pf.schema_arrow.names, cfg.text_field
    if field not in columns:
        raise DarkMatterError(
            f"{path}: no column {field!r} (columns: {columns}); set the corpus text_field"
        )
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield from _as_text(value, f"{path}, row {row}")


def _hf_documents(cfg: CorpusConfig) -> Iterator[str]:
    name, _, config = cfg.source.removeprefix("hf:").partition(":")
    if not name:
        raise DarkMatterError(f"corpus source {cfg.source!r} names no dataset; use {SOURCE_FORMS}")
    try:
        import datasets
    except ImportError:
        raise DarkMatterError(
            "hf: corpus sources need the datasets package: pip install 'sae-darkmatter[hf]'"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=cfg.split, streaming=True)
    except Exception as exc:  # datasets raises many kinds: offline, missing, bad config
        raise DarkMatterError(
            f"cannot load Hugging Face dataset {cfg.source!r} (split {cfg.split!r}): "
            f"{type(exc).__name__}: {exc}. When offline (HF_HUB_OFFLINE=1) or the dataset is not "
            f"available, save it as a .jsonl or .parquet file and pass that path instead."
        ) from exc
    return _hf_records(ds, cfg)


def _hf_records(ds: Iterable[dict[str, Any]], cfg: CorpusConfig) -> Iterator[str]:
    for row, record in enumerate(ds, 1):
        if cfg.text_field not in record:
            raise DarkMatterError(
                f"{cfg.source}, row {row}: no field {cfg.text_field!r} "
                f"(available keys: {sorted(record)}); set the corpus text_field"
            )
        yield from _as_text(record[cfg.text_field], f"{cfg.source}, row {row}")


def _as_text(value: Any, where: str) -> Iterator[str]:
    """Yield ``value`` when it is a string; skip nulls; reject other types."""
    if value is None:
        return
    if not isinstance(value, str):
        raise DarkMatterError(f"{where}: text field holds {type(value).__name__}, not a string")
    yield value


_READERS: dict[str, Callable[[Path, CorpusConfig], Iterator[str]]] = {
    ".txt": _txt_documents,
    ".jsonl": _jsonl_documents,
    ".parquet": _parquet_documents,
}


def corpus_fingerprint(cfg: CorpusConfig) -> str:
    """A stable hash of the config and of what the source holds now.

    Local files contribute their paths, sizes and modification times; ``stdlib`` the Python
    version and library path. (The tokenizer is the model's part of a cache key.)
    """
    if cfg.source == "stdlib":
        state: Any = [sys.version, sysconfig.get_paths()["stdlib"]]
    elif cfg.source.startswith("hf:"):
        state = None
    else:
        files = _local_files(cfg.source)
        state = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return fingerprint(cfg, _FORMAT_VERSION, state)
