"""The SAE training grid, the transcoder sweep and the error decomposition."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sae_darkmatter.config_base import _Checked, _has_type, _need_device, _type_error
from sae_darkmatter.errors import ConfigValueError


@dataclass(frozen=True)
class SAETrainConfig(_Checked):
    """A grid of SAEs, one per (width, sparsity value), trained on the SAE-training split.

    - ``architecture``: ``"topk"`` (OpenAI TopK + AuxK), ``"batchtopk"`` (saved as JumpReLU),
      ``"relu"`` (L1 penalty, Anthropic's April 2024 recipe), ``"jumprelu"`` (L0 penalty with
      straight-through estimators) or ``"matryoshka_batchtopk"`` (BatchTopK whose first
      ``f * width`` latents, for each of ``matryoshka_fractions``, also reconstruct on their
      own; saved as JumpReLU with those prefix widths); one module each in ``saes.archs``.
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
    matryoshka_fractions: tuple[float, ...] = field(default=(0.0625, 0.125, 0.25, 0.5),
                                                    metadata={"omit_default": True})

    # architecture -> field of its sparsity axis; ``saes.archs`` checks it has these records
    SPARSITY_FIELDS = {"topk": "ks", "batchtopk": "ks", "relu": "l1_coefficients",
                       "jumprelu": "l0_coefficients", "matryoshka_batchtopk": "ks"}
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
        fractions = self.matryoshka_fractions
        self._need("matryoshka_fractions", bool(fractions) and all(0 < f < 1 for f in fractions)
                   and list(fractions) == sorted(set(fractions)),
                   "strictly ascending fractions of the width, each strictly between 0 and 1")
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


def _transcoder_train() -> SAETrainConfig:
    return SAETrainConfig(architecture="batchtopk", widths=(512, 1024, 2048, 4096), ks=(32,))


@dataclass(frozen=True)
class TranscoderConfig(_Checked):
    """Transcoders of one layer's MLP beside the SAEs: trained from ``mlp_in.L`` to
    ``mlp_out.L`` on the SAE-training split, or loaded, then decomposed on the SAEs' tokens.

    - ``enabled``: off by default (the run harvests two more hooks and trains ``train``'s grid
      once per value of ``skip``).
    - ``layer``: the MLP's layer; unset, that of the run's target hook (``resid_post.15``: 15).
    - ``skip``: ``[false, true]`` trains transcoders and skip transcoders (``y_hat`` plus a dense
      ``x @ W_skip.T``) of every width and sparsity of ``train``.
    - ``train``: the grid (``SAETrainConfig``; ``until = "plateau"`` works here too). SAELens has
      no TopK transcoder, so the architecture is ``batchtopk`` (saved as ``jumprelu_transcoder``,
      default), ``jumprelu`` or ``relu``.
    - ``pretrained``: transcoder specs (``saelens:<release>/<id>``, SAELens or sparsify folders)
      to decompose instead of training any; their hooks come from their metadata and are
      harvested with the run's.
    """

    enabled: bool = False
    layer: int | None = None
    skip: tuple[bool, ...] = (False, True)
    train: SAETrainConfig = field(default_factory=_transcoder_train)
    pretrained: tuple[str, ...] = ()

    PATH = "transcoders"
    ARCHITECTURES = ("batchtopk", "jumprelu", "relu")

    def _check(self) -> None:
        self._need("layer", self.layer is None or self.layer >= 0, ">= 0 (or unset)")
        self._need("skip", bool(self.skip) and len(set(self.skip)) == len(self.skip),
                   "a non-empty list of distinct booleans: [false], [true] or [false, true]")
        if self.train.architecture not in self.ARCHITECTURES:
            raise ConfigValueError(
                self.PATH, "train.architecture",
                f"must be one SAELens saves transcoders of, {list(self.ARCHITECTURES)} (it has "
                f"no TopK transcoder), got {self.train.architecture!r}")
