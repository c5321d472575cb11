"""Streaming decomposition (no activation store): agreement with the store path, constant state
size, resume after SIGKILL, the CLI command, bad input, and two torchrun ranks."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from helpers import BIN, offline_env, run_ok
from sae_darkmatter.cli import app
from sae_darkmatter.config import (
    CorpusConfig,
    DecomposeConfig,
    HarvestConfig,
    ModelConfig,
    SAETrainConfig,
    SplitConfig,
    TokenFilter,
)
from sae_darkmatter.contexts import special_token_ids
from sae_darkmatter.decompose import Decomposition, decompose_many
from sae_darkmatter.errors import (
    ConfigValueError,
    DarkMatterError,
    NonFiniteError,
    ShapeMismatchError,
)
from sae_darkmatter.harvest import harvest
from sae_darkmatter.models import load_model
from sae_darkmatter.saes import TopKSAE, save_sae, train_sae
from sae_darkmatter.splits import Selection, Splits
from sae_darkmatter.stream import split_contexts, stream_decompose

HOOK = "resid_post.2"
runner = CliRunner()


def _saes() -> dict[str, TopKSAE]:
    return {f"topk-w{w}-k{k}": TopKSAE(64, w, k, generator=torch.Generator().manual_seed(w))
            for w, k in ((128, 8), (256, 16))}


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(ModelConfig(name=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def sae_dirs(tiny_model_dir, tmp_path_factory) -> list[Path]:
    """The two SAEs as SAELens folders naming the tiny model and hook, plus one too narrow."""
    root = tmp_path_factory.mktemp("saes")
    meta = {"model_name": str(tiny_model_dir), "hook_name": HOOK, "context_size": 16}
    for name, sae in _saes().items():
        save_sae(sae, root / name, metadata=meta)
    save_sae(TopKSAE(32, 64, 4), root / "narrow", metadata=meta)
    return [root / name for name in _saes()] + [root / "narrow"]


def _harvest_cfg(
    model_dir: Path, n_contexts: int, context_length: int = 32, batch: int = 4
) -> HarvestConfig:
    return HarvestConfig(
        model=ModelConfig(name=str(model_dir)),
        corpus=CorpusConfig(n_contexts=n_contexts, context_length=context_length),
        hooks=(HOOK,),
        batch_size=batch,
        contexts_per_shard=4 * batch,
        with_loss=False,
    )


def test_agrees_with_harvest_then_decompose_many(lm, tiny_model_dir, tmp_path):
    """Same contexts through the store path, with the streaming split's rows and fixed norm
    threshold: every metric and probe agrees."""
    h = _harvest_cfg(tiny_model_dir, 48)
    split = SplitConfig(
        filter=TokenFilter(skip_positions=1, max_norm_ratio=1.3), probe_train_fraction=0.5, seed=3
    )
    cfg = DecomposeConfig(device="cpu")
    saes = _saes()
    streamed = stream_decompose(h, saes, split, cfg, lm=lm, progress=False)

    store = harvest(h, tmp_path / "store", lm=lm, progress=False)
    ctx, pos, tok = (store.column(c) for c in ("context", "position", "tokens"))
    norms = np.concatenate([x.norm(dim=1).numpy() for _, x in store.iter_chunks(HOOK)])
    first = streamed["topk-w128-k8"]
    rules = (pos >= 1) & ~np.isin(tok, special_token_ids(lm.tokenizer))
    # the calibration median (probe-train tokens) is near the store path's global median
    assert first.median_norm == pytest.approx(float(np.median(norms[rules])), rel=0.05)
    assert first.norm_threshold == 1.3 * first.median_norm
    keep = rules & ~(norms > first.norm_threshold)
    order = np.random.default_rng(3).permutation(48)  # the documented split, derived independently
    np.testing.assert_array_equal(np.concatenate(split_contexts(48, split)), order)
    train, test = keep & np.isin(ctx, order[:24]), keep & np.isin(ctx, order[24:])
    assert first.data == {
        "tokens_total": 48 * 32, "excluded_positions": 48,
        "excluded_special_tokens": int(((pos >= 1) & ~rules).sum()),
        "excluded_norm_outliers": int((rules & ~keep).sum()),
        "probe_train_tokens": int(train.sum()), "probe_test_tokens": int(test.sum()),
        "probe_train_contexts": 24, "probe_test_contexts": 24,
    }
    assert first.data["excluded_norm_outliers"] > 0 and first.data["excluded_special_tokens"] > 0
    selection = Selection(np.flatnonzero(keep), ctx.size, 48, first.data["excluded_special_tokens"],
                          first.data["excluded_norm_outliers"], first.median_norm)
    splits = Splits(selection, np.zeros(0, np.int64), np.flatnonzero(train), np.flatnonzero(test))
    reference = decompose_many(store, saes, splits, cfg, hook=HOOK, progress=False)

    for name, ref in reference.items():
        got = streamed[name]
        for f in dataclasses.fields(Decomposition):
            a, b = getattr(got.metrics, f.name), getattr(ref.metrics, f.name)
            if f.name == "ci":
                continue
            if isinstance(b, float) and f.name != "ridge":
                # Same float32 activations; the float64 summation order (batches of 4 contexts vs
                # one chunk) differs, and float32 GEMM blocking may (measured here: <= 2e-15, the
                # SAE rows came out bit-equal; float32 blocking would give ~1e-7). One lost row
                # of ~740 moves the sums by ~1e-3.
                assert a == pytest.approx(b, rel=1e-6, abs=1e-9), (name, f.name)
            else:
                assert a == b, (name, f.name)
        # the jackknife groups differ (test contexts here, test tokens there): both intervals
        # bracket the estimate; whole contexts give ~2.8x wider ones here (correlated tokens)
        lo, hi = got.metrics.ci["r2_error_mean_dim"]
        rlo, rhi = ref.metrics.ci["r2_error_mean_dim"]
        assert lo < got.metrics.r2_error_mean_dim < hi and 0.2 < (hi - lo) / (rhi - rlo) < 5
        assert set(got.metrics.ci) == {"r2_error_mean_dim"}  # no per-token values, no bootstraps
        for probe in ("error_probe", "norm_probe"):
            for part in ("weight", "bias"):
                np.testing.assert_allclose(
                    getattr(getattr(got, probe), part),
                    getattr(getattr(ref, probe), part),
                    rtol=1e-5,
                    atol=1e-6 * float(getattr(ref, probe).weight.abs().max()),
                )


def _state_layout(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: (tuple(fh.get_tensor(k).shape), fh.get_tensor(k).dtype) for k in fh.keys()}  # noqa: SIM118


def test_state_size_does_not_grow_with_tokens(lm, tiny_model_dir, tmp_path):
    sizes, layouts, totals = [], [], []
    for n in (64, 128):
        folder = tmp_path / f"n{n}"
        res = stream_decompose(_harvest_cfg(tiny_model_dir, n, context_length=16, batch=8), _saes(),
                               checkpoint=folder, lm=lm, progress=False)
        (ckpt,) = folder.glob("*.safetensors")
        layouts.append(_state_layout(ckpt))
        sizes.append(ckpt.stat().st_size)
        totals.append(res["topk-w128-k8"].data["tokens_total"])
    assert totals == [64 * 16, 128 * 16]
    assert layouts[0] == layouts[1]  # the same tensors, shapes and dtypes at twice the tokens
    assert abs(sizes[0] - sizes[1]) < 64  # only the JSON header's digits may differ


def test_damaged_or_finished_checkpoint(lm, tiny_model_dir, tmp_path, caplog):
    h = _harvest_cfg(tiny_model_dir, 16, context_length=16)
    clean = stream_decompose(h, _saes(), lm=lm, progress=False)
    (tmp_path / "stream.rank0-of-1.safetensors").write_bytes(b"\x00" * 100)
    with caplog.at_level(logging.WARNING):
        redone = stream_decompose(h, _saes(), checkpoint=tmp_path, lm=lm, progress=False)
    assert "cannot read checkpoint" in caplog.text
    finished = stream_decompose(
        h, _saes(), checkpoint=tmp_path, lm=lm, progress=False
    )  # nothing left to do
    for name, r in clean.items():
        assert redone[name].metrics == r.metrics == finished[name].metrics
        assert torch.equal(finished[name].error_probe.weight, r.error_probe.weight)


def test_bad_input(lm, tiny_model_dir, sae_dirs, tmp_path):
    h = _harvest_cfg(tiny_model_dir, 8)
    with pytest.raises(
        ShapeMismatchError, match=r"d_in 32 but hook 'resid_post.2' of model .* has width 64"
    ):
        stream_decompose(h, {"narrow": TopKSAE(32, 64, 4)}, lm=lm, progress=False)
    res = runner.invoke(
        app, ["stream", "--sae", str(sae_dirs[2]), "--n-contexts", "8", "-o", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "has d_in 32 but hook 'resid_post.2'" in " ".join(
        res.output.split()
    )
    with pytest.raises(DarkMatterError, match="cannot split 1 context"):
        stream_decompose(_harvest_cfg(tiny_model_dir, 1), _saes(), lm=lm, progress=False)
    with pytest.raises(DarkMatterError, match="no probe-train context"):
        split_contexts(10, SplitConfig(probe_train_fraction=0.01))
    with pytest.raises(DarkMatterError, match="no probe-test context"):
        split_contexts(10, SplitConfig(probe_train_fraction=0.99))
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ConfigValueError, match="probe_train_fraction"):
            SplitConfig(probe_train_fraction=bad)
    nan_lm = load_model(ModelConfig(name=str(tiny_model_dir)))
    with torch.no_grad():
        nan_lm.model.model.layers[0].mlp.down_proj.weight[0, 0] = math.nan
    with pytest.raises(
        NonFiniteError,
        match=r"activations at hook 'resid_post.2': NaN or inf at 128 of 128 "
        r"tokens \(context \d+ position 0 \(nan\)",
    ):
        stream_decompose(h, _saes(), lm=nan_lm, progress=False)
    train, test = split_contexts(3, SplitConfig(probe_train_fraction=0.5))  # round(1.5) = 2
    assert (train.size, test.size) == (2, 1) and sorted([*train, *test]) == [0, 1, 2]


# --- the CLI, as subprocesses (SIGKILL, torchrun) -------------------------------------------

ARGS = [
    "--n-contexts",
    "96",
    "--context-length",
    "16",
    "--batch-size",
    "1",
    "--checkpoint-every",
    "1",
    "--max-norm-ratio",
    "1.3",
]


def _cli(sae_dirs: list[Path], out: Path) -> list[str]:
    return [
        str(BIN / "darkmatter"),
        "stream",
        *(a for d in sae_dirs[:2] for a in ("--sae", str(d))),
        *ARGS,
        "-o",
        str(out),
    ]


def _results(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


@pytest.fixture(scope="module")
def alone(sae_dirs, tmp_path_factory) -> Path:
    """An uninterrupted `darkmatter stream` in its own process."""
    out = tmp_path_factory.mktemp("alone")
    run_ok(_cli(sae_dirs, out / "out"), out, 300)
    return out / "out"


def test_cli_end_to_end(sae_dirs, alone, tmp_path):
    args = [*ARGS[:4], "--batch-size", "8", *ARGS[6:]]  # other batches than `alone`: same rows
    res = runner.invoke(app, ["stream", "--sae", str(sae_dirs[0]), *args, "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "SAE dark matter" in res.output and "held-out tokens" in res.output
    info = json.loads((tmp_path / "topk-w128-k8.json").read_text())
    assert (
        info["kind"] == "stream" and info["settings"]["hook"] == HOOK
    )  # hook from the SAE metadata
    assert info["sae"]["d_sae"] == 128 and info["sae"]["path"] == str(sae_dirs[0])
    with safe_open(str(tmp_path / info["probes"]), framework="pt") as fh:
        assert fh.get_tensor("error_probe.weight").shape == (64, 64)
        assert fh.get_tensor("norm_probe.weight").shape == (64, 1)
    assert (tmp_path / "checkpoint" / "stream.rank0-of-1.safetensors").is_file()
    m, ref = info["metrics"], _results(alone)["topk-w128-k8"]["metrics"]
    assert 0 < m["fvu_nonlinear"] < m["fvu"] and m["l0"] == 8.0
    assert (
        m["n_probe_train"] == ref["n_probe_train"] > 0
        and m["n_probe_test"] == ref["n_probe_test"] > 0
    )
    # alone in the system of probes here, with one other SAE there; other batches and threads
    assert m["fvu_nonlinear"] == pytest.approx(ref["fvu_nonlinear"], rel=1e-6)


def test_sigkill_then_rerun_gives_identical_results(sae_dirs, alone, tmp_path):
    out = tmp_path / "out"
    ckpt = out / "checkpoint" / "stream.rank0-of-1.safetensors"
    proc = subprocess.Popen(_cli(sae_dirs, out), cwd=tmp_path, env=offline_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(out.glob("*.json")), "the run finished before the kill"
    with safe_open(str(ckpt), framework="pt") as fh:
        done = json.loads(fh.metadata()["progress"])["done"]
    assert 0 < sum(done) < 96  # stopped part-way (48 + 48 batches of one context)
    log = run_ok(_cli(sae_dirs, out), tmp_path, 300)
    assert "resuming" in log
    resumed, ref = _results(out), _results(alone)
    assert resumed.keys() == ref.keys() == {"topk-w128-k8", "topk-w256-k16"}
    for name in ref:  # bit-identical: the sums continue exactly where the checkpoint left them
        for key in ("metrics", "data", "median_norm", "norm_threshold"):
            assert resumed[name][key] == ref[name][key], (name, key)


def test_changed_settings_replace_the_checkpoint(sae_dirs, alone, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    theirs = alone / "checkpoint" / "stream.rank0-of-1.safetensors"
    (out / "checkpoint" / theirs.name).write_bytes(theirs.read_bytes())
    cmd = _cli(sae_dirs, out)
    cmd[cmd.index("1.3")] = "1.4"
    log = run_ok(cmd, tmp_path, 300)
    assert "other settings" in log and "resuming" not in log
    assert (
        _results(out)["topk-w128-k8"]["norm_threshold"]
        != _results(alone)["topk-w128-k8"]["norm_threshold"]
    )


def test_two_torchrun_ranks_equal_one_process(sae_dirs, alone, tmp_path):
    out = tmp_path / "two"
    run_ok(
        [str(BIN / "torchrun"), "--nproc-per-node", "2", "--no-python", *_cli(sae_dirs, out)],
        tmp_path,
        300,
    )
    assert sorted(p.name for p in (out / "checkpoint").glob("*.safetensors")) == [
        "stream.rank0-of-2.safetensors", "stream.rank1-of-2.safetensors"]
    two, one = _results(out), _results(alone)
    assert two.keys() == one.keys()
    for name in one:
        assert two[name]["data"] == one[name]["data"]
        assert two[name]["median_norm"] == one[name]["median_norm"]  # rank 0 calibrates, broadcasts
        for key, value in one[name]["metrics"].items():
            if isinstance(value, float):
                # the same rows in two shares: sums merged in another order, and rank 1's first
                # 8·d rows are its own float64 probation where one process used float32 products
                # (decompose.gemm_dtype): up to ~2e-7 apart (r2_error_norm of an overfit probe);
                # 1e-6 still catches a lost or doubled batch
                assert two[name]["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
            elif key != "ci":
                assert two[name]["metrics"][key] == value, key
        ci_two, ci_one = two[name]["metrics"]["ci"], one[name]["metrics"]["ci"]
        np.testing.assert_allclose(
            ci_two["r2_error_mean_dim"], ci_one["r2_error_mean_dim"], rtol=1e-6
        )


@pytest.mark.slow
def test_smollm2_agrees_with_the_store_path(tmp_path):
    """The embedded SmolLM2 at layer 15 (attention sinks at ~150x the median norm): the streamed
    metrics match the store path's on the same rows."""
    h = HarvestConfig(
        corpus=CorpusConfig(n_contexts=24, context_length=128),
        hooks=("resid_post.15",),
        batch_size=8,
        contexts_per_shard=8,
        with_loss=False,
        model=ModelConfig(name="smollm2"),
    )
    lm = load_model(h.model)
    store = harvest(h, tmp_path / "store", lm=lm, progress=False)
    ctx, pos, tok = (store.column(c) for c in ("context", "position", "tokens"))
    x = store.gather("resid_post.15", np.arange(store.n_rows))
    norms = x.norm(dim=1).numpy()
    rules = (pos >= 1) & ~np.isin(tok, special_token_ids(lm.tokenizer))
    # an SAE trained quickly on these tokens (the test is about the arithmetic, not held-out SAE
    # quality)
    sae = train_sae(x[np.flatnonzero(rules & (norms < 5 * np.median(norms)))], width=1152, k=32,
                    cfg=SAETrainConfig(train_tokens=30_000, batch_size=512, device="cpu"),
                    out_dir=tmp_path / "sae", progress=False)
    split = SplitConfig(probe_train_fraction=0.5, seed=0)
    got = stream_decompose(h, {"sae": sae}, split, lm=lm, progress=False)["sae"]
    assert got.median_norm == pytest.approx(float(np.median(norms[rules])), rel=0.02)
    keep = rules & ~(norms > got.norm_threshold)
    assert got.data["excluded_norm_outliers"] == int((rules & ~keep).sum())
    assert (
        norms[np.flatnonzero(keep)].max() < 10 * got.median_norm
    )  # no sink left (~150x the median)
    train, test = split_contexts(24, split)
    splits = Splits(
        Selection(np.flatnonzero(keep), ctx.size, 24, 0),
        np.zeros(0, np.int64),
        np.flatnonzero(keep & np.isin(ctx, train)),
        np.flatnonzero(keep & np.isin(ctx, test)),
    )
    ref = decompose_many(store, {"sae": sae}, splits, progress=False)["sae"].metrics
    # ~1.5k probe-train tokens for 577 weights per output: the probe overfits, so no ordering of
    # fvu and fvu_nonlinear is asserted; the SAE itself reconstructs well
    assert 0 < got.metrics.fvu < 0.5 and got.metrics.l0 == 32
    for key in (
        "fvu",
        "fvu_linear",
        "fvu_nonlinear",
        "linear_share",
        "r2_error_mean_dim",
        "r2_error_norm",
        "l0",
    ):
        # d = 576 float32 GEMMs in other blockings: ~1e-6 relative
        assert getattr(got.metrics, key) == pytest.approx(getattr(ref, key), rel=1e-5), key
    assert math.isfinite(got.metrics.ci["r2_error_mean_dim"][0])
