"""Hostile inputs get specific errors (or a warning and a safe result), never garbage.

Each test feeds one kind of bad input and asserts the error class and what its message names
(keys, files, offsets, sizes, token positions), or agreement with an independent reference.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sae_darkmatter.cli import app
from sae_darkmatter.config import (
    CorpusConfig,
    DecomposeConfig,
    HarvestConfig,
    ModelConfig,
    RunConfig,
    SplitConfig,
    TokenFilter,
    load_toml,
)
from sae_darkmatter.contexts import build_contexts
from sae_darkmatter.corpus import iter_documents
from sae_darkmatter.decompose import check_sae, decompose, require_finite
from sae_darkmatter.errors import (
    ConfigError,
    ConfigValueError,
    CorpusEncodingError,
    DarkMatterError,
    EmptyCorpusError,
    IncompatibleSAEError,
    NonFiniteError,
    ShapeMismatchError,
)
from sae_darkmatter.harvest import check_finite_shard, harvest
from sae_darkmatter.linalg import StreamingLstsq
from sae_darkmatter.models import load_model
from sae_darkmatter.saes import TopKSAE
from sae_darkmatter.splits import make_splits
from sae_darkmatter.store import ActivationStore

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


# ------------------------------------------------------------------------------------ corpus


def test_non_utf8_text_file_names_file_offset_and_line(tmp_path, smollm2_tokenizer):
    path = tmp_path / "latin1.txt"
    data = "first line\nna\u00efve second line\n".encode("latin-1")
    path.write_bytes(data)
    offset = data.index(b"\xef")
    cfg = CorpusConfig(source=str(path), n_contexts=1, context_length=4)
    with pytest.raises(CorpusEncodingError) as info:
        build_contexts(cfg, smollm2_tokenizer)
    msg = str(info.value)
    assert str(path) in msg and f"byte 0xef at byte offset {offset} (line 2)" in msg
    assert 'encoding_errors = "replace"' in msg
    # The documented way to accept it: undecodable bytes read as U+FFFD.
    docs = list(iter_documents(dataclasses.replace(cfg, encoding_errors="replace")))
    assert docs == ["first line\nna\ufffdve second line"]


def test_utf16_file_and_bad_jsonl_line(tmp_path):
    u16 = tmp_path / "u16.txt"
    u16.write_bytes("hello".encode("utf-16"))
    with pytest.raises(
        CorpusEncodingError, match=r"UTF-16 byte-order mark\): byte 0xff at byte offset 0"
    ):
        list(iter_documents(CorpusConfig(source=str(u16))))
    jl = tmp_path / "bad.jsonl"
    lines = [b'{"text": "ok"}\n', b'{"text": "fine"}\n', b'{"text": "caf\xe9"}\n']
    jl.write_bytes(b"".join(lines))
    offset = len(lines[0]) + len(lines[1]) + lines[2].index(b"\xe9")
    with pytest.raises(
        CorpusEncodingError,
        match=rf"bad\.jsonl is not valid UTF-8: byte 0xe9 at byte offset {offset} \(line 3\)",
    ):
        list(iter_documents(CorpusConfig(source=str(jl))))


def test_empty_files_are_named(tmp_path, smollm2_tokenizer, caplog):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("")
    (folder / "b.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    cfg = CorpusConfig(source=str(folder), n_contexts=1, context_length=4)
    with pytest.raises(EmptyCorpusError) as info:
        build_contexts(cfg, smollm2_tokenizer)
    msg = str(info.value)
    assert "holds no usable text: 2 file(s) hold no text" in msg
    assert str(folder / "a.txt") in msg and str(folder / "b.jsonl") in msg
    (folder / "c.txt").write_text("some real text to tokenize here, enough for a context")
    with caplog.at_level(logging.WARNING):
        ctx = build_contexts(cfg, smollm2_tokenizer)
    assert ctx.shape == (1, 4)
    assert f"corpus file {folder / 'a.txt'} holds no text" in caplog.text


# ------------------------------------------------------------------------------------ harvest


def _text_with_marker(n_sentences: int, marker_at: int) -> str:
    """Repeated sentences (~6 tokens each) with one "zebra" inserted after sentence ``marker_at``."""
    words = ["the cat sat on the mat"] * n_sentences
    words.insert(marker_at, "zebra")
    return " ".join(words)


@pytest.fixture()
def tiny_lm(tiny_model_dir):
    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))


def _harvest_cfg(path, **kw):
    corpus = CorpusConfig(source=str(path), n_contexts=8, context_length=16)
    return HarvestConfig(model=ModelConfig(name="unused", device="cpu"), corpus=corpus,
                         hooks=("resid_post.1",), batch_size=2, contexts_per_shard=4, **kw)


def test_harvest_refuses_nan_activations_with_positions(tmp_path, tiny_lm):
    text = tmp_path / "t.txt"
    text.write_text(_text_with_marker(60, 14))  # ~token 84: context 5
    cfg = _harvest_cfg(text, with_loss=False)
    contexts = build_contexts(cfg.corpus, tiny_lm.tokenizer)
    zebra = tiny_lm.tokenizer(" zebra", add_special_tokens=False)["input_ids"][0]
    where = np.argwhere(contexts == zebra)
    assert len(where) == 1 and where[0][0] >= 4  # in the second shard
    c = int(where[0][0])
    with torch.no_grad():
        tiny_lm.model.model.embed_tokens.weight[zebra] = math.nan
    with pytest.raises(NonFiniteError) as info:
        harvest(cfg, tmp_path / "store", lm=tiny_lm, progress=False)
    err = info.value
    # NaN enters at the marker and spreads over its whole context: the causal mask is added to
    # the attention scores, and NaN + (-inf) is NaN. Other contexts stay finite.
    t = contexts.shape[1]
    assert (
        err.places == [(c, q, "nan") for q in range(5)] and err.n_bad == t and err.n_total == 4 * t
    )
    msg = str(err)
    assert (
        f"hook 'resid_post.1': NaN or inf at {t} of {4 * t} tokens (context {c} position 0 (nan)"
        in msg
    )
    assert (
        "nothing from contexts 4..7 was stored (the store keeps the 4 contexts committed before)"
        in msg
    )
    store = ActivationStore.open(tmp_path / "store")
    assert store.committed_contexts == 4  # the first shard is kept, the bad one never landed
    assert all(bool(torch.isfinite(x).all()) for _, x in store.iter_chunks("resid_post.1"))


def test_shard_check_names_exact_positions_and_skips_the_last_loss():
    acts = {"h": torch.zeros(3, 5, 4)}
    acts["h"][1, 2, 0] = math.inf
    acts["h"][2, 4, 3] = math.nan
    loss = torch.zeros(3, 5)
    loss[:, -1] = math.nan  # no next token: NaN by design, not an error
    with pytest.raises(NonFiniteError) as info:
        check_finite_shard(acts, loss, 32, "float32")
    assert info.value.places == [(33, 2, "inf"), (34, 4, "nan")] and info.value.n_bad == 2
    assert "nothing from contexts 32..34 was stored" in str(info.value)
    check_finite_shard({"h": torch.zeros(3, 5, 4)}, loss, 32, "float32")  # finite: no error


def test_harvest_float16_overflow_and_loss_overflow(tmp_path, tiny_model_dir):
    text = tmp_path / "t.txt"
    text.write_text(_text_with_marker(60, 2))
    lm = load_model(ModelConfig(name=str(tiny_model_dir), dtype="float16", device="cpu"))
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight.mul_(1e3)  # residual > 65504 in float16
        lm.model.model.layers[0].mlp.down_proj.weight.mul_(1e5)
    cfg = dataclasses.replace(
        _harvest_cfg(text, with_loss=False), model=ModelConfig(name="unused", dtype="float16")
    )
    with pytest.raises(
        NonFiniteError, match=r"context 0 position 0 \((inf|nan)\).*float16 overflows above 65504"
    ):
        harvest(cfg, tmp_path / "s16", lm=lm, progress=False)

    lm = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    with torch.no_grad():
        lm.model.model.norm.weight.fill_(math.inf)  # final norm: hooked activations stay finite
    with pytest.raises(
        NonFiniteError, match=r"per-token loss \(from non-finite logits\): NaN or inf at 60 of 60"
    ):
        harvest(_harvest_cfg(text, with_loss=True), tmp_path / "sl", lm=lm, progress=False)


# ------------------------------------------------------------------------------- decompose

D, T = 8, 6


def _store(tmp_path, x: np.ndarray) -> ActivationStore:
    st = ActivationStore.create_or_resume(
        tmp_path / "store", hooks={"h": D}, context_length=T, meta={}
    )
    st.append(context_start=0, acts={"h": x.reshape(-1, T, D).astype(np.float32)},
              tokens=np.full((x.shape[0] // T, T), 5), loss=None)
    return st


def _data(n_ctx: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 3.0 + rng.normal(size=(n_ctx * T, D))


def _sae(seed: int = 1) -> TopKSAE:
    return TopKSAE(D, 16, 3, generator=torch.Generator().manual_seed(seed))


SPLIT = SplitConfig(filter=TokenFilter(skip_positions=1, max_norm_ratio=None))
DEC = DecomposeConfig(device="cpu")


def test_decompose_refuses_nan_and_inf_in_a_store_with_positions(tmp_path):
    x = _data()
    x[2 * T + 3, 4] = math.nan  # context 2, position 3
    x[7 * T + 0, 1] = math.inf  # context 7, position 0: skipped by the filter, still counted
    x[9 * T + 5, :] = -math.inf  # context 9, position 5
    st = _store(tmp_path, x)
    splits = make_splits(st, SPLIT)
    with pytest.raises(NonFiniteError) as info:
        decompose(st, _sae(), splits, DEC, progress=False)
    err = info.value
    assert err.places == [(2, 3, "nan"), (7, 0, "inf"), (9, 5, "inf")]
    assert err.n_bad == 3 and err.n_total == x.shape[0]
    assert "stored activations of hook 'h'" in str(err) and "re-harvest" in str(err)


def test_require_finite_is_a_no_op_on_finite_rows(tmp_path):
    st = _store(tmp_path, _data(4))
    rows = np.arange(st.n_rows)
    require_finite(st.gather("h", rows), rows, st, "h")  # no error


def test_sae_width_dtype_and_mixed_dtypes(tmp_path, caplog):
    st = _store(tmp_path, _data())
    with pytest.raises(
        ShapeMismatchError,
        match=r"SAE 'wide' has d_in 12 but the store's 'h' activations have width 8",
    ):
        check_sae("wide", TopKSAE(12, 16, 3), st, "h")
    mixed = _sae()
    mixed.W_dec.data = mixed.W_dec.data.half()
    with pytest.raises(
        IncompatibleSAEError,
        match=r"SAE 'mixed' mixes parameter dtypes: \{W_dec: float16, W_enc: float32",
    ):
        check_sae("mixed", mixed, st, "h")
    ints = _sae()
    ints.b_dec = torch.nn.Parameter(torch.zeros(D, dtype=torch.int32), requires_grad=False)
    with pytest.raises(
        IncompatibleSAEError, match=r"SAE 'ints' has non-float parameters \{b_dec: int32\}"
    ):
        check_sae("ints", ints, st, "h")

    # A bfloat16 SAE runs in bfloat16 (inputs cast, logged); e = x - x̂ in float32.
    splits = make_splits(st, SPLIT)
    bf16 = _sae().to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="sae_darkmatter.decompose"):
        out = decompose(st, bf16, splits, DEC, progress=False)
    assert "SAE 'sae' has bfloat16 weights: it encodes and decodes in bfloat16" in caplog.text
    x = st.gather("h", splits.probe_test).double()
    with torch.no_grad():
        x_hat = bf16(x.to(torch.bfloat16)).double()
    want = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert out.metrics.fvu == pytest.approx(want, rel=1e-5)


def test_float16_sae_overflow_is_reported(tmp_path):
    st = _store(tmp_path, _data())
    big = _sae().half()
    with torch.no_grad():
        big.W_dec.mul_(3e4)
    with pytest.raises(
        NonFiniteError,
        match=r"SAE 'sae' reconstructions of hook 'h'.*float16 arithmetic overflowed",
    ):
        decompose(st, big, make_splits(st, SPLIT), DEC, progress=False)


def test_decompose_with_a_duplicated_dimension_records_regularization(tmp_path, caplog):
    x = _data()
    x[:, 5] = x[:, 2]
    st = _store(tmp_path, x)
    splits = make_splits(st, SPLIT)
    with caplog.at_level(logging.WARNING):
        out = decompose(st, _sae(), splits, DEC, progress=False)
    m = out.metrics
    assert (
        m.probe_regularized
        and m.probe_rank == D - 1
        and (m.probe_cond is None or m.probe_cond > 1e10)
    )
    assert "linearly dependent x dimensions [2, 5]" in caplog.text
    # Held-out predictions agree with numpy's minimum-norm lstsq (test rows share the duplicate).
    sae = _sae()
    xa = np.asarray(st.gather("h", np.arange(st.n_rows)), np.float64)
    with torch.no_grad():
        e = xa - sae(torch.from_numpy(xa).float()).double().numpy()
    def ones(a):
        return np.hstack([a, np.ones((len(a), 1))])
    w, *_ = np.linalg.lstsq(ones(xa[splits.probe_train]), e[splits.probe_train], rcond=None)
    te = splits.probe_test
    got = out.error_probe.predict(torch.from_numpy(xa[te])).numpy()
    assert np.linalg.norm(got - ones(xa[te]) @ w) / np.linalg.norm(ones(xa[te]) @ w) < 1e-6
    # (float32 e in the decomposition vs float64 here: ~1e-7 relative)


# ------------------------------------------------------------------------- least squares

RCOND = 1e-10  # StreamingLstsq.solve's default: eigenvalue cutoff of the scaled XᵀX


def _streaming(x: np.ndarray, y: np.ndarray, bias: bool = True) -> StreamingLstsq:
    acc = StreamingLstsq(x.shape[1], y.shape[1], bias=bias)
    for lo in range(0, len(x), 97):  # several chunks
        acc.update(torch.from_numpy(x[lo : lo + 97]), torch.from_numpy(y[lo : lo + 97]))
    return acc


def _min_norm_standardized(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Reference: numpy's minimum-norm lstsq on centred, unit-spread x (constant columns zeroed),
    cutting singular values below sqrt(RCOND)·σ_max (= eigenvalues below RCOND·λ_max of XᵀX)."""
    x, y, rows = (np.asarray(a, np.float64) for a in (x, y, rows))
    mx, my = x.mean(0), y.mean(0)
    spread = np.sqrt(((x - mx) ** 2).sum(0))
    scale = np.where(spread > 0, 1 / np.where(spread > 0, spread, 1), 0.0)
    w, *_ = np.linalg.lstsq((x - mx) * scale, y - my, rcond=math.sqrt(RCOND))
    return ((rows - mx) * scale) @ w + my


def _degenerate_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(x, held-out rows) for each degenerate design; x has a large offset like activations."""
    rng = np.random.default_rng(7)
    n, d = 600, 8
    def base(m):
        return 40 + rng.normal(size=(m, d))
    out = {}
    x, t = base(n), base(50)
    x[:, 5], t[:, 5] = x[:, 2], t[:, 2]
    out["duplicate"] = (x, t)
    x, t = base(n), base(50)
    x[:, 1], t[:, 1] = 0.0, 0.0
    out["dead"] = (x, t)
    x, t = base(n), base(50)
    x[:, 6], t[:, 6] = 7.5, 7.5
    out["constant"] = (x, t)
    mix = rng.normal(size=(3, d))
    out["rank3"] = (40 + rng.normal(size=(n, 3)) @ mix, 40 + rng.normal(size=(50, 3)) @ mix)
    x, t = base(n), base(50)
    noise = 1e-7 * rng.normal(size=n)  # collinear to 1e-7 of the spread: below the cutoff
    x[:, 4], t[:, 4] = x[:, 3] * 2 - 1 + noise, t[:, 3] * 2 - 1
    out["near_collinear"] = (x, t)
    out["fewer_rows"] = (base(5), base(50))
    return out


@pytest.mark.parametrize("case", list(_degenerate_cases()))
def test_degenerate_least_squares_warns_and_matches_min_norm_reference(case, caplog):
    x, held = _degenerate_cases()[case]
    rng = np.random.default_rng(1)
    y = x @ rng.normal(size=(x.shape[1], 3)) + rng.normal(size=(len(x), 3))
    with caplog.at_level(logging.WARNING, logger="sae_darkmatter.linalg"):
        probe = _streaming(x, y).solve()
    assert probe.regularized and probe.rank < x.shape[1] and probe.cond > 1e10
    assert "least squares is rank deficient: rank" in caplog.text and "cond(XᵀX) = " in caplog.text
    for rows in (x, held):
        want = _min_norm_standardized(x, y, rows)
        got = probe.predict(torch.from_numpy(rows)).numpy()
        # Both are float64 solves of the same truncated system, whose kept part is well
        # conditioned (cond <= ~1e3 here): agreement to ~eps·cond, 1e-9 leaves a wide margin.
        assert np.linalg.norm(got - want) / np.linalg.norm(want - want.mean(0)) < 1e-9, case
    # On the training rows the fit is the (unique) least-squares fit: numpy on raw [x, 1].
    ones = np.hstack([x, np.ones((len(x), 1))])
    w, *_ = np.linalg.lstsq(ones, y, rcond=None)
    got = probe.predict(torch.from_numpy(x)).numpy()
    if case != "near_collinear":  # there numpy keeps the 1e-7 direction we drop
        assert np.linalg.norm(got - ones @ w) / np.linalg.norm(ones @ w - (ones @ w).mean(0)) < 1e-9


def test_degeneracy_message_names_dimensions(caplog):
    cases = _degenerate_cases()
    rng = np.random.default_rng(2)
    for case, fragment in (("duplicate", "rank 7 of 8; cond(XᵀX) = "),
                           ("duplicate", "linearly dependent x dimensions [2, 5]"),
                           ("constant", "constant x dimensions [6]"),
                           ("near_collinear", "linearly dependent x dimensions [3, 4]")):
        x = cases[case][0]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sae_darkmatter.linalg"):
            _streaming(x, rng.normal(size=(len(x), 2))).solve()
        assert fragment in caplog.text, (case, caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sae_darkmatter.linalg"):
        _streaming(cases["dead"][0], rng.normal(size=(600, 2)), bias=False).solve()
    assert "all-zero x dimensions [1]" in caplog.text


def test_well_conditioned_fit_is_not_regularized_and_reports_cond(caplog):
    rng = np.random.default_rng(3)
    x = 40 + rng.normal(size=(2000, 8)) @ np.diag([1, 2, 3, 4, 5, 6, 7, 30.0])
    y = x @ rng.normal(size=(8, 2))
    with caplog.at_level(logging.WARNING, logger="sae_darkmatter.linalg"):
        probe = _streaming(x, y).solve()
    assert not probe.regularized and probe.rank == 8 and caplog.text == ""
    xc = (x - x.mean(0)) / np.sqrt(((x - x.mean(0)) ** 2).sum(0))
    assert probe.cond == pytest.approx(np.linalg.cond(xc.T @ xc), rel=0.05)


def test_nonfinite_lstsq_inputs_name_the_input_and_rows():
    acc = StreamingLstsq(3, 2)
    y = torch.zeros(10, 2)
    y[4, 1] = math.inf
    y[7, 0] = math.nan
    with pytest.raises(
        DarkMatterError, match=r"y holds NaN or inf in 2 of 10 rows \(rows 4, 7 of this chunk\)"
    ):
        acc.update(torch.randn(10, 3), y)
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0, got inf"):
        _streaming(np.ones((5, 2)), np.ones((5, 1))).solve(math.inf)
