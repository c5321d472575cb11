"""Comparisons of two runs of the pipeline (the device under test against the CPU), for gpu_check.

Every comparison returns a ``Diff``: the worst deviation found, where, and whether it is within
its tolerance. Tolerances are ``Tol(atol, rtol)`` pairs (pass: ``|a - b| <= atol + rtol·|b|``,
``b`` the reference value), scaled by ``--tolerance-scale``; ``gpu_check_steps.Tolerances``
says why each one is what it is.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from sae_darkmatter.store import ActivationStore


@dataclass(frozen=True)
class Tol:
    """``|a - b| <= atol + rtol·|b|``."""

    atol: float
    rtol: float = 0.0

    def scaled(self, s: float) -> Tol:
        return Tol(self.atol * s, self.rtol * s)

    def bound(self, ref: float) -> float:
        return self.atol + self.rtol * abs(ref)


@dataclass
class Diff:
    """The worst of many comparisons: ``value`` at ``where`` (``ratio``: value / its bound)."""

    value: float = 0.0
    where: str = ""
    ratio: float = 0.0
    count: int = 0
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.count > 0 and not self.problems and self.ratio <= 1.0

    def add(self, where: str, value: float, bound: float) -> None:
        """Record ``value`` (a deviation) against ``bound`` (its tolerance)."""
        self.count += 1
        if not math.isfinite(value):
            self.problems += (f"{where}: not finite",)
            return
        ratio = value / bound if bound > 0 else (0.0 if value == 0 else math.inf)
        if ratio > self.ratio or not self.where:
            self.value, self.where, self.ratio = value, where, ratio

    def problem(self, text: str) -> None:
        self.problems += (text,)

    def merge(self, other: Diff, prefix: str = "") -> None:
        self.count += other.count
        self.problems += tuple(prefix + p for p in other.problems)
        if other.ratio > self.ratio or (not self.where and other.where):
            self.value, self.where, self.ratio = other.value, prefix + other.where, other.ratio

    def summary(self, what: str = "|Δ|") -> str:
        if not self.count:
            return "nothing compared"
        text = f"max {what} {self.value:.2g} at {self.where} ({self.ratio:.2g}× tol)"
        return text + (f"; {'; '.join(self.problems[:3])}" if self.problems else "")


def compare_numbers(ref: float, got: float, tol: Tol, where: str, diff: Diff) -> None:
    if isinstance(ref, float) and isinstance(got, float) and math.isnan(ref) and math.isnan(got):
        diff.add(where, 0.0, 1.0)
        return
    diff.add(where, abs(got - ref), tol.bound(ref))


# --------------------------------------------------------------------------- stores


def compare_stores(ref_path: Path, got_path: Path, fro: Tol, peak: Tol, loss: Tol) -> Diff:
    """Token ids equal; per hook ``‖b − a‖_F / ‖a‖_F`` within ``fro`` and
    ``max|b − a| / max|a|`` within ``peak`` (``a`` the reference); the stored per-token loss
    within ``loss`` (nats)."""
    ref, got = ActivationStore.open(ref_path), ActivationStore.open(got_path)
    diff = Diff()
    if ref.n_rows != got.n_rows or list(ref.hooks) != list(got.hooks):
        diff.problem(f"shape: {ref.n_rows} rows {list(ref.hooks)} vs {got.n_rows} "
                     f"{list(got.hooks)}")
        return diff
    if not np.array_equal(ref.column("tokens"), got.column("tokens")):
        diff.problem("token ids differ")
    rows = np.arange(ref.n_rows)
    for hook in ref.hooks:
        a = ref.gather(hook, rows).double().numpy()
        b = got.gather(hook, rows).double().numpy()
        diff.add(f"{hook} (Frobenius)",
                 float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-30)), fro.bound(0.0))
        diff.add(f"{hook} (max)",
                 float(np.abs(b - a).max() / max(np.abs(a).max(), 1e-30)), peak.bound(0.0))
    la, lb = ref.column("loss"), got.column("loss")  # NaN where there is none
    if not np.array_equal(np.isnan(la), np.isnan(lb)):
        diff.problem("loss: NaN positions differ")
    else:
        fin = ~np.isnan(la)
        diff.add("loss", float(np.abs(la[fin] - lb[fin]).max(initial=0.0)), loss.bound(0.0))
    return diff


# --------------------------------------------------------------------------- decompositions

DECOMPOSE_KEYS = ("l0", "fvu", "fvu_linear", "fvu_nonlinear", "linear_share",
                  "r2_error_mean_dim", "r2_error_pooled", "r2_error_norm")
PER_TOKEN_KEYS = ("err_sq", "linear_sq", "nonlinear_sq", "err_sq_pred")


def decompositions(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def compare_decompositions(ref_dir: Path, got_dir: Path, tol: Tol, per_token: Tol) -> Diff:
    """Same SAEs on the same store: the held-out metrics (and their intervals) within ``tol``;
    each token's ``‖e‖²``, ``‖ê‖²``, ``‖e − ê‖²`` and predicted ``‖e‖²`` within ``per_token``
    relative to that column's mean."""
    ref, got = decompositions(ref_dir), decompositions(got_dir)
    diff = Diff()
    if sorted(ref) != sorted(got) or not ref:
        diff.problem(f"SAEs {sorted(ref)} vs {sorted(got)}")
        return diff
    for name in ref:
        a, b = ref[name]["metrics"], got[name]["metrics"]
        for key in DECOMPOSE_KEYS:
            compare_numbers(a[key], b[key], tol, f"{name}.{key}", diff)
        for key, (lo, hi) in a.get("ci", {}).items():
            lo2, hi2 = b["ci"][key]
            compare_numbers(lo, lo2, tol, f"{name}.ci.{key}", diff)
            compare_numbers(hi, hi2, tol, f"{name}.ci.{key}", diff)
        ta = load_file(str(ref_dir / ref[name]["probe_file"]))
        tb = load_file(str(got_dir / got[name]["probe_file"]))
        if not np.array_equal(ta["test.rows"], tb["test.rows"]):
            diff.problem(f"{name}: other test rows")
            continue
        for key in PER_TOKEN_KEYS:
            x, y = ta[f"test.{key}"].astype(np.float64), tb[f"test.{key}"].astype(np.float64)
            scale = max(float(np.abs(x).mean()), 1e-30)
            diff.add(f"{name}.{key}[token]", float(np.abs(x - y).max() / scale),
                     per_token.bound(0.0))
    return diff


# --------------------------------------------------------------------------- training


def training_records(saes_dir: Path) -> dict[str, dict[str, Any]]:
    """``training.json`` of every SAE under ``saes_dir`` (grid and per-hook), by relative path."""
    return {str(p.parent.relative_to(saes_dir)): json.loads(p.read_text())
            for p in sorted(saes_dir.rglob("training.json"))}


def compare_training(ref_run: Path, got_run: Path, tol: Tol) -> Diff:
    """SAEs trained on each device from the same data and seed: final training FVU and L0 (from
    ``training.json``) and held-out FVU (``metrics.json``) within ``tol``."""
    ref, got = training_records(ref_run / "saes"), training_records(got_run / "saes")
    diff = Diff()
    if sorted(ref) != sorted(got) or not ref:
        diff.problem(f"SAEs {sorted(ref)} vs {sorted(got)}")
        return diff
    for name, a in ref.items():
        b = got[name]
        compare_numbers(a["final_train_fvu"], b["final_train_fvu"], tol, f"{name} train FVU", diff)
        l0_tol = Tol(tol.atol * 20, tol.rtol)  # L0 in latents, FVU in fractions
        compare_numbers(a["final_train_l0"], b["final_train_l0"], l0_tol, f"{name} L0", diff)
    held_ref = {s["name"]: s for s in _metrics(ref_run)["saes"]}
    held_got = {s["name"]: s for s in _metrics(got_run)["saes"]}
    for name, a in held_ref.items():
        if name not in held_got:
            diff.problem(f"{name} missing from metrics.json")
            continue
        compare_numbers(a["fvu"], held_got[name]["fvu"], tol, f"{name} held-out FVU", diff)
    return diff


def _metrics(run: Path) -> dict[str, Any]:
    return json.loads((run / "metrics.json").read_text())


# --------------------------------------------------------------------------- analyses


def numeric_leaves(obj: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """``(path, value)`` for every float (not int or bool) inside nested dicts and lists."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from numeric_leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from numeric_leaves(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        yield path, obj


def compare_tree(ref: Any, got: Any, tol: Tol, skip: Iterable[str] = ()) -> Diff:
    """Every float leaf of ``ref`` against the same path in ``got``, except paths matching any
    regular expression in ``skip``."""
    patterns = [re.compile(s) for s in skip]
    a, b = dict(numeric_leaves(ref)), dict(numeric_leaves(got))
    diff = Diff()
    for path, value in a.items():
        if any(p.search(path) for p in patterns):
            continue
        if path not in b:
            diff.problem(f"{path} missing")
            continue
        compare_numbers(value, b[path], tol, path, diff)
    return diff
