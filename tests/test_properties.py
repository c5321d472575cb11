"""Property-based tests (hypothesis): config round trips and typo hints, exact store round trips,
and the invariances of the FVU / R² metrics against an independent numpy computation."""

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

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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
from sae_darkmatter.linalg import R2Accumulator, fvu
from sae_darkmatter.store import ActivationStore

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


# ---------------------------------------------------------------------------------------- store

HOOK_NAMES = ["resid_post.3", "mlp_out.3"]
F32 = st.floats(width=32)  # every float32 incl. NaN, ±inf, -0.0 and subnormals: compared bitwise


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@st.composite
def store_plans(draw: st.DrawFn) -> dict[str, Any]:
    """Hooks, context length and a list of batches (0-3 contexts each) with their data."""
    t = draw(st.integers(2, 8))
    hooks = {h: draw(st.integers(1, 6)) for h in HOOK_NAMES[: draw(st.integers(1, 2))]}
    batches = []
    for b in draw(st.lists(st.integers(0, 3), min_size=1, max_size=4)):
        batches.append(
            {
                "acts": {
                    h: draw(hnp.arrays(np.float32, (b, t, d), elements=F32))
                    for h, d in hooks.items()
                },
                "tokens": draw(hnp.arrays(np.int64, (b, t), elements=st.integers(0, 2**31 - 1))),
                "loss": draw(st.none() | hnp.arrays(np.float32, (b, t), elements=F32)),
            }
        )
    return {
        "t": t,
        "hooks": hooks,
        "batches": batches,
        "resume_after": draw(st.integers(0, len(batches))),
    }


def _expected(plan: dict[str, Any]) -> dict[str, np.ndarray]:
    """Flat per-row arrays the store should hold, built with numpy from the written batches."""
    t, out = plan["t"], {k: [] for k in [*plan["hooks"], "tokens", "position", "context", "loss"]}
    ctx = 0
    for batch in plan["batches"]:
        b = batch["tokens"].shape[0]
        for h, d in plan["hooks"].items():
            out[h].append(batch["acts"][h].reshape(b * t, d))
        out["tokens"].append(batch["tokens"].reshape(-1).astype(np.int32))
        out["position"].append(np.tile(np.arange(t, dtype=np.int32), b))
        out["context"].append(np.repeat(np.arange(ctx, ctx + b, dtype=np.int64), t))
        loss = np.full((b, t), np.nan, np.float32) if batch["loss"] is None else batch["loss"]
        out["loss"].append(loss.reshape(-1))
        ctx += b
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in out.items()}


def _check_store(st_: ActivationStore, exp: dict[str, np.ndarray], hooks: dict[str, int],
                 data: st.DataObject) -> None:
    n = len(exp["tokens"])
    assert st_.n_rows == n and st_.hooks == hooks
    for name in ["tokens", "position", "context"]:
        got = st_.column(name)
        assert got.dtype == exp[name].dtype and np.array_equal(got, exp[name])
    assert np.array_equal(_bits(st_.column("loss")), _bits(exp["loss"]))
    for hook, d in hooks.items():
        want = exp[hook].reshape(n, d)
        chunk_rows = data.draw(st.integers(1, 20), label="chunk_rows")
        chunks = list(st_.iter_chunks(hook, chunk_rows=chunk_rows))
        assert all(len(r) == chunk_rows for r, _ in chunks[:-1])
        rows = np.concatenate([r for r, _ in chunks]) if chunks else np.empty(0, np.int64)
        assert np.array_equal(rows, np.arange(n))
        got = torch.cat([x for _, x in chunks]).numpy() if chunks else np.empty((0, d), np.float32)
        assert np.array_equal(_bits(got), _bits(want))
        if n == 0:
            continue
        sel = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1)), label="rows")), np.int64)
        chunks = list(st_.iter_chunks(hook, rows=sel, chunk_rows=chunk_rows))
        got_rows = np.concatenate([r for r, _ in chunks]) if chunks else np.empty(0, np.int64)
        assert np.array_equal(got_rows, sel)
        if chunks:
            assert np.array_equal(
                _bits(torch.cat([x for _, x in chunks]).numpy()), _bits(want[sel])
            )
        order = np.array(
            data.draw(st.lists(st.integers(0, n - 1), max_size=30), label="gather"), np.int64
        )
        assert np.array_equal(_bits(st_.gather(hook, order).numpy()), _bits(want[order]))


@settings(max_examples=25, deadline=None)
@given(plan=store_plans(), data=st.data())
def test_store_round_trip_is_exact(plan: dict[str, Any], data: st.DataObject) -> None:
    meta = {"model": "tiny", "hooks": list(plan["hooks"])}
    exp = _expected(plan)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        store = ActivationStore.create_or_resume(
            path, hooks=plan["hooks"], context_length=plan["t"], meta=meta
        )
        for i, batch in enumerate(plan["batches"]):
            if i == plan["resume_after"]:  # close the writer and resume from disk midway
                store.finish()
                store = ActivationStore.create_or_resume(path, hooks=plan["hooks"],
                                                         context_length=plan["t"], meta=meta)
            store.append(context_start=store.committed_contexts, **batch)
        store.finish()
        assert store.committed_contexts == sum(b["tokens"].shape[0] for b in plan["batches"])
        _check_store(store, exp, plan["hooks"], data)
        reopened = ActivationStore.open(path)
        assert reopened.meta == meta and reopened.context_length == plan["t"]
        _check_store(reopened, exp, plan["hooks"], data)


# ---------------------------------------------------------------------------------------- metrics

# Values are 0 or of magnitude 1e-6..1e3, so squares, sums and power-of-two scalings stay in the
# normal float64 range (no underflow): that makes the power-of-two scaling check exact.
VALUE = st.just(0.0) | st.floats(1e-6, 1e3) | st.floats(-1e3, -1e-6)


@st.composite
def pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """float64 (x, x_hat) of shape [n, d] whose x has a non-negligible spread."""
    n, d = draw(st.integers(2, 40)), draw(st.integers(1, 5))
    x = draw(hnp.arrays(np.float64, (n, d), elements=VALUE))
    x_hat = draw(hnp.arrays(np.float64, (n, d), elements=VALUE))
    assume(_np_sst(x) > 1e-9 * (1.0 + float(np.square(x).sum())))
    return x, x_hat


def _np_sst(x: np.ndarray) -> float:
    return float(np.square(x - x.mean(axis=0)).sum())


def _np_fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Independent reference: Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the per-dimension mean)."""
    return float(np.square(x - x_hat).sum()) / _np_sst(x)


def _tol(x: np.ndarray, x_hat: np.ndarray, shift: float = 0.0) -> float:
    """Absolute tolerance on fvu for inputs perturbed by rounding of ~eps·|entry|.

    A first-order bound with generous constants (eps = 2.2e-16, the 1e-12 factors leave room for
    n <= 40 terms): a perturbation δ of every entry moves SSE by ~2·sqrt(SSE·Σδ²) + Σδ² and SST
    by ~2·sqrt(SST·Σδ²); ``shift`` is the magnitude of a constant added before rounding.
    """
    m = float(np.square(np.abs(x) + np.abs(x_hat) + shift).sum())
    sse, sst = float(np.square(x - x_hat).sum()), _np_sst(x)
    f = sse / sst
    return (
        1e-9 * f + 1e-12 * (math.sqrt(sse * m) + 1e-12 * m) / sst + 1e-12 * f * math.sqrt(m / sst)
    )


def _fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    return fvu(torch.from_numpy(x), torch.from_numpy(x_hat))


@FAST
@given(xs=pairs())
def test_fvu_matches_numpy_and_is_zero_on_itself(xs: tuple[np.ndarray, np.ndarray]) -> None:
    x, x_hat = xs
    assert _fvu(x, x) == 0.0
    assert _fvu(x, x_hat) == pytest.approx(_np_fvu(x, x_hat), rel=0, abs=_tol(x, x_hat))


@FAST
@given(xs=pairs(), data=st.data())
def test_fvu_invariances(xs: tuple[np.ndarray, np.ndarray], data: st.DataObject) -> None:
    x, x_hat = xs
    ref = _fvu(x, x_hat)
    # a common permutation of the tokens: only the summation order changes
    perm = np.array(data.draw(st.permutations(range(len(x))), label="perm"))
    assert _fvu(x[perm], x_hat[perm]) == pytest.approx(ref, rel=0, abs=_tol(x, x_hat))
    # scaling by a power of two is exact in floating point, so the ratio is bit-identical
    k = data.draw(st.integers(-10, 10), label="log2 c")
    assert _fvu(x * 2.0**k, x_hat * 2.0**k) == ref
    # any c > 0: each scaled entry is rounded once
    c = data.draw(st.floats(1e-3, 1e3), label="c")
    assert _fvu(x * c, x_hat * c) == pytest.approx(ref, rel=0, abs=_tol(x, x_hat))
    # adding the same vector v to both: entries are rounded at the magnitude of x + v
    v = data.draw(hnp.arrays(np.float64, (x.shape[1],), elements=st.floats(-1e3, 1e3)), label="v")
    shift = float(np.abs(v).max())
    assert _fvu(x + v, x_hat + v) == pytest.approx(ref, rel=0, abs=_tol(x, x_hat, shift))


@FAST
@given(xs=pairs(), data=st.data())
def test_r2_accumulator_chunking_does_not_matter(
    xs: tuple[np.ndarray, np.ndarray], data: st.DataObject
) -> None:
    x, x_hat = xs
    n, d = x.shape
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1)), label="cuts"))
    one = R2Accumulator(d)
    one.update(torch.from_numpy(x), torch.from_numpy(x_hat))
    many = R2Accumulator(d)
    for lo, hi in zip([0, *cuts], [*cuts, n]):
        many.update(torch.from_numpy(x[lo:hi]), torch.from_numpy(x_hat[lo:hi]))
    assert many.n == one.n == n
    # Both accumulators keep the same sums up to the summation order and their reference row
    # (the first chunk's median): rel 1e-9 on top of the rounding bound.
    assert many.fvu() == pytest.approx(one.fvu(), rel=1e-9, abs=_tol(x, x_hat))
    assert many.sse() == pytest.approx(one.sse(), rel=1e-9)
    assert many.sst() == pytest.approx(one.sst(), rel=1e-9, abs=1e-12 * float(np.square(x).sum()))
    assert one.fvu() == pytest.approx(_np_fvu(x, x_hat), rel=0, abs=_tol(x, x_hat))
