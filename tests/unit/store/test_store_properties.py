"""Property-based tests (hypothesis) of the activation store: exact round trips."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sae_darkmatter.store import ActivationStore

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
