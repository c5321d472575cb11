"""The machinery every config dataclass shares: checks, dict/TOML loading, fingerprints.

A config is a frozen dataclass deriving from ``_Checked``, with its field annotations as
strings (``from __future__ import annotations``) in the small vocabulary ``_has_type`` knows:
``str``, ``int``, ``float``, ``bool``, ``None``, unions of them, ``tuple[X, ...]``, fixed
``tuple[X, X]`` and other config classes (tables). Subclasses register themselves by class
name, so a field annotated with a config class name is read as a nested table.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar, cast

from sae_darkmatter.errors import ConfigError, ConfigValueError

T = TypeVar("T")

_CONFIG_TYPES: dict[str, type] = {}  # class name -> config class (filled by _Checked subclasses)


class _Checked:
    """Validation shared by every config: field types, then the class's own range checks.

    Runs whenever a config is built (from a TOML file, the CLI, ``dataclasses.replace`` or
    code), so a bad value fails before any work starts. Errors name the key by its usual TOML
    path (``PATH``; ``from_dict`` substitutes the path it actually read), the expected type or
    range and the value given.
    """

    PATH = ""
    SELF_TYPED: tuple[str, ...] = ()  # fields whose types ``_check`` tests with its own message

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CONFIG_TYPES[cls.__name__] = cls

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            annotation = cast(str, f.type)  # a string: the modules postpone annotations
            if f.name not in self.SELF_TYPED and not _has_type(value, annotation):
                raise ConfigValueError(self.PATH, f.name, _type_error(value, annotation))
        self._check()

    def _check(self) -> None:
        """Ranges and cross-field rules of one class (types are already right)."""

    def _need(self, key: str, ok: bool, expected: str, *, kind: bool = False) -> None:
        if not ok:
            raise ConfigValueError(
                self.PATH, key, f"must be {expected}, got {_show(getattr(self, key), kind=kind)}"
            )


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists).

    Fields marked ``omit_default`` are left out while they hold their default, so adding such
    a field changes no existing fingerprint.
    """
    return json.loads(json.dumps(_plain(cfg)))


def _plain(obj: Any) -> Any:
    if not dataclasses.is_dataclass(obj):
        return obj
    return {
        f.name: _plain(getattr(obj, f.name))
        for f in dataclasses.fields(obj)
        if not (f.metadata.get("omit_default") and getattr(obj, f.name) == _default(f))
    }


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def fingerprint(*parts: Any) -> str:
    """A short stable hash of configs and plain values, for stage caching."""
    blob = json.dumps(
        [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def from_dict(cls: type[T], data: dict[str, Any], *, path: str | None = None,
              base: T | None = None) -> T:
    """Build a (nested) config dataclass from a dict (a TOML file's tables, a saved JSON).

    Unknown keys are named with the valid ones and a close match; a value of the wrong type
    (a string for a list, a table for a number, ...) gets an error naming its key path, the
    expected type and the value. ``path`` is where ``data`` sits in the file (default: the
    class's usual table). A nested table changes only the keys it names of its field's default
    (``[error_saes.train] train_tokens = ...`` keeps the error SAEs' own widths); ``base``
    is that default.
    """
    where = cls.PATH if path is None else path  # type: ignore[attr-defined]
    table = f"table [{where}]" if where else "the top level"
    if not isinstance(data, dict):
        raise ConfigValueError(*_split_key(where), f"must be a table, got {_show(data, kind=True)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hints = [
            f"{key!r} -> did you mean {close[0]!r}?"
            for key in unknown
            if (close := difflib.get_close_matches(key, fields, n=1))
        ]
        raise ConfigError(
            f"unknown key(s) {unknown} for {cls.__name__} in {table}; valid: {sorted(fields)}"
            + (f" ({'; '.join(hints)})" if hints else "")
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        ftype = fields[name].type
        sub = _CONFIG_TYPES.get(ftype) if isinstance(ftype, str) else None
        key = f"{where}.{name}" if where else name
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigValueError(where, name,
                                       f"must be a table [{key}], got {_show(value, kind=True)}")
            default = getattr(base, name) if base is not None else _default(fields[name])
            kwargs[name] = from_dict(sub, value, path=key, base=default)
        else:
            kwargs[name] = _tuples(value, str(ftype))
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)  # type: ignore[type-var]
    except ConfigValueError as err:
        raise err.moved_to(where) from None


def _tuples(value: Any, annotation: str) -> Any:
    """A TOML value with its lists turned into tuples wherever the annotation has a tuple."""
    tuples = [i for part in _split_top(annotation, " | ") if (i := _tuple_items(part))]
    if not tuples or not isinstance(value, list):
        return value
    items = tuples[0]
    if items[-1] == "...":
        return tuple(_tuples(v, items[0]) for v in value)
    if len(value) != len(items):
        return tuple(value)  # the type check reports the wrong length
    return tuple(_tuples(v, a) for v, a in zip(value, items, strict=True))


def read_toml(path: str | Path, cls: type[T]) -> T:
    """Read a ``cls`` config from a TOML file whose top level is that class's table.

    Every error names the file: a missing or unreadable file, text that is not UTF-8 or not
    TOML (with the line and column), and the key errors of ``from_dict``.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}, line "
            f"{line}); TOML files must be UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    try:
        return from_dict(cls, data, path="")
    except ConfigValueError as err:
        raise err.in_file(str(path)) from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------- type checks

_SCALAR_TYPES: dict[str, tuple[str, str]] = {  # annotation -> (singular, plural)
    "str": ("a string", "strings"),
    "int": ("an integer", "integers"),
    "float": ("a number", "numbers"),
    "bool": ("true or false", "booleans"),
}
_DEVICE = re.compile(r"auto|cpu|mps|meta|(cuda|xpu)(:\d+)?")


def _split_top(annotation: str, sep: str) -> list[str]:
    """``annotation`` split at the ``sep`` that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(annotation):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth == 0 and annotation.startswith(sep, i):
            parts.append(annotation[start:i])
            start = i + len(sep)
    return [*parts, annotation[start:]]


def _tuple_items(annotation: str) -> list[str] | None:
    """The item annotations of ``tuple[...]`` (last ``"..."`` for any length), else None."""
    if not (annotation.startswith("tuple[") and annotation.endswith("]")):
        return None
    return _split_top(annotation[len("tuple["):-1], ", ")


def _has_type(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits a config field annotation (as a string)."""
    if annotation in _CONFIG_TYPES:
        return isinstance(value, _CONFIG_TYPES[annotation])
    if len(union := _split_top(annotation, " | ")) > 1:
        return any(_has_type(value, part) for part in union)
    if (items := _tuple_items(annotation)) is not None:
        if not isinstance(value, (tuple, list)):
            return False
        if items[-1] == "...":
            return all(_has_type(v, items[0]) for v in value)
        return len(value) == len(items) and all(map(_has_type, value, items))
    if annotation == "None":
        return value is None
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    raise TypeError(f"config annotation {annotation!r} has no check")


def _describe(annotation: str, *, plural: bool = False) -> str:
    if annotation in _CONFIG_TYPES:
        return "tables" if plural else "a table"
    union = _split_top(annotation, " | ")
    if union[-1] == "None" and len(union) > 1:
        return f"{_describe(' | '.join(union[:-1]))} (or unset)"
    if len(union) > 1:
        return " or ".join(_describe(a) for a in union)
    if (items := _tuple_items(annotation)) is not None:  # homogeneous tuples only
        size = "" if items[-1] == "..." else f"{len(items)} "
        what = f"{size}{_describe(items[0], plural=True)}"
        return f"lists of {what}" if plural else f"a list of {what}"
    return _SCALAR_TYPES[annotation][1 if plural else 0]


def _kind(value: Any) -> str:
    """The TOML name of a value's type."""
    if isinstance(value, bool):
        return "a boolean"
    for types, name in ((int, "an integer"), (float, "a float"), (str, "a string"),
                        ((list, tuple), "a list"), (dict, "a table")):
        if isinstance(value, types):
            return name
    return "nothing" if value is None else f"a {type(value).__name__}"


def _show(value: Any, *, kind: bool = False) -> str:
    """A value as the user wrote it (shortened), with its TOML type when ``kind``."""
    text = repr(_lists(value))
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} ({_kind(value)})" if kind else text


def _lists(value: Any) -> Any:
    """``value`` with its tuples written as lists, the way a TOML file writes them."""
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _type_error(value: Any, annotation: str) -> str:
    """What is wrong with a value of the wrong type, naming the first bad item of a list."""
    got = _show(value, kind=True)
    items = _tuple_items(annotation)
    if items is not None and items[-1] == "..." and isinstance(value, (list, tuple)):
        i, item = next((i, v) for i, v in enumerate(value) if not _has_type(v, items[0]))
        nested = _tuple_items(items[0]) is not None  # "is a list" would not say what is wrong
        what = f"is not {_describe(items[0])}" if nested else f"is {_kind(item)}"
        got = f"{_show(value)} (item {i}, {_show(item)}, {what})"
    elif items is not None and items[-1] == "..." and _has_type(value, items[0]):
        got += f"; write a list, e.g. [{_show(value)}]"
    return f"must be {_describe(annotation)}, got {got}"


def _split_key(path: str) -> tuple[str, str]:
    head, _, last = path.rpartition(".")
    return head, last


def _need_device(cfg: Any) -> None:
    cfg._need("device", bool(_DEVICE.fullmatch(cfg.device)),
              "'auto', 'cpu', 'mps' or 'cuda' / 'cuda:<index>'")
