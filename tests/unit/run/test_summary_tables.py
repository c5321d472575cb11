"""The end-of-run tables (`darkmatter run`) read in an ordinary 80-column terminal."""

from __future__ import annotations

import io

from rich.console import Console

from sae_darkmatter.cli.common import sae_summary, timings_summary

SAE = {"d_sae": 4096, "k": 64, "l0": 63.97, "fvu": 0.273412, "fvu_linear": 0.1234,
       "fvu_nonlinear": 0.150012, "linear_share": 0.4513, "r2_error_mean_dim": 0.5512,
       "r2_error_norm": 0.7321}
LONG = "gemma-scope-2b-pt-res-canonical__layer_12_width_16k_canonical"


def render(table) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(table)
    return out.getvalue().splitlines()


def test_sae_table_shows_every_number_in_80_columns():
    metrics = {"model": "SmolLM2-135M", "hook": "resid_post.15",
               "saes": [{**SAE, "name": "topk-w4096-k64"}, {**SAE, "name": LONG, "k": None}]}
    lines = render(sae_summary(metrics))
    text = "\n".join(lines)
    assert max(map(len, lines)) <= 80
    assert "…" not in text
    for number in ("4,096", "64.0", "0.2734", "0.1234", "0.1500", "0.451", "0.551", "0.732"):
        assert text.count(number) == 2, number
    assert "topk-w4096-k64" in text
    # a long pretrained name wraps over lines instead of being cut
    assert LONG in "".join(line.split()[0] for line in lines if line.strip())


def test_timings_table_lists_stages_analyses_and_reuse():
    metrics = {"timings_s": {"harvest": 301.25, "train": 250.0, "decompose": 40.5,
                             "analyses": 90.0, "report": 2.0},
               "analyses": {"scaling": {"seconds": 1.5},
                            "cross_layer": {"seconds": 80.04},
                            "per_token": {"seconds": 3.0, "reused": True},
                            "downstream": {"skipped": "no model", "seconds": 0.1}}}
    text = "\n".join(render(timings_summary(metrics)))
    for row in ("harvest", "301.2", "cross_layer", "80.0", "downstream (skipped)", "683.8"):
        assert row in text, row
    assert "reused" in text.split("per_token")[1].splitlines()[0]
