"""ActivationStore: round trips against numpy, plain-safetensors readability, crash safety,
corruption detection, error messages and bounded memory."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file as torch_load_file

from helpers import flip_byte
from sae_darkmatter.errors import (
    CorruptStoreError,
    DarkMatterError,
    HookError,
    ShapeMismatchError,
)
from sae_darkmatter.store import ActivationStore

T = 4
HOOKS = {"resid_post.1": 8, "mlp_out.1": 5}
META = {
    "model": "tiny",
    "corpus": {"source": "stdlib", "seed": 0},
    "hooks": ["resid_post.1", "mlp_out.1"],
}
BATCHES = [3, 1, 5, 2]  # contexts per append -> shards of 12, 4, 20, 8 rows


def make_batch(rng: np.random.Generator, b: int, with_loss: bool = True) -> dict:
    return {
        "acts": {h: rng.standard_normal((b, T, d), dtype=np.float32) for h, d in HOOKS.items()},
        "tokens": rng.integers(0, 50_000, (b, T)),
        "loss": rng.random((b, T), dtype=np.float32) if with_loss else None,
    }


def fill(
    path: Path, dtype: str = "float32", batches: list[int] = BATCHES
) -> tuple[ActivationStore, list[dict]]:
    """Append ``batches`` (the second without loss; one as torch tensors) and return what was
    written."""
    rng = np.random.default_rng(0)
    store = ActivationStore.create_or_resume(
        path, hooks=HOOKS, context_length=T, meta=META, dtype=dtype
    )
    written = []
    for i, b in enumerate(batches):
        batch = make_batch(rng, b, with_loss=i != 1)
        if i == 2:  # tensors are accepted as well as arrays
            batch["acts"] = {h: torch.from_numpy(x) for h, x in batch["acts"].items()}
        store.append(context_start=store.committed_contexts, **batch)
        written.append(batch)
    return store, written


def expected(written: list[dict]) -> dict[str, np.ndarray]:
    """The flat per-row arrays the store should return, built independently with numpy."""
    out: dict[str, list[np.ndarray]] = {
        k: [] for k in [*HOOKS, "tokens", "position", "context", "loss"]
    }
    ctx = 0
    for w in written:
        b = w["tokens"].shape[0]
        for h, d in HOOKS.items():
            out[h].append(np.asarray(w["acts"][h]).reshape(b * T, d))
        out["tokens"].append(w["tokens"].reshape(-1))
        out["position"].append(np.tile(np.arange(T), b))
        out["context"].append(np.repeat(np.arange(ctx, ctx + b), T))
        out["loss"].append(np.full(b * T, np.nan) if w["loss"] is None else w["loss"].reshape(-1))
        ctx += b
    return {k: np.concatenate(v) for k, v in out.items()}


def test_round_trip_columns_chunks_gather(tmp_path):
    store, written = fill(tmp_path / "s")
    exp = expected(written)
    n = sum(BATCHES) * T
    assert (store.n_rows, store.committed_contexts, len(store)) == (n, sum(BATCHES), n)

    st = ActivationStore.open(tmp_path / "s")
    assert (st.n_rows, st.hooks, st.meta, st.context_length, st.dtype) == (
        n,
        HOOKS,
        META,
        T,
        "float32",
    )
    for name in ["tokens", "position", "context"]:
        np.testing.assert_array_equal(st.column(name), exp[name])
    assert st.column("tokens").dtype == np.int32 and st.column("context").dtype == np.int64
    np.testing.assert_array_equal(
        st.column("loss"), exp["loss"].astype(np.float32)
    )  # NaN == NaN here
    assert np.isnan(st.column("loss")[12:16]).all() and not np.isnan(st.column("loss")[:12]).any()

    hook = "resid_post.1"
    # chunk_rows=7 does not divide any shard (12, 4, 20, 8 rows), so chunks straddle shards
    chunks = list(st.iter_chunks(hook, chunk_rows=7))
    assert [len(r) for r, _ in chunks] == [7] * 6 + [2]
    rows = np.concatenate([r for r, _ in chunks])
    np.testing.assert_array_equal(rows, np.arange(n))
    got = torch.cat([x for _, x in chunks])
    assert got.dtype == torch.float32 and got.shape == (n, 8)
    np.testing.assert_array_equal(got.numpy(), exp[hook])

    sel = np.sort(np.random.default_rng(1).choice(n, 23, replace=False))
    sel = np.union1d(sel, [0, 11, 12, 15, 16, n - 1])  # shard edges
    chunks = list(st.iter_chunks("mlp_out.1", rows=sel, chunk_rows=5))
    assert all(len(r) == 5 for r, _ in chunks[:-1]) and 0 < len(chunks[-1][0]) <= 5
    np.testing.assert_array_equal(np.concatenate([r for r, _ in chunks]), sel)
    np.testing.assert_array_equal(torch.cat([x for _, x in chunks]).numpy(), exp["mlp_out.1"][sel])
    assert list(st.iter_chunks(hook, rows=np.array([], dtype=np.int64))) == []

    order = np.random.default_rng(2).integers(0, n, 50)  # any order, repeats allowed
    np.testing.assert_array_equal(st.gather(hook, order).numpy(), exp[hook][order])
    assert st.gather(hook, np.array([], dtype=np.int64)).shape == (0, 8)


def test_bfloat16_store_returns_float32(tmp_path):
    store, written = fill(tmp_path / "s", dtype="bfloat16")
    exp = expected(written)["resid_post.1"]
    want = torch.from_numpy(exp).to(torch.bfloat16).float().numpy()
    assert not np.array_equal(want, exp)  # the rounding is real, so the check below means something
    got = torch.cat(
        [
            x
            for _, x in ActivationStore.open(tmp_path / "s").iter_chunks(
                "resid_post.1", chunk_rows=9
            )
        ]
    )
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want)
    rows = np.array([40, 3, 3, 17])
    np.testing.assert_array_equal(store.gather("resid_post.1", rows).numpy(), want[rows])
    raw = torch_load_file(tmp_path / "s" / "shard_000000.safetensors")
    assert raw["resid_post.1"].dtype == torch.bfloat16


def test_shards_readable_with_plain_safetensors(tmp_path):
    _, written = fill(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format"] == "sae-darkmatter-store" and manifest["hooks"] == HOOKS
    assert [s["contexts"] for s in manifest["shards"]] == [[0, 3], [3, 4], [4, 9], [9, 11]]
    entry = manifest["shards"][2]
    shard = tmp_path / "s" / entry["file"]
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == entry["sha256"]
    data = np_load_file(shard)
    w = written[2]
    np.testing.assert_array_equal(
        data["resid_post.1"], np.asarray(w["acts"]["resid_post.1"]).reshape(20, 8)
    )
    np.testing.assert_array_equal(data["tokens"], w["tokens"].reshape(-1))
    np.testing.assert_array_equal(data["context"], np.repeat(np.arange(4, 9), T))
    np.testing.assert_array_equal(data["position"], np.tile(np.arange(T), 5))


def test_crash_leftovers_are_ignored_then_replaced(tmp_path):
    path = tmp_path / "s"
    fill(path, batches=[2, 3])
    # a crash after the shard rename but before the manifest commit leaves a valid unlisted shard;
    # a crash during the write leaves a temp file
    shutil.copy(path / "shard_000000.safetensors", path / "shard_000002.safetensors")
    (path / "shard_000007.safetensors").write_bytes(b"garbage")
    (path / ".shard_000002.safetensors.x1y2.tmp").write_bytes(b"partial")

    reader = ActivationStore.open(path)
    assert reader.n_rows == 20
    np.testing.assert_array_equal(reader.column("context"), np.repeat(np.arange(5), T))

    store = ActivationStore.create_or_resume(path, hooks=HOOKS, context_length=T, meta=META)
    assert sorted(p.name for p in path.iterdir()) == [
        ".writer.lock", "manifest.json", "shard_000000.safetensors", "shard_000001.safetensors"]
    batch = make_batch(np.random.default_rng(5), 2)
    store.append(context_start=5, **batch)
    again = ActivationStore.open(path)
    assert again.committed_contexts == 7
    again.verify()
    np.testing.assert_array_equal(again.gather("mlp_out.1", np.arange(20, 28)).numpy(),
                                  batch["acts"]["mlp_out.1"].reshape(8, 5))


def test_append_must_be_contiguous_and_writable(tmp_path):
    store, _ = fill(tmp_path / "s", batches=[2])
    batch = make_batch(np.random.default_rng(0), 1)
    for start in (0, 3):
        with pytest.raises(DarkMatterError, match="not contiguous.*2 committed contexts"):
            store.append(context_start=start, **batch)
    with pytest.raises(DarkMatterError, match="read-only"):
        ActivationStore.open(tmp_path / "s").append(context_start=2, **batch)
    assert ActivationStore.open(tmp_path / "s").committed_contexts == 2


def test_resume_checks_settings(tmp_path):
    path = tmp_path / "s"
    fill(path, batches=[2])
    meta_tuple = {
        **META,
        "hooks": tuple(META["hooks"]),
    }  # JSON round trip makes this a list: same settings
    resumed = ActivationStore.create_or_resume(path, hooks=HOOKS, context_length=T, meta=meta_tuple)
    assert resumed.committed_contexts == 2
    resumed.finish()  # one writer at a time, also within a process
    other = {**META, "corpus": {"source": "stdlib", "seed": 1}}
    with pytest.raises(
        DarkMatterError, match=r"meta\.corpus\.seed: 0 != 1.*new store path or delete"
    ):
        ActivationStore.create_or_resume(path, hooks=HOOKS, context_length=T, meta=other)
    with pytest.raises(DarkMatterError, match="context_length: 4 != 8"):
        ActivationStore.create_or_resume(path, hooks=HOOKS, context_length=8, meta=META)
    with pytest.raises(DarkMatterError, match="dtype"):
        ActivationStore.create_or_resume(
            path, hooks=HOOKS, context_length=T, meta=META, dtype="bfloat16"
        )
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(DarkMatterError, match="todo.txt"):
        ActivationStore.create_or_resume(
            tmp_path / "notes", hooks=HOOKS, context_length=T, meta=META
        )


def test_corrupt_shard_detected_by_verify_and_on_read(tmp_path):
    path = tmp_path / "s"
    fill(path)
    ActivationStore.open(path).verify()
    # corruption happens later than the write: make sure the mtime says so
    flip_byte(path / "shard_000002.safetensors", 10, later_mtime=True)
    with pytest.raises(CorruptStoreError, match="shard_000002.safetensors"):
        ActivationStore.open(path).verify()
    reader = ActivationStore.open(path)
    with pytest.raises(CorruptStoreError, match="shard_000002.safetensors.*sha256"):
        list(reader.iter_chunks("resid_post.1", chunk_rows=100))
    with pytest.raises(CorruptStoreError, match="shard_000002.safetensors"):
        reader.gather("resid_post.1", np.array([20]))
    # rows of intact shards stay readable
    assert reader.gather("resid_post.1", np.array([0, 13])).shape == (2, 8)

    unchecked = ActivationStore.open(
        path, verify_reads=False
    )  # size + header only: the flip passes
    assert unchecked.gather("resid_post.1", np.array([20])).shape == (1, 8)
    with pytest.raises(CorruptStoreError, match="shard_000002.safetensors"):
        unchecked.verify()


def test_truncated_or_missing_files(tmp_path):
    path = tmp_path / "s"
    fill(path)
    shard = path / "shard_000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CorruptStoreError, match="shard_000001.safetensors has .* bytes"):
        ActivationStore.open(path, verify_reads=False).column("tokens")
    shard.unlink()
    with pytest.raises(CorruptStoreError, match="shard_000001.safetensors .* missing"):
        ActivationStore.open(path).verify()

    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    for opener in (
        lambda: ActivationStore.open(path),
        lambda: ActivationStore.create_or_resume(path, hooks=HOOKS, context_length=T, meta=META),
    ):
        with pytest.raises(CorruptStoreError, match="manifest.json"):
            opener()
    with pytest.raises(CorruptStoreError, match="manifest.json is missing"):
        ActivationStore.open(tmp_path / "nowhere")


def test_shape_and_hook_errors(tmp_path):
    store, _ = fill(tmp_path / "s", batches=[1])
    rng = np.random.default_rng(0)
    batch = make_batch(rng, 2)
    bad = dict(batch, acts={**batch["acts"], "resid_post.1": rng.standard_normal((2, T, 7))})
    with pytest.raises(ShapeMismatchError, match=r"width 7 .* width 8"):
        store.append(context_start=1, **bad)
    with pytest.raises(ShapeMismatchError, match=r"tokens must be \[B, 4\]"):
        store.append(context_start=1, **dict(batch, tokens=batch["tokens"][:, :3]))
    with pytest.raises(ShapeMismatchError, match="loss"):
        store.append(context_start=1, **dict(batch, loss=batch["loss"][:1]))
    with pytest.raises(HookError, match="unknown: \\['attn_out.1'\\]"):
        store.append(
            context_start=1,
            **dict(batch, acts={**batch["acts"], "attn_out.1": batch["acts"]["mlp_out.1"]}),
        )
    assert store.committed_contexts == 1  # nothing was committed by the failed appends
    for call in (lambda: store.d("attn_out.3"), lambda: list(store.iter_chunks("attn_out.3")),
                 lambda: store.gather("attn_out.3", np.array([0]))):
        with pytest.raises(HookError, match="stored hooks: resid_post.1, mlp_out.1"):
            call()
    assert store.d("mlp_out.1") == 5
    with pytest.raises(DarkMatterError, match="sorted ascending"):
        list(store.iter_chunks("mlp_out.1", rows=np.array([2, 1])))
    with pytest.raises(DarkMatterError, match=r"\[0, 4\)"):
        store.gather("mlp_out.1", np.array([4]))
    with pytest.raises(DarkMatterError, match="columns are tokens"):
        store.column("resid_post.1")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_iter_chunks_memory_is_bounded(tmp_path):
    d, ctx, batches, b = 512, 128, 10, 40  # 10 shards x 5120 rows x 512 floats = 105 MB
    store = ActivationStore.create_or_resume(
        tmp_path / "big", hooks={"h": d}, context_length=ctx, meta={}
    )
    col_sums = np.zeros(d)
    for i in range(batches):
        x = np.random.default_rng(i).standard_normal((b, ctx, d), dtype=np.float32)
        col_sums += x.reshape(-1, d).sum(0, dtype=np.float64)
        store.append(
            context_start=i * b, acts={"h": x}, tokens=np.zeros((b, ctx), np.int64), loss=None
        )
        del x
    store_bytes = store.n_rows * d * 4
    assert store_bytes > 100e6
    reader = ActivationStore.open(tmp_path / "big")
    gc.collect()
    base = _rss_bytes()
    peak, acc, n_chunks = 0, np.zeros(d), 0
    # 1 chunk = 2 MB, 1 shard = 10.5 MB; expected growth ~ one mapped shard + a chunk or two.
    # (Bigger chunks make glibc keep freed blocks, which blurs RSS without being a leak.)
    for _, chunk in reader.iter_chunks("h", chunk_rows=1024):
        acc += chunk.sum(0, dtype=torch.float64).numpy()
        peak = max(peak, _rss_bytes() - base)
        n_chunks += 1
    assert n_chunks == 50
    np.testing.assert_allclose(acc, col_sums, rtol=1e-9, atol=1e-6)
    assert peak < store_bytes / 4, (
        f"RSS grew by {peak / 1e6:.0f} MB reading a {store_bytes / 1e6:.0f} MB store"
    )


def test_bad_arguments_fail_at_call_time(tmp_path):
    store, _ = fill(tmp_path / "s", batches=[1])
    with pytest.raises(HookError):
        store.iter_chunks("nope")  # not deferred to the first next()
    with pytest.raises(DarkMatterError, match="chunk_rows"):
        store.iter_chunks("mlp_out.1", chunk_rows=0)
    with pytest.raises(DarkMatterError, match="1-D integer"):
        store.gather("mlp_out.1", np.array([0.5]))


def test_a_second_writer_gets_a_clear_error_and_the_lock_dies_with_its_holder(tmp_path):
    """Two processes writing one store: the second is refused; SIGKILL of the first frees it."""
    from sae_darkmatter.errors import StoreLockedError

    path = tmp_path / "s"
    fill(path, batches=[2])
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from sae_darkmatter.store import ActivationStore
            s = ActivationStore.create_or_resume({str(path)!r}, hooks={HOOKS!r}, context_length={T},
                                                 meta={META!r})
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match="another process is writing"):
            ActivationStore.create_or_resume(path, hooks=HOOKS, context_length=T, meta=META)
        assert ActivationStore.open(path).committed_contexts == 2  # readers are never blocked
    finally:
        holder.kill()
        holder.wait()
    store = ActivationStore.create_or_resume(path, hooks=HOOKS, context_length=T, meta=META)
    store.append(context_start=2, **make_batch(np.random.default_rng(9), 1))
    store.finish()
    with pytest.raises(DarkMatterError, match="read-only"):
        store.append(context_start=3, **make_batch(np.random.default_rng(9), 1))
    assert ActivationStore.open(path).committed_contexts == 3


def test_staged_shards_commit_in_order_and_survive_a_restart(tmp_path):
    """The distributed-harvest protocol: ranks stage shards in any order, the writer commits the
    contiguous ones, and a restarted writer adopts staged shards instead of deleting them."""
    ref, written = fill(tmp_path / "ref")
    starts = np.cumsum([0, *BATCHES])
    path = tmp_path / "dist"
    writer = ActivationStore.create_or_resume(path, hooks=HOOKS, context_length=T, meta=META)
    rank1 = ActivationStore.open(path)  # another rank: read-only, stages without the lock
    rank1.stage(3, context_start=int(starts[3]), **written[3])
    rank1.stage(1, context_start=int(starts[1]), **written[1])
    assert writer.commit_staged() == 0  # shard 0 is missing: nothing continues the store
    writer.stage(0, context_start=0, **written[0])
    assert writer.commit_staged() == 2 and writer.committed_contexts == starts[2]
    assert writer.is_staged(3) and not writer.is_staged(1)
    writer.finish()
    del writer  # a crash: shard 3 stays staged, shard 2 was never written

    resumed = ActivationStore.create_or_resume(path, hooks=HOOKS, context_length=T, meta=META)
    assert resumed.committed_contexts == starts[2] and resumed.is_staged(3)
    with pytest.raises(DarkMatterError, match="already committed"):
        resumed.stage(1, context_start=int(starts[1]), **written[1])
    resumed.stage(2, context_start=int(starts[2]), **written[2])
    assert resumed.commit_staged() == 2
    resumed.finish()
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (ref.path, path))
    assert a["shards"] == b["shards"]  # byte-identical shards, same manifest entries
    assert sorted(f.name for f in path.iterdir() if not f.name.startswith(".")) == sorted(
        f.name for f in ref.path.iterdir() if not f.name.startswith("."))


def test_stale_staged_files_are_removed(tmp_path):
    """A sidecar for a committed shard (a kill after the commit) or without its shard goes."""
    store, written = fill(tmp_path / "s", batches=[2, 2])
    (store.path / "shard_000000.safetensors.staged.json").write_text("{}")
    (store.path / "shard_000005.safetensors.staged.json").write_text("{}")
    store.finish()
    resumed = ActivationStore.create_or_resume(store.path, hooks=HOOKS, context_length=T, meta=META)
    assert not list(resumed.path.glob("*.staged.json")) and resumed.committed_contexts == 4
    resumed.verify()


def test_staged_shards_of_a_deleted_manifest_are_not_adopted(tmp_path):
    """Deleting manifest.json starts a new store: staged shards left from the old one go."""
    rng = np.random.default_rng(0)
    path = tmp_path / "s"
    store = ActivationStore.create_or_resume(path, hooks=HOOKS, context_length=T, meta=META)
    store.stage(0, context_start=0, **make_batch(rng, 2))
    store.finish()
    (path / "manifest.json").unlink()
    fresh = ActivationStore.create_or_resume(path, hooks=HOOKS, context_length=T, meta={"other": 1})
    assert fresh.committed_contexts == 0
    assert not list(path.glob("shard_*")) and not fresh.is_staged(0)
