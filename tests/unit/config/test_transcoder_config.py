"""The [transcoders] table: defaults, partial tables, refusals, and the hooks a run harvests."""

from __future__ import annotations

import pytest

from sae_darkmatter.cli.common import build_config
from sae_darkmatter.config import (
    HarvestConfig,
    RunConfig,
    TranscoderConfig,
    load_toml,
    to_dict,
)
from sae_darkmatter.errors import ConfigError
from sae_darkmatter.pipeline import run_hooks


def _toml(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return load_toml(path)


def test_a_partial_table_keeps_the_transcoder_defaults(tmp_path):
    cfg = _toml(tmp_path, "[transcoders]\nenabled = true\n[transcoders.train]\nwidths = [64]\n")
    train = cfg.transcoders.train
    # the table's default grid (batchtopk, k 32), not SAETrainConfig's class defaults (topk)
    assert (train.architecture, train.widths, train.ks) == ("batchtopk", (64,), (32,))
    assert cfg.transcoders.skip == (False, True)
    # and the same for the error SAEs' nested table
    cfg = _toml(tmp_path, "[error_saes.train]\ntrain_tokens = 1000\n")
    assert (cfg.error_saes.train.batch_size, cfg.error_saes.train.widths) == (512, (512,))


def test_a_run_without_transcoders_writes_the_config_it_always_did():
    assert "transcoders" not in to_dict(RunConfig())
    assert to_dict(build_config(None, transcoders=True))["transcoders"]["enabled"] is True


@pytest.mark.parametrize("text, message", [
    ('[transcoders.train]\narchitecture = "topk"\nks = [8]\n',
     "transcoders.train.architecture must be one SAELens saves transcoders of"),
    ("[transcoders]\nskip = [true, true]\n", "transcoders.skip must be a non-empty list"),
    ("[transcoders]\nskip = []\n", "transcoders.skip must be a non-empty list"),
    ("[transcoders]\nlayer = -1\n", "transcoders.layer must be >= 0"),
    ('saes = ["a"]\n[transcoders]\nenabled = true\n', "transcoders.pretrained must name"),
])
def test_bad_transcoder_settings_name_their_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _toml(tmp_path, text)


def test_the_run_harvests_the_mlp_pair_after_the_cross_layer_hooks():
    on = TranscoderConfig(enabled=True)
    cfg = RunConfig(harvest=HarvestConfig(hooks=("resid_post.15",)), transcoders=on)
    assert run_hooks(cfg) == ("resid_post.15", "resid_post.14", "attn_out.15", "mlp_out.15",
                              "mlp_in.15")
    cfg = RunConfig(harvest=HarvestConfig(hooks=("resid_post.15",)),
                    transcoders=TranscoderConfig(enabled=True, layer=3))
    assert run_hooks(cfg)[-2:] == ("mlp_in.3", "mlp_out.3")
    off = RunConfig(harvest=HarvestConfig(hooks=("resid_post.15",)))
    assert run_hooks(off) == ("resid_post.15", "resid_post.14", "attn_out.15", "mlp_out.15")
