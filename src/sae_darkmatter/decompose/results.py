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
    """Held-out metrics of one SAE's error decomposition (see ``sae_darkmatter.decompose``)."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DecompositionOutput:
    """Metrics, the fitted probes, and per-token values on the held-out tokens.

    ``tokens`` maps ``rows`` (global store rows of the probe-test split, ascending), ``err_sq``
    (‖e‖²), ``linear_sq`` (‖ê‖²), ``nonlinear_sq`` (‖e − ê‖²), ``err_sq_pred`` (the norm
    probe's prediction of ‖e‖²), ``x_centered_sq`` (‖x − x̄‖², x̄ the test mean) and ``l0``
    to arrays aligned with ``rows``.
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
