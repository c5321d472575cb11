"""Downstream cross-entropy of the transcoders' error parts: ``downstream`` with
``of="transcoders"``. Each transcoder's ŷ, ŷ + ê and ŷ + (e − ê) (and the random controls)
replace the MLP's output at the positions the SAEs' analysis splices, with the same contexts,
stopping rule and checks (identity splice, clean loss against the reference)."""

from __future__ import annotations

from typing import Any

from sae_darkmatter.analyses.downstream import VERSION, downstream_analysis
from sae_darkmatter.analyses.downstream_figures import section
from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.config import RunConfig
from sae_darkmatter.run_dir import RunDir


def _run(run: RunDir, cfg: RunConfig, results: Results, progress: bool) -> dict[str, Any]:
    return downstream_analysis(run, cfg=cfg.downstream, split=cfg.split, of="transcoders",
                               device=cfg.harvest.model.device, progress=progress)


ANALYSIS = Analysis(
    name="transcoder_downstream",
    title="Downstream loss of each part of the transcoders' error",
    run=_run,
    section=section,
    settings=lambda cfg, results: (cfg.downstream, VERSION),
    enabled=lambda cfg: cfg.downstream.enabled and cfg.transcoders.enabled,
)
