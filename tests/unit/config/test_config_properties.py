"""Property-based tests (hypothesis) of config files: dict and TOML round trips, fingerprints
that ignore key order, and typo hints for unknown keys."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import random
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sae_darkmatter.config import (
    CorpusConfig,
    DecomposeConfig,
    HarvestConfig,
    ModelConfig,
    PursuitConfig,
    RunConfig,
    SAETrainConfig,
    SplitConfig,
    TokenFilter,
    fingerprint,
    from_dict,
    load_toml,
    to_dict,
)
from sae_darkmatter.errors import ConfigError

FAST = settings(max_examples=40, deadline=None)

# ---------------------------------------------------------------------------------------- config

# Printable text only: TOML basic strings forbid raw control characters and surrogates.
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
POS_INT = st.integers(1, 10**9)
SEED = st.integers(0, 2**63 - 1)  # TOML integers are signed 64-bit


@st.composite
def run_configs(draw: st.DrawFn) -> RunConfig:
    """A RunConfig with a generated subset of fields (nested tables, tuples, floats, unions)."""
    arch = draw(st.sampled_from(SAETrainConfig.ARCHITECTURES))
    coefs = st.lists(st.floats(1e-6, 1e3), min_size=1, max_size=3).map(tuple)
    train = SAETrainConfig(
        architecture=arch,
        widths=tuple(draw(st.lists(st.integers(1, 2**20), min_size=1, max_size=4))),
        ks=tuple(draw(st.lists(st.integers(1, 512), min_size=1, max_size=3))),
        l1_coefficients=draw(coefs),
        l0_coefficients=draw(coefs),
        train_tokens=draw(POS_INT),
        lr=draw(st.none() | st.floats(1e-8, 1.0)),
        seed=draw(SEED),
    )
    harvest = HarvestConfig(
        model=ModelConfig(name=draw(TEXT), trust_remote_code=draw(st.booleans())),
        corpus=CorpusConfig(source=draw(TEXT), n_contexts=draw(POS_INT),
                            context_length=draw(st.integers(65, 4096)), seed=draw(SEED)),
        hooks=tuple(draw(st.lists(TEXT, max_size=3))),
        with_loss=draw(st.booleans()),
    )
    split = SplitConfig(
        filter=TokenFilter(skip_positions=draw(st.integers(0, 64)),
                           max_norm_ratio=draw(st.none() | st.floats(1.0, 1e3))),
        sae_train_fraction=draw(st.floats(0.0, 1.0, exclude_max=True)),
        seed=draw(SEED),
    )
    return RunConfig(
        harvest=harvest,
        split=split,
        train=train,
        # a ridge must be finite (the config rejects inf and NaN)
        decompose=DecomposeConfig(
            ridge=draw(st.floats(0.0, allow_nan=False, allow_infinity=False))
        ),
        pursuit=PursuitConfig(
            method=draw(st.sampled_from(["gp", "mp", "omp"])),
            l0=draw(st.integers(1, 256) | st.just("match")),
            max_tokens=draw(POS_INT),
        ),
        saes=tuple(draw(st.lists(TEXT, max_size=2))),
    )


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "inf" if v == math.inf else repr(v)  # repr is round-trip exact and valid TOML
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON escapes of '"' and '\\' are valid TOML
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def _to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Hand-written TOML for a nested dict of plain values; ``None`` (no TOML value) is left out."""
    lines = [
        f"{k} = {_toml_value(v)}"
        for k, v in data.items()
        if v is not None and not isinstance(v, dict)
    ]
    text = (f"[{prefix}]\n" if prefix and lines else "") + "".join(line + "\n" for line in lines)
    for k, v in data.items():
        if isinstance(v, dict):
            text += _to_toml(v, f"{prefix}.{k}" if prefix else k)
    return text


def _without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {
        k: _without_none(v) if isinstance(v, dict) else v for k, v in data.items() if v is not None
    }


def _shuffled(data: Any, rnd: random.Random) -> Any:
    """The same nested dict with every level's keys in a random insertion order."""
    if not isinstance(data, dict):
        return data
    keys = list(data)
    rnd.shuffle(keys)
    return {k: _shuffled(data[k], rnd) for k in keys}


@FAST
@given(cfg=run_configs())
def test_config_dict_round_trip(cfg: RunConfig) -> None:
    data = to_dict(cfg)
    assert from_dict(RunConfig, data) == cfg
    assert to_dict(from_dict(RunConfig, data)) == data
    assert fingerprint(from_dict(RunConfig, data)) == fingerprint(cfg)


@FAST
@given(cfg=run_configs())
def test_config_toml_round_trip(cfg: RunConfig) -> None:
    assume(cfg.split.filter.max_norm_ratio is not None)  # None has no TOML spelling (default 5.0)
    text = _to_toml(to_dict(cfg))
    assert tomllib.loads(text) == _without_none(
        to_dict(cfg)
    )  # the hand-written TOML itself is right
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.toml"
        path.write_text(text, encoding="utf-8")
        loaded = load_toml(path)
    assert loaded == cfg
    assert fingerprint(loaded) == fingerprint(cfg)


@FAST
@given(cfg=run_configs(), rnd=st.randoms(use_true_random=False))
def test_fingerprint_ignores_key_order(cfg: RunConfig, rnd: random.Random) -> None:
    data = to_dict(cfg)
    shuffled = _shuffled(data, rnd)
    assert fingerprint(shuffled) == fingerprint(data) == fingerprint(cfg)
    assert from_dict(RunConfig, shuffled) == cfg
    assert fingerprint(from_dict(RunConfig, shuffled)) == fingerprint(cfg)


# (path of nested tables, config class found there)
TABLES: list[tuple[tuple[str, ...], type]] = [
    ((), RunConfig),
    (("harvest",), HarvestConfig),
    (("harvest", "corpus"), CorpusConfig),
    (("split",), SplitConfig),
    (("split", "filter"), TokenFilter),
    (("train",), SAETrainConfig),
    (("pursuit",), PursuitConfig),
]


@st.composite
def one_edit(draw: st.DrawFn, word: str) -> str:
    """``word`` after one insertion, deletion, substitution or adjacent transposition."""
    letters = st.sampled_from("abcdefghijklmnopqrstuvwxyz_0123456789")
    kind = draw(st.sampled_from(["insert", "delete", "substitute", "transpose"]))
    if kind == "insert":
        i = draw(st.integers(0, len(word)))
        return word[:i] + draw(letters) + word[i:]
    if kind == "delete":
        i = draw(st.integers(0, len(word) - 1))
        return word[:i] + word[i + 1 :]
    if kind == "substitute":
        i = draw(st.integers(0, len(word) - 1))
        return word[:i] + draw(letters) + word[i + 1 :]
    i = draw(st.integers(0, len(word) - 2))
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


@FAST
@given(data=st.data())
def test_unknown_key_suggests_the_valid_one(data: st.DataObject) -> None:
    path, cls = data.draw(st.sampled_from(TABLES))
    valid = [f.name for f in dataclasses.fields(cls)]
    key = data.draw(st.sampled_from(valid))
    bad = data.draw(one_edit(key))
    assume(bad not in valid)
    raw: dict[str, Any] = {bad: 1}
    for name in reversed(path):
        raw = {name: raw}
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, raw)
    msg = str(info.value)
    assert f"unknown key(s) [{bad!r}] for {cls.__name__}" in msg
    assert all(repr(v) in msg for v in valid)  # the valid keys are listed
    close = difflib.get_close_matches(bad, valid, n=1)
    if close:
        assert f"{bad!r} -> did you mean {close[0]!r}?" in msg
    else:
        assert "did you mean" not in msg
    # Keys of one edit from a valid key of >= 4 characters are always close enough for difflib.
    if len(key) >= 4:
        assert close and f"did you mean {close[0]!r}" in msg
