"""What a decomposition produces, and its files: ``<name>.json`` plus a safetensors file.

``Decomposition`` holds the held-out metrics (both drivers), ``DecompositionOutput`` adds the
probes and per-token values of the store driver (``save``), and ``load_decompositions`` reads a
decompose folder back for the analyses and the report.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_darkmatter._io import atomic_path
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.linalg import LinearProbe


@dataclass(frozen=True)
class Decomposition:
    """Held-out metrics of one SAE's error decomposition (see ``sae_darkmatter.decompose``).

    A transcoder's also name its output hook ``hook_out`` and width ``d_out`` (``hook`` and
    ``d_in`` are its input's), and a skip transcoder's the ``skip`` accounting; all three are
    None for an SAE and left out of ``to_dict``.
    """

    hook: str
    d_in: int
    d_sae: int
    n_probe_train: int
    n_probe_test: int
    l0: float
    fvu: float
    fvu_linear: float
    fvu_nonlinear: float
    linear_share: float
    r2_error_mean_dim: float
    r2_error_pooled: float
    r2_error_norm: float
    bias: bool
    ridge: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    probe_rank: int | None = None  # numerical rank of the probe system (d_in: full)
    probe_cond: float | None = None  # cond of the centred, scaled XᵀX (None: singular)
    probe_regularized: bool = False  # True: solved with a pseudo-inverse (degenerate x)
    hook_out: str | None = None  # a transcoder's output hook (the target y)
    d_out: int | None = None
    skip: SkipAccount | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.skip is not None:
            out["skip"]["without_skip"] = self.skip.without_skip.to_dict()
        return {k: v for k, v in out.items() if v is not None or k not in _TRANSCODER_ONLY}


_TRANSCODER_ONLY = ("hook_out", "d_out", "skip")


@dataclass(frozen=True)
class SkipAccount:
    """How much of a skip transcoder's error its skip term ``x·W_skipᵀ`` removes (held out).

    ``without_skip`` decomposes the same transcoder with the skip term left out of ``ŷ``
    (``e₀ = y − decode(encode(x)) = e + x·W_skipᵀ``), on the same tokens and probe system.
    The skip term is linear in ``x`` and the probe has a bias column, so leaving it out changes
    only the linear part: ``fvu_nonlinear`` is the same both ways (up to rounding, and exactly
    so only without ridge). Hence

    - ``fvu_absorbed = without_skip.fvu_linear − fvu_linear``: the linear dark matter the skip
      term absorbs, in units of y's variance (≈ ``without_skip.fvu − fvu``; negative when the
      skip term adds error);
    - ``absorbed_share = fvu_absorbed / without_skip.fvu_linear``: 1 when the skip term leaves no
      linearly predictable error, 0 when it removes none.

    ``ci`` holds the 95 % bootstrap interval of ``fvu_absorbed`` (same resamples as the others).
    """

    without_skip: Decomposition
    fvu_absorbed: float
    absorbed_share: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class DecompositionOutput:
    """Metrics, the fitted probes, and per-token values on the held-out tokens.

    ``tokens`` maps ``rows`` (global store rows of the probe-test split, ascending), ``err_sq``
    (‖e‖²), ``linear_sq`` (‖ê‖²), ``nonlinear_sq`` (‖e − ê‖²), ``err_sq_pred`` (the norm
    probe's prediction of ‖e‖²), ``x_centered_sq`` (‖x − x̄‖², x̄ the test mean; a
    transcoder's target's ‖y − ȳ‖²) and ``l0`` to arrays aligned with ``rows``.
    """

    metrics: Decomposition
    error_probe: LinearProbe
    norm_probe: LinearProbe
    tokens: dict[str, np.ndarray]

    def save(self, path: str | Path) -> None:
        """Write probes and per-token values as one safetensors file (atomic)."""
        tensors = {
            "error_probe.weight": self.error_probe.weight,
            "error_probe.bias": self.error_probe.bias,
            "norm_probe.weight": self.norm_probe.weight,
            "norm_probe.bias": self.norm_probe.bias,
            **{
                f"test.{k}": torch.from_numpy(np.ascontiguousarray(v))
                for k, v in self.tokens.items()
            },
        }
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


@dataclass(frozen=True)
class SavedDecomposition:
    """One ``<name>.json`` of a decompose folder with the per-token arrays of its safetensors.

    ``tokens`` holds the ``test.*`` arrays without their prefix (see ``DecompositionOutput``);
    ``probe_path`` is the safetensors file, for the probes.
    """

    name: str
    info: dict[str, Any]
    tokens: dict[str, np.ndarray]
    probe_path: Path

    @property
    def width(self) -> int:
        return int(self.info["metrics"]["d_sae"])

    @property
    def k(self) -> int | None:
        k = self.info.get("sae", {}).get("k")
        return None if k is None else int(k)


TOKEN_ARRAYS = ("rows", "err_sq", "linear_sq", "nonlinear_sq", "err_sq_pred", "x_centered_sq", "l0")


def load_decompositions(decompose_dir: str | Path) -> list[SavedDecomposition]:
    """Every decomposition result in ``decompose_dir``, sorted by (width, k, name).

    Other JSON files there are ignored. A missing safetensors file, or one without the
    per-token arrays (written by an older version), is an error that says to rerun decompose.
    """
    folder = Path(decompose_dir)
    out = []
    for path in sorted(folder.glob("*.json")):
        info = json.loads(path.read_text())
        if not isinstance(info, dict) or "probe_file" not in info or "metrics" not in info:
            continue
        probe = folder / info["probe_file"]
        if not probe.is_file():
            raise DarkMatterError(f"{path} names {probe}, which does not exist; rerun decompose")
        with safe_open(str(probe), framework="np") as fh:
            missing = [k for k in TOKEN_ARRAYS if f"test.{k}" not in fh.keys()]
            if missing:
                raise DarkMatterError(
                    f"{probe} lacks the per-token arrays {missing} (an older version wrote it); "
                    "rerun decompose"
                )
            tokens = {k: fh.get_tensor(f"test.{k}") for k in TOKEN_ARRAYS}
        out.append(SavedDecomposition(info.get("name", path.stem), info, tokens, probe))
    if not out:
        raise DarkMatterError(
            f"no decomposition results (<name>.json with a probe file) in {folder}; "
            "run 'darkmatter decompose' first"
        )
    return sorted(out, key=lambda d: (d.width, d.k if d.k is not None else -1, d.name))
