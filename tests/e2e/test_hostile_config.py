"""Hostile config files and values get specific errors, never garbage.

Each test feeds one kind of bad input and asserts the error class and what its message names
(keys, files, offsets, sizes, token positions), or agreement with an independent reference.
"""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from sae_darkmatter.cli import app
from sae_darkmatter.config import (
    CorpusConfig,
    RunConfig,
    SplitConfig,
    TokenFilter,
    load_toml,
)
from sae_darkmatter.errors import (
    ConfigError,
    ConfigValueError,
)

# ------------------------------------------------------------------------------------ config

# (TOML text, error class, message fragments). Each line is one distinct bad input.
BAD_TOML = [
    ("[train]\nwidths = [128,\nks = [1]\n", ConfigError, ["invalid TOML", "line 3, column 1"]),
    ("[train\nks = [1]\n", ConfigError, ["invalid TOML: Expected ']'", "line 1, column 7"]),
    ("[train]\nks = [1]\n[train]\nks = [2]\n", ConfigError, ["invalid TOML", "line 3"]),
    (
        "[trian]\nks = [1]\n",
        ConfigError,
        ["unknown key(s) ['trian'] for RunConfig in the top level", "did you mean 'train'"],
    ),
    (
        "[harvest.model]\nnmae = 'gpt2'\n",
        ConfigError,
        ["unknown key(s) ['nmae'] for ModelConfig in table [harvest.model]", "did you mean 'name'"],
    ),
    (
        "[harvest.corpus]\ncontext_lenght = 64\n",
        ConfigError,
        ["table [harvest.corpus]", "did you mean 'context_length'"],
    ),
    (
        "[split.filter]\nskip_position = 2\n",
        ConfigError,
        ["table [split.filter]", "did you mean 'skip_positions'"],
    ),
    (
        "[error_saes.train]\nwidht = [64]\n",
        ConfigError,
        ["SAETrainConfig in table [error_saes.train]", "did you mean 'width"],
    ),
    (
        '[train]\nwidths = "abc"\n',
        ConfigValueError,
        ["train.widths must be a non-empty list of positive ints", "got 'abc' (a string)"],
    ),
    (
        "[train]\nks = [1.5]\n",
        ConfigValueError,
        ["train.ks must be a non-empty list of positive ints", "got [1.5]"],
    ),
    ("[train]\nks = 16\n", ConfigValueError, ["train.ks must be", "got 16 (an integer)"]),
    (
        "[harvest.corpus]\nn_contexts = -5\n",
        ConfigValueError,
        ["harvest.corpus.n_contexts must be >= 1, got -5"],
    ),
    (
        "[harvest.corpus]\nn_contexts = 1e3\n",
        ConfigValueError,
        ["harvest.corpus.n_contexts must be an integer, got 1000.0 (a float)"],
    ),
    (
        "[harvest.corpus]\nn_contexts = true\n",
        ConfigValueError,
        ["harvest.corpus.n_contexts must be an integer, got True (a boolean)"],
    ),
    (
        '[harvest]\nwith_loss = "yes"\n',
        ConfigValueError,
        ["harvest.with_loss must be true or false, got 'yes' (a string)"],
    ),
    (
        "[harvest.corpus.source]\nx = 1\n",
        ConfigValueError,
        ["harvest.corpus.source must be a string, got {'x': 1} (a table)"],
    ),
    ("harvest = 5\n", ConfigValueError, ["harvest must be a table [harvest], got 5 (an integer)"]),
    ("[[train]]\nks = [1]\n", ConfigValueError, ["train must be a table [train]", "(a list)"]),
    (
        "[error_saes]\ntrain = 3\n",
        ConfigValueError,
        ["error_saes.train must be a table [error_saes.train], got 3"],
    ),
    (
        '[harvest]\nhooks = "resid_post.3"\n',
        ConfigValueError,
        ["harvest.hooks must be a list of strings", "write a list, e.g. ['resid_post.3']"],
    ),
    (
        '[harvest]\nhooks = ["a", 3]\n',
        ConfigValueError,
        ["harvest.hooks must be a list of strings", "item 1, 3, is an integer"],
    ),
    (
        "[error_saes.train]\nks = [0]\n",
        ConfigValueError,
        ["error_saes.train.ks must be a non-empty list of positive ints", "got [0]"],
    ),
    ("[train]\nlr = -1\n", ConfigValueError, ["train.lr must be > 0", "got -1"]),
    (
        "[decompose]\nridge = nan\n",
        ConfigValueError,
        ["decompose.ridge must be a finite number >= 0, got nan"],
    ),
    (
        '[decompose]\ndevice = "gpu"\n',
        ConfigValueError,
        ["decompose.device must be 'auto'", "got 'gpu'"],
    ),
    (
        '[pursuit]\nl0 = "all"\n',
        ConfigValueError,
        ['pursuit.l0 must be an integer >= 1 or "match"'],
    ),
    (
        "[split]\nsae_train_fraction = 1.0\n",
        ConfigValueError,
        ["split.sae_train_fraction must be in [0, 1)"],
    ),
    (
        "[split.filter]\nmax_norm_ratio = 0.5\n",
        ConfigValueError,
        ["split.filter.max_norm_ratio must be a finite number >= 1"],
    ),
    (
        '[harvest.model]\ndtype = "fp16"\n',
        ConfigValueError,
        ["harvest.model.dtype must be one of ['float32', 'bfloat16', 'float16'], got 'fp16'"],
    ),
    (
        "[harvest]\nbatch_size = 16\ncontexts_per_shard = 100\n",
        ConfigValueError,
        ["harvest.contexts_per_shard must be a positive multiple of batch_size (16), got 100"],
    ),
    (
        '[harvest.corpus]\nencoding_errors = "ignore"\n',
        ConfigValueError,
        ["harvest.corpus.encoding_errors must be one of ['strict', 'replace'], got 'ignore'"],
    ),
    (
        "[harvest.corpus]\ncontext_length = 8\n[split.filter]\nskip_positions = 8\n",
        ConfigError,
        ["skip_positions (8) must be smaller than the context length (8"],
    ),
]


@pytest.mark.parametrize(("text", "cls", "fragments"), BAD_TOML)
def test_bad_config_files_get_specific_errors(tmp_path, text, cls, fragments):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(cls) as info:
        load_toml(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg  # the file is named
    for fragment in fragments:
        assert fragment in msg, msg


def test_config_file_not_utf8_missing_or_a_folder(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(b"[train]\n# caf\xe9\nks = [1]\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at offset 13, line 2\)"):
        load_toml(path)
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.toml"):
        load_toml(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"cannot read config file"):
        load_toml(tmp_path)


def test_direct_construction_and_cli_overrides_are_checked_too():
    with pytest.raises(
        ConfigValueError, match=r"harvest\.corpus\.context_length must be >= 1, got 0"
    ):
        CorpusConfig(context_length=0)
    with pytest.raises(
        ConfigValueError, match=r"split\.filter\.skip_positions must be >= 0, got -1"
    ):
        TokenFilter(skip_positions=-1)
    cfg = RunConfig()
    with pytest.raises(
        ConfigError, match=r"skip_positions \(200\) must be smaller than the context length \(128"
    ):
        dataclasses.replace(cfg, split=SplitConfig(filter=TokenFilter(skip_positions=200)))
    res = CliRunner().invoke(
        app, ["run", "--skip-positions", "64", "--context-length", "64", "-o", "unused"]
    )
    assert res.exit_code == 2
    assert "skip_positions (64) must be smaller than the context length (64" in " ".join(
        res.output.split()
    )


def test_valid_configs_keep_their_fingerprint_keys():
    """The new corpus option is left out of to_dict at its default: old caches stay valid."""
    from sae_darkmatter.config import to_dict

    assert "encoding_errors" not in to_dict(CorpusConfig())
    assert to_dict(CorpusConfig(encoding_errors="replace"))["encoding_errors"] == "replace"
