"""Config files: TOML into nested frozen dataclasses, clear errors, stable fingerprints."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from sae_darkmatter.cli.common import build_config as _build_config
from sae_darkmatter.config import RunConfig, fingerprint, load_toml
from sae_darkmatter.errors import ConfigError

TOML = """
[harvest]
hooks = ["resid_post.3", "mlp_out.3"]
with_loss = false
[harvest.model]
name = "gpt2"
[harvest.corpus]
source = "data/"
n_contexts = 10
[split.filter]
skip_positions = 4
max_norm_ratio = 8.0
[train]
widths = [128, 256]
ks = [16]
"""


def test_toml_builds_nested_configs(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    cfg = load_toml(path)
    assert cfg.harvest.hooks == ("resid_post.3", "mlp_out.3") and cfg.harvest.with_loss is False
    assert cfg.harvest.model.name == "gpt2" and cfg.harvest.model.dtype == "float32"
    assert cfg.harvest.corpus.n_contexts == 10 and cfg.harvest.corpus.source == "data/"
    assert cfg.split.filter.skip_positions == 4 and cfg.split.filter.max_norm_ratio == 8.0
    assert cfg.train.widths == (128, 256) and cfg.train.ks == (16,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.ks = (3,)  # type: ignore[misc]


def test_unknown_key_is_named_with_the_valid_ones(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nwidth = [128]\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['width'\].*did you mean 'widths'"):
        load_toml(path)


def test_fingerprint_tracks_every_setting():
    base = RunConfig()
    assert fingerprint(base) == fingerprint(RunConfig())
    changed = dataclasses.replace(base, train=dataclasses.replace(base.train, ks=(8,)))
    assert fingerprint(changed) != fingerprint(base)


def test_default_fingerprints_are_stable():
    """Cached run folders are reused by fingerprint: refactors must not move these.

    Moved on purpose: harvest's ``with_loss`` default became False (harvest and run), and
    ``decompose.gemm_dtype`` (default "float32") joined the decomposition settings (run), so no
    float64-product decomposition is taken for a float32 one or the other way round.
    """
    assert fingerprint(RunConfig()) == "761eabb2f66d67c3"
    assert fingerprint(RunConfig().train) == "b52a83b02449b432"
    assert fingerprint(RunConfig().harvest) == "2984f1f8651c1990"


def test_cli_flags_override_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    cfg = _build_config(path, k="8", widths="64,32", corpus="stdlib", max_norm_ratio=0)
    assert cfg.train.ks == (8,) and cfg.train.widths == (64, 32)
    assert cfg.harvest.corpus.source == "stdlib" and cfg.harvest.corpus.n_contexts == 10
    assert cfg.split.filter.max_norm_ratio is None and cfg.split.filter.skip_positions == 4


def test_gemm_dtype_flag_reaches_the_decomposition_and_bad_values_are_named():
    from sae_darkmatter.cli import app

    assert _build_config(None, gemm_dtype="float64").decompose.gemm_dtype == "float64"
    assert _build_config(None).decompose.gemm_dtype == "float32"  # the default stays
    for command in (["run"], ["decompose", "--sae", "x"]):
        res = CliRunner().invoke(app, [*command, "--gemm-dtype", "bf16"])
        assert res.exit_code != 0 and "gemm_dtype" in res.output and "float64" in res.output


def test_cli_run_rejects_bad_widths():
    from sae_darkmatter.cli import app

    res = CliRunner().invoke(app, ["run", "--widths", "12,abc"])
    assert res.exit_code != 0 and "comma-separated integers" in res.output
