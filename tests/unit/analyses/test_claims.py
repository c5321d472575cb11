"""Against the paper: verdicts from intervals, and every claim read from constructed results."""

from __future__ import annotations

import json
import math

import pytest

from sae_darkmatter.analyses.claims import (
    AGREES,
    DISAGREES,
    INCONCLUSIVE,
    NOT_RUN,
    Item,
    Region,
    claim_verdict,
    interval_difference,
    item_verdict,
)
from sae_darkmatter.analyses.paper import CLAIMS, check_claims
from sae_darkmatter.config import ErrorSAEConfig, RunConfig, SAETrainConfig

HALF = Region(0.4, 0.6)


@pytest.mark.parametrize(("ci", "verdict"), [
    ((0.45, 0.55), AGREES),
    ((0.4, 0.6), AGREES),  # the region's ends belong to it
    ((0.61, 0.7), DISAGREES),
    ((0.1, 0.39), DISAGREES),
    ((0.55, 0.65), INCONCLUSIVE),  # straddles an end
    ((0.3, 0.7), INCONCLUSIVE),  # wider than the region
    (None, INCONCLUSIVE),
    ((math.nan, 0.5), INCONCLUSIVE),
])
def test_item_verdict_comes_from_the_interval_alone(ci, verdict):
    assert item_verdict(Item("a", 0.5, ci), HALF) == verdict


def test_one_sided_regions():
    above = Region(0.9, math.inf)
    assert item_verdict(Item("a", 0.95, (0.91, 0.99)), above) == AGREES
    assert item_verdict(Item("a", 0.7, (0.6, 0.8)), above) == DISAGREES
    with pytest.raises(ValueError, match="low < high"):
        Region(1.0, 1.0)


def test_claim_verdict_needs_every_item_to_agree_and_says_how_they_split():
    agree, disagree = Item("a", 0.5, (0.45, 0.55)), Item("b", 0.8, (0.75, 0.85))
    assert claim_verdict([agree, agree], HALF) == (AGREES, "all 2")
    assert claim_verdict([disagree], HALF) == (DISAGREES, "the one estimate")
    verdict, detail = claim_verdict([agree, disagree, Item("c", 0.5)], HALF)
    assert verdict == INCONCLUSIVE and detail == "1 agrees, 1 disagrees, 1 inconclusive (of 3)"
    assert claim_verdict([Item("c", 0.5), Item("d", 0.5)], HALF) == (
        INCONCLUSIVE, "all 2 (no interval computed for 2)")
    assert claim_verdict([], HALF) == (INCONCLUSIVE, "no estimate")


def test_interval_difference_covers_whenever_both_intervals_do():
    value, ci = interval_difference(Item("a", 1.0, (0.9, 1.2)), (0.5, (0.4, 0.55)))
    assert value == pytest.approx(0.5) and ci == pytest.approx((0.35, 0.8))
    for a in (0.9, 1.05, 1.2):  # any values inside both intervals give a difference inside
        for b in (0.4, 0.5, 0.55):
            assert ci[0] <= a - b <= ci[1]
    assert interval_difference((1.0, None), (0.5, (0.4, 0.6))) == (0.5, None)


def _saes(r2_mean, r2_norm):
    return [{"name": f"sae{i}", "r2_error_mean_dim": m, "r2_error_norm": n,
             "ci": {"r2_error_mean_dim": [m - 0.01, m + 0.01],
                    "r2_error_norm": [n - 0.05, n + 0.05]}}
            for i, (m, n) in enumerate(zip(r2_mean, r2_norm, strict=True))]


RESULTS = {
    "scaling": {"target_l0": 32, "per_width": [
        {"name": "w512", "width": 512, "fvu_nonlinear": 0.10, "fvu_nonlinear_ci": [0.099, 0.101]},
        {"name": "w4096", "width": 4096, "fvu_nonlinear": 0.14, "fvu_nonlinear_ci": [0.139, 0.141]},
    ]},
    "per_token": {"names": ["w512", "w1024", "w512b"], "ks": [32, 32, 64], "predictability": {
        "names": ["w512", "w1024", "w512b"], "widths": [512, 1024, 512],
        "r2": [[1.0, 0.9, 0.8], [None, 1.0, 0.7], [None, None, 1.0]],
        "r2_ci": [[None, [0.88, 0.92], [0.7, 0.9]], [None, None, [0.6, 0.8]], [None] * 3]}},
    "error_saes": {"table": [{"sae": "w4096", "width": 512, "l0": 8.0, "fvu_linear": 0.84,
                              "fvu_nonlinear": 0.85}]},
    "encoder_error": {"per_sae": [{"name": "w512", "sae_fvu_nonlinear": 0.10,
                                   "sae_fvu_nonlinear_ci": [0.099, 0.101],
                                   "pursuit_fvu_nonlinear": 0.099,
                                   "pursuit_fvu_nonlinear_ci": [0.098, 0.100]}]},
    "cross_layer": {"target": "resid_post.15", "sources": ["resid_post.15", "mlp_out.15"],
                    "predictors": {"resid_post.15": {"nonlinear": {"r2_mean_dim": 0.4}},
                                   "mlp_out.15": {"nonlinear": {"r2_mean_dim": 0.06}}}},
    "downstream": {"skipped": "no contexts"},
}


def test_every_claim_read_from_constructed_results():
    rows = {r["key"]: r for r in check_claims(RESULTS, _saes([0.5, 0.55], [0.7, 0.75]),
                                              RunConfig())}
    assert list(rows) == [c.key for c in CLAIMS]
    assert rows["error_vector_half"]["verdict"] == AGREES  # [0.49, 0.51] and [0.54, 0.56]
    assert rows["error_norm_90"]["verdict"] == DISAGREES  # [0.65, 0.75], [0.7, 0.8]
    # FVU nonlinear 0.10 -> 0.14: +33 % of the mean 0.12, interval [0.038, 0.042] / 0.12
    flat = rows["fvu_nonlinear_flat"]
    assert flat["verdict"] == DISAGREES
    assert flat["items"][0]["value"] == pytest.approx(0.04 / 0.12)
    assert flat["items"][0]["ci"] == pytest.approx([0.038 / 0.12, 0.042 / 0.12])
    # same k only (w512 -> w1024)
    same = rows["same_tokens"]
    assert [(i["name"], i["ci"]) for i in same["items"]] == [("w512 -> w1024", [0.88, 0.92])]
    assert same["verdict"] == AGREES
    # no interval: inconclusive, saying why
    worse = rows["error_saes_worse"]
    assert worse["items"][0]["value"] == pytest.approx(0.01)
    assert worse["verdict"] == INCONCLUSIVE and "no interval" in worse["detail"]
    pursuit = rows["pursuit_slight"]["items"][0]
    assert pursuit["value"] == pytest.approx(0.01) and pursuit["ci"] == pytest.approx([-0.01, 0.03])
    assert rows["pursuit_slight"]["verdict"] == AGREES  # the drop is at most 3 % < 10 %
    assert [i["name"] for i in rows["earlier_outputs"]["items"]] == ["mlp_out.15"]
    down = rows["ce_proportional"]
    assert down["verdict"] == NOT_RUN and "skipped: no contexts" in down["detail"]
    assert rows["error_saes_worse"]["differs"].endswith(
        "widths (512,), each trained 48,000 tokens")
    plateau = RunConfig(error_saes=ErrorSAEConfig(train=SAETrainConfig(
        widths=(512,), until="plateau", plateau_tolerance=0.005, train_tokens=10**6)))
    assert check_claims(RESULTS, [], plateau)[4]["differs"].endswith(
        "each trained until a plateau (< 0.5% FVU per doubling of tokens), at most 1,000,000 "
        "tokens")
    assert rows["error_saes_worse"]["region"] == [0.0, None]  # an open end: strict JSON
    json.dumps(list(rows.values()), allow_nan=False)


def test_a_claim_whose_analysis_is_absent_says_so():
    rows = check_claims({}, [], RunConfig())
    by_key = {r["key"]: r for r in rows}
    assert by_key["error_vector_half"]["verdict"] == INCONCLUSIVE  # no SAEs: no estimate
    assert by_key["fvu_nonlinear_flat"]["verdict"] == NOT_RUN
    assert by_key["fvu_nonlinear_flat"]["detail"] == "the scaling analysis is not in this run"
