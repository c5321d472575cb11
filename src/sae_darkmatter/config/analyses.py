"""Settings of the analyses that need more than the decomposition."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sae_darkmatter.config.train import SAETrainConfig
from sae_darkmatter.config_base import _Checked, _need_device


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
