"""The paper's synthetic Table 1 checked on our synthetic grid (App. C.3).

Table 1 correlates, over the noise grid, each true noise level with each estimate: the pattern
it reports is a high diagonal (activation noise ~ estimated linear error, reconstruction noise ~
estimated nonlinear error) and a low off-diagonal; the paper prints no numbers
(``shared/paper_spec.md`` §5). Each Pearson r gets a Fisher-z 95 % interval over the grid's
configurations; verdicts are those of ``analyses.claims``.
"""

from __future__ import annotations

import math
from typing import Any

from sae_darkmatter.analyses.claims import Item, Region
from sae_darkmatter.analyses.paper import Claim, Estimates, check_claims
from sae_darkmatter.analyses.registry import Results

Z95 = 1.959963984540054
DIAGONAL = (("act_noise", "est_linear"), ("rec_noise", "est_nonlinear"))
OFF_DIAGONAL = (("act_noise", "est_nonlinear"), ("rec_noise", "est_linear"))
NAMES = {"act_noise": "activation noise", "rec_noise": "reconstruction noise",
         "est_linear": "est. linear error", "est_nonlinear": "est. nonlinear error"}
SETTING = ("ours: a synthetic dictionary (see the config), noise stds in units of the clean "
           "activations' RMS, FVU with per-dimension means; paper: x = a Gemma Scope SAE's "
           "reconstruction of 50k Gemma 2 9B tokens, absolute stds 0-4, in-sample fits")


def fisher_interval(r: float, n: int) -> tuple[float, float] | None:
    """95 % interval of a Pearson r over ``n`` pairs (Fisher z); None when n < 4 or |r| = 1."""
    if n < 4 or not abs(r) < 1:
        return None
    z, half = math.atanh(r), Z95 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def _cells(pairs: tuple[tuple[str, str], ...]) -> Estimates:
    def read(results: Results, saes: list[dict[str, Any]]) -> list[Item]:
        n = len(results["grid"])
        return [Item(f"{fit}: {NAMES[noise]} ~ {NAMES[est]}", r, fisher_interval(r, n))
                for fit, table in results["table1"].items() for noise, est in pairs
                for r in [float(table[noise][est])]]
    return read


CLAIMS = (
    Claim("synthetic_diagonal", "On synthetic data each estimate tracks its own noise (Table 1 "
          "diagonal)", "no number in the paper", "Table 1 (App. C.3), pattern only",
          "Pearson r over the noise grid, true noise level vs its estimate",
          Region(0.8, 1.0, "r >= 0.8 (\"high\")"), _cells(DIAGONAL)),
    Claim("synthetic_off_diagonal", "... and not the other noise (Table 1 off-diagonal)",
          "no number in the paper", "Table 1 (App. C.3), pattern only",
          "Pearson r over the noise grid, true noise level vs the other estimate",
          Region(-0.3, 0.3, "|r| <= 0.3 (\"low\")"), _cells(OFF_DIAGONAL)),
)


def check_synthetic(results: dict[str, Any]) -> dict[str, Any]:
    """The "Against the paper" result of a synthetic grid: setting and one row per claim."""
    return {"setting": SETTING, "claims": check_claims(results, [], None, CLAIMS)}
