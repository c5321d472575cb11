"""Sweep settings: axes, typed values from the command line and TOML, and each value's config
(no model is read: pretrained-SAE runs skip the model checks)."""

from __future__ import annotations

import pytest

from sae_darkmatter import RunConfig, SAETrainConfig
from sae_darkmatter.errors import ConfigError
from sae_darkmatter.sweep import SweepConfig, load_sweep_toml, parse_over, sweep_points


def test_values_are_read_as_the_settings_type():
    assert parse_over("train.lr=1e-3, 0.002").values == (0.001, 0.002)
    assert parse_over("train_tokens=100_000,400000").values == (100_000, 400_000)
    assert parse_over("harvest.corpus.prepend_bos=true,auto").values == (True, "auto")
    assert parse_over("split.filter.max_norm_ratio=5,10").values == (5.0, 10.0)
    sweep = parse_over("protocol=default,paper")
    assert sweep.folders() == ["protocol=default", "protocol=paper"]
    assert parse_over("harvest.model.name=a/b,c").folders() == [
        "harvest.model.name=a_b", "harvest.model.name=c"]


@pytest.mark.parametrize(("text", "message"), [
    ("layer", "axis=value,value"),
    ("train.lrr=1", "did you mean 'lr'"),
    ("train.lr.x=1", "train.lr is a setting, not a table"),
    ("harvest=1", "is a table"),
    ("harvest.hooks=a,b", "sweep 'layer' for the hook"),
    ("train.lr=0.1,,0.2", "empty value"),
    ("layer=-1,2", "layers >= 0"),
    ("harvest.model.name=a/b,a_b", "repeated: harvest.model.name=a_b"),
])
def test_bad_axes_and_values(text, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_over(text)


def test_each_value_gets_its_own_checked_config():
    base = RunConfig(saes=("some/sae",))  # pretrained: no model is read before the runs
    points = sweep_points(parse_over("protocol=default,paper"), base)
    assert [p.cfg.harvest.corpus.context_length for p in points] == [128, 1024]
    assert [p.cfg.split.filter.skip_positions for p in points] == [1, 200]
    points = sweep_points(parse_over("split.filter.skip_positions=1,4"), base)
    assert [p.cfg.split.filter.skip_positions for p in points] == [1, 4]
    assert points[1].cfg.harvest == base.harvest  # nothing else changed
    with pytest.raises(ConfigError, match=r"sweep context_length=1: .*skip_positions \(1\)"):
        sweep_points(parse_over("context_length=64,1"), base)
    with pytest.raises(ConfigError, match="changes nothing for pretrained SAEs"):
        sweep_points(parse_over("train_tokens=1,2"), base)
    with pytest.raises(ConfigError, match="nothing to sweep"):
        sweep_points(SweepConfig(), base)


def test_sweep_table_in_the_run_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nwidths = [64]\n[sweep]\nover = "train.lr"\nvalues = [1, 0.5]\n')
    base, sweep = load_sweep_toml(path)
    assert base == RunConfig(train=SAETrainConfig(widths=(64,)))
    assert sweep == SweepConfig(over="train.lr", values=(1, 0.5))
    path.write_text('[sweep]\nover = "layer"\nvalues = [1, "x"]\n')
    with pytest.raises(ConfigError, match=r"run\.toml: sweep\.values of layer: must be"):
        load_sweep_toml(path)
    path.write_text('[sweep]\nover = "layers"\nvalues = [1]\n')
    with pytest.raises(ConfigError, match=r"sweep\.over unknown sweep axis 'layers'"):
        load_sweep_toml(path)
