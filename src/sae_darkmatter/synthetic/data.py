"""The synthetic activation model: its config, generation and ground truth."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from sae_darkmatter.config_base import _Checked
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.saes import load_sae

FREQUENCIES = ("zipf", "uniform")
MAGNITUDES = ("exponential", "lognormal", "constant")
_LOGNORMAL_SIGMA = 0.5
_GEN_ROWS = 4096  # rows of uniforms drawn at once when sampling which features fire


@dataclass(frozen=True)
class SyntheticConfig(_Checked):
    """A synthetic activation model and the (ablation × noise) grid evaluated on it.

    ``l0`` is the expected number of active features per token. ``dictionary`` is ``"random"``
    (Gaussian rows, normalised: near-orthogonal) or a SAELens SAE folder whose normalised
    decoder rows become the features (``d`` and ``n_features`` then come from it). ``ablations``
    are shares of the least active features (by mean activation) the stand-in SAE lacks.
    Noise levels are in units of the clean per-coordinate RMS (module docstring).
    """

    d: int = 256
    n_features: int = 2048
    n_tokens: int = 20_000
    l0: float = 16.0
    frequency: str = "zipf"
    zipf_exponent: float = 1.0
    magnitude: str = "exponential"
    dictionary: str = "random"
    ablations: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    noise_levels: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    line_configs: tuple[tuple[float, float], ...] = ((0.5, 0.3), (0.3, 0.5))
    seed: int = 0

    PATH = "synthetic"

    def _check(self) -> None:
        if self.dictionary == "random":  # an SAE folder's decoder gives d and n_features
            self._need("d", self.d >= 1, ">= 1")
            self._need("n_features", self.n_features >= 1, ">= 1")
        self._need("n_tokens", self.n_tokens >= 2, ">= 2")
        self._need("l0", self.l0 > 0, "> 0")
        self._need("frequency", self.frequency in FREQUENCIES, f"one of {list(FREQUENCIES)}")
        self._need("zipf_exponent", self.frequency != "zipf" or self.zipf_exponent >= 0, ">= 0")
        self._need("magnitude", self.magnitude in MAGNITUDES, f"one of {list(MAGNITUDES)}")
        self._need("ablations", all(0 <= a < 1 for a in self.ablations), "shares in [0, 1)")
        self._need("noise_levels", all(map(_noise_level_ok, self.noise_levels)),
                   "finite noise levels >= 0")
        self._need("line_configs", all(_noise_level_ok(v) for p in self.line_configs for v in p),
                   "(act, rec) pairs of finite noise levels >= 0")


def _noise_level_ok(level: float) -> bool:
    return level >= 0 and math.isfinite(level)


@dataclass(frozen=True)
class SyntheticData:
    """Generated activations and their ground truth.

    ``values``/``indices`` [N, K] hold each token's active features, padded with value 0 at
    index 0 (K = the largest count in any token); ``x = codes @ dictionary`` in float32.
    ``feature_mean`` is each feature's mean activation over all tokens (float64), the ranking
    used for ablations; ``noise_unit`` the clean per-coordinate RMS (noise levels' unit).
    """

    cfg: SyntheticConfig
    dictionary: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    x: torch.Tensor
    probabilities: torch.Tensor
    feature_mean: torch.Tensor
    noise_unit: float

    @property
    def n_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def d(self) -> int:
        return self.x.shape[1]

    @property
    def n_features(self) -> int:
        return self.dictionary.shape[0]

    def dense_codes(self) -> torch.Tensor:
        """Codes as a dense float32 [N, F] matrix (memory N·F; for small models and tests)."""
        codes = torch.zeros(self.n_tokens, self.n_features)
        return codes.scatter_add_(1, self.indices, self.values)

    def decode(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``(codes ⊙ keep) @ D`` [N, d] float32; ``keep`` [F] bool (None: all features)."""
        weights = self.values if keep is None else self.values * keep[self.indices]
        return F.embedding_bag(
            self.indices, self.dictionary, per_sample_weights=weights, mode="sum"
        )


def _load_dictionary(cfg: SyntheticConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.dictionary == "random":
        rows = torch.randn(cfg.n_features, cfg.d, generator=gen)
    else:
        path = Path(cfg.dictionary)
        if not path.is_dir():
            raise DarkMatterError(
                f"dictionary must be 'random' or an SAE folder; {path} is not a folder"
            )
        rows = load_sae(path).W_dec.detach().float().cpu()
    norms = rows.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise DarkMatterError(
            f"dictionary {cfg.dictionary!r} has {int((norms == 0).sum())} zero rows"
        )
    return (rows / norms).contiguous()


def feature_probabilities(cfg: SyntheticConfig, n_features: int) -> torch.Tensor:
    """Firing probabilities p_i (float64) with Σ p_i = l0 and p_i ≤ 1.

    zipf: p_i = min(1, c·(i+1)^−α), c found by bisection so the sum is exactly l0 (plain
    rescaling then clipping would lose mass whenever the head clips); uniform: l0 / F.
    """
    if cfg.frequency == "uniform":
        return torch.full((n_features,), cfg.l0 / n_features, dtype=torch.float64)
    shape = torch.arange(1, n_features + 1, dtype=torch.float64).pow(-cfg.zipf_exponent)
    lo, hi = 0.0, cfg.l0 / float(shape.min())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((mid * shape).clamp(max=1).sum()) < cfg.l0 else (lo, mid)
    return (hi * shape).clamp(max=1.0)


def _magnitudes(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """Positive activation sizes with mean 1."""
    if kind == "exponential":
        return torch.empty(n).exponential_(1.0, generator=gen)
    if kind == "lognormal":
        s = _LOGNORMAL_SIGMA
        return torch.exp(torch.randn(n, generator=gen) * s - s * s / 2)
    return torch.ones(n)


def generate(cfg: SyntheticConfig) -> SyntheticData:
    """Sample the dictionary, the sparse codes and ``x = codes @ D`` (float32, seeded)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    dictionary = _load_dictionary(cfg, gen)
    n_features, d = dictionary.shape
    if cfg.l0 > n_features:
        raise DarkMatterError(f"l0 ({cfg.l0}) cannot exceed the number of features ({n_features})")
    cfg = replace(cfg, d=d, n_features=n_features)
    p = feature_probabilities(cfg, n_features)
    p32 = p.float()
    rows, cols = [], []
    for start in range(0, cfg.n_tokens, _GEN_ROWS):
        n = min(_GEN_ROWS, cfg.n_tokens - start)
        r, c = (torch.rand(n, n_features, generator=gen) < p32).nonzero(as_tuple=True)
        rows.append(r + start)
        cols.append(c)
    row, col = torch.cat(rows), torch.cat(cols)  # row-major order from nonzero
    counts = torch.bincount(row, minlength=cfg.n_tokens)
    k = max(1, int(counts.max()))
    slot = torch.arange(row.numel()) - (torch.cumsum(counts, 0) - counts)[row]
    values = torch.zeros(cfg.n_tokens, k)
    indices = torch.zeros(cfg.n_tokens, k, dtype=torch.int64)
    values[row, slot] = _magnitudes(cfg.magnitude, row.numel(), gen)
    indices[row, slot] = col
    x = F.embedding_bag(indices, dictionary, per_sample_weights=values, mode="sum")
    feature_mean = torch.zeros(n_features, dtype=torch.float64).index_add_(
        0, indices.flatten(), values.flatten().double()) / cfg.n_tokens
    noise_unit = math.sqrt(centred_ss(x) / x.numel())
    return SyntheticData(cfg, dictionary, values, indices, x, p, feature_mean, noise_unit)


def centred_ss(y: torch.Tensor) -> float:
    """Σ‖y − ȳ‖² (per-dimension mean), float64."""
    y = y.double()
    return float((y - y.mean(0)).square().sum())
