"""The tiny run that the autointerp tests read, built once for this folder (``package`` scope:
the tests shared one run when they were one module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import AUTOINTERP_HOOK, make_run
from sae_darkmatter._io import write_json
from sae_darkmatter.analyses.error_saes import error_sae_analysis
from sae_darkmatter.config import ErrorSAEConfig, SAETrainConfig


@pytest.fixture(scope="package")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny run (store, base SAE, decomposition) with error SAEs on e, ê and e − ê."""
    out = make_run(
        tiny_model_dir, tmp_path_factory.mktemp("run"), AUTOINTERP_HOOK, n_contexts=48, widths=(64,)
    )
    cfg = ErrorSAEConfig(
        train=SAETrainConfig(widths=(32,), ks=(4,), train_tokens=1500, batch_size=256)
    )
    write_json(
        out / "analyses.json", {"error_saes": error_sae_analysis(out, cfg=cfg, progress=False)}
    )
    return out


@pytest.fixture(scope="package")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer
