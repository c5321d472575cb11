"""Auto-interpretability of SAE latents with an LLM judge (optional extra ``[autointerp]``).

An explainer LLM describes each sampled latent from its top-activating windows; a judge LLM then
says which held-out snippets (per activation quantile, plus silent windows) the latent activates
on (detection scoring). Any OpenAI-compatible chat endpoint works; answers are cached on disk.
Entry points: ``autointerp_run(run_dir, AutoInterpConfig(...))`` and ``darkmatter autointerp``.

Names are imported on first use, so registering the CLI command stays cheap; the ``openai``
package is needed only when requests are made.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AutoInterpConfig": "config",
    "ChatClient": "client", "EndpointError": "client",
    "Example": "examples", "ExampleSet": "examples", "LatentExamples": "examples",
    "collect_examples": "examples", "make_windows": "examples",
    "parse_detection": "prompts", "parse_explanation": "prompts",
    "SAEChoice": "choose", "autointerp_run": "run", "default_saes": "choose",
    "resolve_sae": "choose",
    "latent_counts": "scoring", "summarize": "scoring",
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
