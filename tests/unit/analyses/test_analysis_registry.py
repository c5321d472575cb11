"""The analyses' one registry: run order, report order, CLI help and errors all read it."""

from __future__ import annotations

import html
import re

import pytest
from typer.testing import CliRunner

from sae_darkmatter.analyses import ANALYSES, run_analyses
from sae_darkmatter.analyses.registry import NAMES, get, run_order
from sae_darkmatter.cli import app
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.report.sections import AUTOINTERP_TITLE, analyses_html


def test_every_name_resolves_to_its_own_record():
    assert ANALYSES == NAMES
    assert set(NAMES) == {"paper", "scaling", "per_token", "norms", "encoder_error",
                          "cross_layer", "error_saes", "downstream", "transcoders",
                          "transcoder_downstream"}
    for name in NAMES:
        record = get(name)
        assert record.name == name and record.title and callable(record.section)


def test_run_order_puts_what_an_analysis_needs_first():
    assert run_order(("scaling", "encoder_error")) == ["encoder_error", "scaling"]
    assert run_order(NAMES)[:2] == ["encoder_error", "scaling"]
    assert sorted(run_order(NAMES)) == sorted(NAMES)
    assert run_order(("scaling",)) == ["scaling"]  # a need that was not asked for is not added
    order = run_order(NAMES)  # "Against the paper" reads every other result: it runs after them
    assert all(order.index(n) < order.index("paper") for n in get("paper").needs)


def test_unknown_names_are_refused_before_any_work(tmp_path):
    with pytest.raises(DarkMatterError, match=r"unknown analyses \['nope'\]; choose from"):
        run_analyses(tmp_path / "no_run", only=("scaling", "nope"))
    with pytest.raises(DarkMatterError, match="unknown analyses"):
        get("nope")


def test_report_sections_follow_the_registry_and_say_why_one_was_skipped(tmp_path):
    results = {name: {"skipped": f"why {name}"} for name in reversed(NAMES)}
    results["autointerp"] = {"skipped": "no endpoint"}
    page = analyses_html(results, tmp_path)
    titles = [html.unescape(t) for t in re.findall(r"<h2>(.*?)</h2>", page)]
    assert titles == [get(n).title for n in NAMES] + [AUTOINTERP_TITLE]
    assert all(f"Skipped: why {n}" in page for n in NAMES)


def test_analyze_help_lists_every_registered_analysis():
    text = CliRunner().invoke(app, ["analyze", "--help"], terminal_width=200).output
    listed = re.search(r"subset of: (.*?)\.", " ".join(text.split())).group(1)
    assert [x.strip(" │") for x in listed.split(",")] == list(NAMES)
