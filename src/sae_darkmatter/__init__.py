"""sae-darkmatter: measure and decompose the dark matter (reconstruction error) of SAEs.

Stages, each usable alone (see README):

    harvest(HarvestConfig, path)            -> ActivationStore
    make_splits(store, SplitConfig)         -> Splits (SAE-train / probe-train / probe-test rows)
    open_sae("saelens:<release>/<id>" | folder) -> LoadedSAE (SAE + provenance)
    open_transcoder(same)                   -> LoadedTranscoder (transcoder, hooks in and out)
    train_grid(x, SAETrainConfig, out_dir)  -> SAE folders (topk / batchtopk / relu / jumprelu,
                                               one pass); with y=: transcoders from x to y,
                                               with and without a skip term (SAELens folders)
    decompose(store, sae, splits, cfg)      -> DecompositionOutput (held-out metrics + probes)
    decompose_transcoders(store, {name: tc}, splits, hook_in=, hook_out=)
                                            -> the same for transcoders' errors y - y_hat
    decompose_prefixes(store, sae, splits, widths=, order=)
                                            -> {width: the same}: the SAE cut to its first m
                                               latents, per m (Matryoshka groups; scaling law)
    stream_decompose(HarvestConfig, saes)   -> the decomposition straight from the LM, no store
    RunDir(out)                             -> one run folder: store, splits, decompositions, SAEs
    run_analyses(run_dir, cfg=RunConfig)    -> encoder error (pursuit), scaling, per-token, norms,
                                               cross-layer, error SAEs, downstream CE
    write_report(decompose_dir, out_dir)    -> report.html, metrics.json, figures/
    run(RunConfig, out)                     -> all of the above, cached per stage
    paper_protocol(cfg) / quick(cfg)        -> presets: the paper's protocol, less data
    run_sweep(SweepConfig, RunConfig, out)  -> one run per value of one setting, one report

Under ``torchrun`` call ``sae_darkmatter.distributed.init()`` first: harvest, training and the
decomposition then share their work across the ranks (``distributed``).

Names are imported lazily (PEP 562), so ``import sae_darkmatter`` and the CLI start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "config": [
        "CorpusConfig",
        "CrossLayerConfig",
        "DecomposeConfig",
        "DownstreamConfig",
        "ErrorSAEConfig",
        "HarvestConfig",
        "ModelConfig",
        "PursuitConfig",
        "RunConfig",
        "SAETrainConfig",
        "SplitConfig",
        "TokenFilter",
        "TranscoderConfig",
        "load_toml",
    ],
    "errors": [
        "ConfigError",
        "ConfigValueError",
        "CorpusEncodingError",
        "CorruptSAEError",
        "CorruptStoreError",
        "DarkMatterError",
        "DiskFullError",
        "EmptyCorpusError",
        "HookError",
        "IncompatibleSAEError",
        "ModelNotAvailableError",
        "NonFiniteError",
        "ShapeMismatchError",
        "StoreLockedError",
    ],
    "models": ["LoadedModel", "forward_capture", "hook_names", "load_model"],
    "contexts": ["build_contexts"],
    "store": ["ActivationStore"],
    "harvest": ["harvest"],
    "integrity": ["check", "repair"],
    "splits": ["Splits", "make_splits"],
    "saes": [
        "GatedSAE",
        "JumpReLUSAE",
        "ReLUSAE",
        "TopKSAE",
        "load_sae",
        "save_sae",
        "train_grid",
        "train_sae",
    ],
    "saes.formats": ["LoadedSAE", "open_sae"],
    "saes.transcoder": ["Transcoder", "save_transcoder"],
    "saes.transcoder_formats": ["LoadedTranscoder", "open_transcoder"],
    "linalg": ["LinearProbe", "R2Accumulator", "StreamingLstsq"],
    "decompose": ["Decomposition", "DecompositionOutput", "SkipAccount", "decompose",
                  "decompose_many", "decompose_prefixes", "decompose_transcoders",
                  "firing_order"],
    "stream": ["StreamResult", "stream_decompose"],
    "pipeline": ["decompose_sae_prefixes", "decompose_saes", "decompose_transcoder_specs", "run",
                 "train_saes"],
    "presets": ["paper_protocol", "quick"],
    "run_dir": ["RunDir"],
    "analyses": ["Analysis", "run_analyses"],
    "analyses.encoder_error": ["encoder_error_analysis"],
    "analyses.transcoders": ["transcoder_analysis"],
    "analyses.cross_layer": ["cross_layer_analysis"],
    "analyses.downstream": ["downstream_analysis"],
    "analyses.error_saes": ["error_sae_analysis"],
    "saes.pursuit": ["PursuitSAE", "pursue"],
    "report": ["write_report"],
    "synthetic": ["SyntheticConfig", "run_synthetic"],
    "sweep": ["SweepConfig", "run_sweep"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'sae_darkmatter' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__ + ["__version__"]
