"""Auto-interpretability without a server: parsing the judge's answers, the scoring
arithmetic, and config checks."""

from __future__ import annotations

import numpy as np
import pytest

from sae_darkmatter.autointerp import (
    AutoInterpConfig,
    latent_counts,
    parse_detection,
    parse_explanation,
    summarize,
)
from sae_darkmatter.autointerp.scoring import latent_balanced_accuracy
from sae_darkmatter.errors import ConfigError

# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "n", "expected"), [
    ("[1, 3]", 4, [True, False, True, False]),
    ("The matching snippets are:\n[2]", 3, [False, True, False]),
    ("[1, 0, 0, 1]", 4, [True, False, False, True]),  # one 0/1 per snippet
    ("[1, 1, 1]", 3, [True, True, True]),  # n values, a repeat: a 0/1 vector
    ("[]", 3, [False, False, False]),
    ("1, 3 and 4", 4, [True, False, True, True]),
    ("3", 3, [False, False, True]),
    ("1: yes\n2: no\n3: Yes", 3, [True, False, True]),
    ("Snippet 1 - no\nSnippet 2 - yes", 2, [False, True]),
    ("None of them.", 2, [False, False]),
    ("[7]", 4, None),  # out of range
    ("1: yes\n2: no", 3, None),  # yes/no for only some snippets
    ("The output of", 3, None),
    ("", 3, None),
])
def test_parse_detection(text, n, expected):
    assert parse_detection(text, n) == expected


def test_parse_explanation():
    assert parse_explanation("Explanation: the keyword return.\nMore text") == "the keyword return."
    assert parse_explanation('  "Python keywords" ') == "Python keywords"
    assert parse_explanation("Sure! explanation:\n\n  closing brackets") == "closing brackets"
    assert parse_explanation("ok") is None and parse_explanation("") is None
    assert (
        parse_explanation('{"explanation": "Python keywords"}') == "Python keywords"
    )  # constrained
    assert parse_detection('{"matches": [2, 3]}', 3) == [False, True, True]


# ---------------------------------------------------------------------------- scoring


def test_scoring_against_hand_computed_counts():
    # latent A: Q1 yes+no, Q2 yes, negatives no+yes; latent B: Q1 yes, Q2 yes, negative no
    a = latent_counts([(1, True), (1, False), (2, True), (0, False), (0, True)], 2)
    b = latent_counts([(1, True), (2, True), (0, False)], 2)
    assert a[0].tolist() == [1, 1, 1] and a[1].tolist() == [2, 2, 1]
    s = summarize(np.stack([a[0], b[0]]), np.stack([a[1], b[1]]), n_boot=500, seed=1)
    assert [q["accuracy"] for q in s["quantiles"]] == pytest.approx([2 / 3, 1.0])
    assert (s["quantiles"][0]["correct"], s["quantiles"][0]["total"]) == (2, 3)
    assert s["negatives"]["accuracy"] == pytest.approx(2 / 3)
    assert s["recall"]["value"] == pytest.approx(4 / 5)
    assert s["specificity"]["value"] == pytest.approx(2 / 3)
    assert s["balanced_accuracy"]["value"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    p, n = 2 / 3, 3
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    assert s["negatives"]["ci_normal"] == pytest.approx([p - half, 1.0])  # clipped at 1
    for block in (s["recall"], s["specificity"], s["balanced_accuracy"]):
        assert block["ci"][0] <= block["value"] <= block["ci"][1]
    # resampling latents: recall is 2/3 (A alone), 4/5 (mixed) or 1 (B alone)
    assert s["recall"]["ci"][0] == pytest.approx(2 / 3) and s["recall"]["ci"][1] == pytest.approx(
        1.0
    )
    assert latent_balanced_accuracy(*a) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert summarize(np.stack([a[0], b[0]]), np.stack([a[1], b[1]]), n_boot=500, seed=1) == s


def test_scoring_edge_cases():
    c, t = latent_counts([(1, True), (2, False)], 2)  # no negatives: specificity undefined
    s = summarize(np.stack([c, c]), np.stack([t, t]), n_boot=100)
    assert s["specificity"]["value"] is None and s["balanced_accuracy"]["value"] is None
    assert s["recall"]["ci"] == [0.5, 0.5]  # identical latents: no spread
    empty = summarize(np.zeros((0, 3), int), np.zeros((0, 3), int), n_boot=50)
    assert empty["n_latents"] == 0 and empty["recall"]["value"] is None
    with pytest.raises(ValueError):
        latent_counts([(3, True)], 2)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="explain_fraction"):
        AutoInterpConfig(explain_fraction=1.0)
    with pytest.raises(ConfigError, match="pool"):
        AutoInterpConfig(pool=5)
