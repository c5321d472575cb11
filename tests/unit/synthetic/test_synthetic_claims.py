"""The synthetic Table 1 against the paper's pattern: Fisher intervals and verdicts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sae_darkmatter.analyses.claims import AGREES, DISAGREES, INCONCLUSIVE
from sae_darkmatter.synthetic.claims import check_synthetic, fisher_interval


@pytest.mark.parametrize("r_true", [0.0, 0.5, 0.95])
def test_fisher_interval_matches_scipy(r_true):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(25)
    y = r_true * x + np.sqrt(1 - r_true**2) * rng.standard_normal(25)
    res = stats.pearsonr(x, y)
    ci = res.confidence_interval(0.95)
    assert fisher_interval(float(res.statistic), 25) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert fisher_interval(1.0, 25) is None and fisher_interval(0.5, 3) is None


def _results(diag, off, n=25):
    table = {"act_noise": {"est_linear": diag, "est_nonlinear": off},
             "rec_noise": {"est_linear": off, "est_nonlinear": diag}}
    return {"grid": [{}] * n, "table1": {"in_sample": table, "held_out": table}}


def test_verdicts_read_the_intervals():
    # n = 25: r = 0.97 -> [0.93, 0.99] inside [0.8, 1]; r = 0.02 -> about [-0.38, 0.41]
    rows = check_synthetic(_results(0.97, 0.02))["claims"]
    diag, off = rows
    assert diag["verdict"] == AGREES and len(diag["items"]) == 4
    assert diag["items"][0]["name"] == "in_sample: activation noise ~ est. linear error"
    assert diag["items"][0]["ci"] == pytest.approx(list(fisher_interval(0.97, 25)))
    assert off["verdict"] == INCONCLUSIVE  # 25 configurations cannot pin r = 0 to ±0.3
    assert check_synthetic(_results(0.97, 0.02, n=400))["claims"][1]["verdict"] == AGREES
    assert check_synthetic(_results(0.3, 0.9))["claims"][0]["verdict"] == DISAGREES
    assert check_synthetic(_results(0.3, 0.9))["claims"][1]["verdict"] == DISAGREES
