"""``DecomposeConfig.gemm_dtype``: float32 block products agree with float64 on real SmolLM2
activations, fall back to float64 (or warn) on ill-conditioned data, and never share a cache
entry with float64 ones."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from helpers import direction_sae, sparse_code_store
from sae_darkmatter.config import (
    CorpusConfig,
    DecomposeConfig,
    HarvestConfig,
    ModelConfig,
    SAETrainConfig,
    SplitConfig,
    TokenFilter,
)
from sae_darkmatter.decompose import decompose_many
from sae_darkmatter.decompose.core import probe_system
from sae_darkmatter.errors import ConfigValueError
from sae_darkmatter.harvest import harvest
from sae_darkmatter.linalg import StreamingLstsq, lstsq
from sae_darkmatter.linalg.lstsq import tf32_matmuls
from sae_darkmatter.pipeline import decompose_saes
from sae_darkmatter.saes import save_sae, train_sae
from sae_darkmatter.splits import make_splits

F32, F64 = DecomposeConfig(gemm_dtype="float32"), DecomposeConfig(gemm_dtype="float64")
METRICS = ("fvu", "fvu_linear", "fvu_nonlinear", "linear_share", "r2_error_mean_dim",
           "r2_error_pooled", "r2_error_norm")


def test_bad_gemm_dtype_is_refused_with_the_choices():
    with pytest.raises(ConfigValueError, match=r"decompose\.gemm_dtype.*float32.*float64.*bf16"):
        DecomposeConfig(gemm_dtype="bf16")


def test_probe_system_takes_the_setting():
    for cfg, dtype in ((F32, torch.float32), (F64, torch.float64)):
        assert probe_system(cfg, 2, 8, torch.device("cpu")).gemm_dtype == dtype


def _data(n: int, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Offset, correlated float32 rows (cond of the centred, scaled XᵀX ~5e3) and a linear
    target plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = 50 + torch.randn(n, d, generator=g, dtype=torch.float64) @ (
        torch.eye(d) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64))
    y = x @ torch.randn(d, 3, generator=g, dtype=torch.float64) + torch.randn(n, 3, generator=g,
                                                                               dtype=torch.float64)
    return x.float(), y.float()


def _fit(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, chunk: int = 700) -> StreamingLstsq:
    acc = StreamingLstsq(x.shape[1], y.shape[1], gemm_dtype=dtype)
    for i in range(0, x.shape[0], chunk):
        acc.update(x[i : i + chunk], y[i : i + chunk])
    return acc


def test_float32_mode_sums_its_probation_rows_in_float64_then_float32(caplog):
    x, y = _data(6000)
    with caplog.at_level(logging.WARNING):
        fast = _fit(x, y, torch.float32)
    assert not caplog.text and not fast.fell_back
    # the probation is the first 8·32 rows: a block of its own within the first update
    assert fast.probation_rows == 256
    assert int(fast.state_dict()["n_float32"]) == 6000 - 256
    exact = _fit(x, y, torch.float64).solve()
    got = fast.solve()
    assert not torch.equal(got.weight, exact.weight)  # float32 products did run
    # cond 5e3 here: eps32·cond ≈ 3e-4 of the predictions' spread bounds the change (measured
    # 4e-5); a float32 path without the shift is off by ~1e-2 (test_linalg)
    xt = _data(2000, seed=9)[0].double()
    want = exact.predict(xt)
    assert float((got.predict(xt) - want).norm() / (want - want.mean(0)).norm()) < 2e-4


def test_ill_conditioned_rows_make_float32_mode_fall_back_to_float64(caplog):
    x, y = _data(6000)
    x[:, 1] = x[:, 0] + 1e-4 * (x[:, 1] - 50)  # cond of the centred, scaled XᵀX ~1e9
    with caplog.at_level(logging.WARNING):
        fast = _fit(x, y, torch.float32)
    assert fast.fell_back and int(fast.state_dict()["n_float32"]) == 0
    assert "summing the rest with float64 GEMMs" in caplog.text
    assert 'decompose.gemm_dtype = "float64"' in caplog.text
    # every block ran in float64 (the first update in other blocks): the float64 fit, up to
    # float64 rounding amplified by the cond of ~1e9
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got = fast.solve()
    assert "float32" not in caplog.text
    torch.testing.assert_close(got.weight, _fit(x, y, torch.float64).solve().weight,
                               rtol=1e-6, atol=0)


def test_tf32_is_seen_through_every_switch_and_only_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not tf32_matmuls(cuda) and not tf32_matmuls(cpu)  # torch's default: IEEE float32
    try:
        torch.set_float32_matmul_precision("high")  # the legacy switch, as many scripts set it
        assert tf32_matmuls(cuda) and not tf32_matmuls(cpu)
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"
    assert not tf32_matmuls(cuda)


def test_float32_mode_uses_float64_gemms_where_tf32_would_run(caplog, monkeypatch):
    """A GPU with TF32 on: the same fallback as ill-conditioned rows, naming the switch (the
    device check itself is tested above; here a CPU stands in for the CUDA device)."""
    monkeypatch.setattr(lstsq, "tf32_matmuls", lambda device: True)
    x, y = _data(6000)
    with caplog.at_level(logging.WARNING):
        fast = _fit(x, y, torch.float32)
    assert fast.fell_back and int(fast.state_dict()["n_float32"]) == 0
    assert "TF32 matmuls are allowed" in caplog.text and '"ieee"' in caplog.text
    torch.testing.assert_close(fast.solve().weight, _fit(x, y, torch.float64).solve().weight,
                               rtol=1e-10, atol=0)  # float64 sums in other blocks: rounding


def test_rows_that_turn_ill_conditioned_after_the_check_make_the_solve_warn(caplog):
    """A stream cannot be re-read: rows that spoil the conditioning after the probation are
    only caught at the solve, which names the setting."""
    x, y = _data(6000)
    # later rows swing columns 0 and 1 together by ~1e4: correlation 1 - ~1e-8, cond ~1e8
    x[3000:, :2] += 1e4 * torch.randn(3000, 1, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.WARNING):
        fast = _fit(x, y, torch.float32)
    assert not fast.fell_back and not caplog.text
    with caplog.at_level(logging.WARNING):
        fast.solve()
    assert "float32 GEMMs of the sums may have changed the fit" in caplog.text
    assert 'decompose.gemm_dtype = "float64"' in caplog.text


def test_fallback_survives_a_state_round_trip_and_a_merge():
    x, y = _data(2000)
    x[:, 1] = x[:, 0] + 1e-4 * (x[:, 1] - 50)
    bad = _fit(x, y, torch.float32)
    assert bad.fell_back
    loaded = StreamingLstsq(32, 3, gemm_dtype=torch.float32)
    loaded.load_state_dict(bad.state_dict())
    merged = _fit(*_data(200, seed=1), torch.float32)  # still in its probation (256 rows)
    merged.merge(bad)
    for acc in (loaded, merged):
        assert acc.fell_back
        acc.update(*_data(500, seed=2))
        assert int(acc.state_dict()["n_float32"]) == 0


def test_float32_and_float64_results_never_share_a_cache_entry(tmp_path):
    st, dirs = sparse_code_store(tmp_path / "store", d=16, n_ctx=160, per_append=40, mean=5.0,
                                 meta={"model_name": "synthetic"})
    folder = tmp_path / "saes" / "topk-w32-k4"
    save_sae(direction_sae(dirs, 32, 4, seed=0, mean=5.0), folder, metadata={})
    splits = make_splits(st, SplitConfig(filter=TokenFilter(skip_positions=1, max_norm_ratio=None),
                                         sae_train_fraction=0.0))
    out = tmp_path / "decompose"

    def run(cfg: DecomposeConfig) -> tuple[str, bytes, int]:
        decompose_saes(st, splits, [folder], cfg, out, progress=False, check_training=False)
        result, probes = out / "topk-w32-k4.json", out / "topk-w32-k4.safetensors"
        return result.read_text(), probes.read_bytes(), result.stat().st_mtime_ns

    # chunks of 256 rows: the first (float64) ends float32 mode's probation of 8·16 rows
    c64, c32 = (dataclasses.replace(c, chunk_rows=256) for c in (F64, F32))
    f64 = run(c64)
    assert run(c64)[2] == f64[2]  # same request: reused
    f32 = run(c32)
    assert f32[2] != f64[2] and f32[0] != f64[0]  # recomputed, another fingerprint ...
    assert f32[1] != f64[1]  # ... and other probes (float32 products after the first chunk)
    assert run(c32)[2] == f32[2]
    again = run(c64)
    assert again[2] != f32[2] and again[1] == f64[1]  # the float64 result, not float32's


@pytest.mark.slow
def test_float32_products_give_float64_metrics_on_smollm2(tmp_path):
    """Real layer-15 activations of the embedded SmolLM2 (cond of the centred, scaled XᵀX ~1e4
    to 1e5): every held-out metric of the float32 decomposition is within 1e-6 of float64's.

    Why 1e-6: float32 block products perturb the normal equations by ~eps32 = 6e-8 relative,
    moving the probe's predictions by ~eps32·cond at worst but ~1e-6 in practice, and the
    metrics are ratios of held-out sums whose first-order change is of that order times the
    fraction of the error the probe explains (measured on such data: ~1e-8). 1e-6 leaves that
    a wide margin and still fails for a broken path (uncentred float32 sums: ~1e-2).
    """
    h = HarvestConfig(model=ModelConfig(name="smollm2"),
                      corpus=CorpusConfig(n_contexts=192, context_length=128),
                      hooks=("resid_post.15",), batch_size=16, contexts_per_shard=64)
    store = harvest(h, tmp_path / "store", progress=False)
    splits = make_splits(store, SplitConfig(sae_train_fraction=0.1, seed=0))
    sae = train_sae(store.gather("resid_post.15", splits.sae_train), width=1024, k=32,
                    cfg=SAETrainConfig(train_tokens=20_000, batch_size=512, device="cpu"),
                    out_dir=tmp_path / "sae", progress=False)
    assert splits.probe_train.size > 2 * 8 * 576  # float32 products for most rows
    got = {cfg.gemm_dtype: decompose_many(store, {"sae": sae}, splits, cfg, progress=False)
           for cfg in (F32, F64)}
    fast, exact = got["float32"]["sae"], got["float64"]["sae"]
    assert not torch.equal(fast.error_probe.weight, exact.error_probe.weight)
    assert fast.metrics.probe_cond is not None and fast.metrics.probe_cond < 1e6
    assert 0 < exact.metrics.fvu < 1 and exact.metrics.linear_share > 0.01  # a real probe
    for key in METRICS:
        assert abs(getattr(fast.metrics, key) - getattr(exact.metrics, key)) < 1e-6, key
    # the probes themselves: the same predictions to ~1e-4 of their spread
    x = store.gather("resid_post.15", splits.probe_test[:2000]).double()
    want, have = exact.error_probe.predict(x), fast.error_probe.predict(x)
    assert float((have - want).norm() / (want - want.mean(0)).norm()) < 1e-4
    assert np.isfinite(fast.metrics.ci["r2_error_mean_dim"]).all()
