"""The analyses' one registry: each is an ``Analysis`` record in its own module.

``run_analyses``, the report and the CLI's ``--only`` all read ``NAMES`` and ``get``. To add an
analysis, write a module with an ``ANALYSIS`` record and add one line to ``_MODULES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_darkmatter.errors import DarkMatterError

if TYPE_CHECKING:
    from sae_darkmatter.config import RunConfig
    from sae_darkmatter.run_dir import RunDir

Results = Mapping[str, Any]  # analysis name -> result, as in analyses.json


def _no_settings(cfg: RunConfig, results: Results) -> tuple[Any, ...]:
    return ()


def _always(cfg: RunConfig) -> bool:
    return True


@dataclass(frozen=True)
class Analysis:
    """One analysis: how to run it, what its cache key holds, and its report section.

    ``run(run, cfg, results, progress)`` returns a JSON-able dict (figure paths under
    ``"figures"``, relative to the run); ``results`` holds the other analyses' results so far.
    ``settings(cfg, results)`` is what enters its cache key besides the split and the run's
    inputs (store, decompositions, SAE files). ``section(result, out_dir)`` renders its HTML.
    ``needs`` names analyses whose results it reads: they run first.
    """

    name: str
    title: str
    run: Callable[[RunDir, RunConfig, Results, bool], dict[str, Any]]
    section: Callable[[dict[str, Any], Path], str]
    settings: Callable[[RunConfig, Results], tuple[Any, ...]] = _no_settings
    enabled: Callable[[RunConfig], bool] = _always
    needs: tuple[str, ...] = ()


# name -> module under sae_darkmatter.analyses, in report order
_MODULES = {
    "paper": "paper",  # reads the others' results (it runs last), shown first
    "scaling": "scaling",
    "per_token": "per_token",
    "norms": "norm_baselines",
    "encoder_error": "encoder_error",
    "cross_layer": "cross_layer",
    "error_saes": "error_saes",
    "downstream": "downstream",
    "transcoders": "transcoders",
    "transcoder_downstream": "transcoder_downstream",
}
NAMES: tuple[str, ...] = tuple(_MODULES)


def get(name: str) -> Analysis:
    """The registered analysis ``name`` (its module is imported on first use)."""
    if name not in _MODULES:
        raise DarkMatterError(f"unknown analyses [{name!r}]; choose from {list(NAMES)}")
    record = importlib.import_module(f"sae_darkmatter.analyses.{_MODULES[name]}").ANALYSIS
    assert record.name == name, f"{_MODULES[name]}.ANALYSIS is named {record.name!r}"
    return record


def run_order(names: tuple[str, ...]) -> list[str]:
    """``names`` in report order, each after the analyses it ``needs``."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for dep in get(name).needs:
            if dep in names:
                visit(dep)
        order.append(name)

    for name in sorted(names, key=NAMES.index):
        visit(name)
    return order
