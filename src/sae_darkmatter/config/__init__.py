"""Frozen configuration dataclasses for every pipeline stage, plus TOML loading.

Each stage takes exactly one config object. Configs are plain data: they hash to a stable
fingerprint (``fingerprint(cfg)``) that the on-disk cache uses to decide whether a finished
stage can be reused. The shared machinery (checks, ``from_dict``, ``fingerprint``) lives in
``config_base``; the stages' configs in ``data`` (harvest and splits), ``train`` (SAE grid and
decomposition) and ``analyses``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sae_darkmatter.config.analyses import (
    CrossLayerConfig,
    DownstreamConfig,
    ErrorSAEConfig,
    PursuitConfig,
)
from sae_darkmatter.config.data import (
    CorpusConfig,
    HarvestConfig,
    ModelConfig,
    SplitConfig,
    TokenFilter,
)
from sae_darkmatter.config.train import DecomposeConfig, SAETrainConfig, TranscoderConfig
from sae_darkmatter.config_base import _Checked, read_toml
from sae_darkmatter.config_base import fingerprint as fingerprint  # re-exported: the public API
from sae_darkmatter.config_base import from_dict as from_dict
from sae_darkmatter.config_base import to_dict as to_dict
from sae_darkmatter.errors import ConfigValueError

__all__ = [
    "CorpusConfig", "CrossLayerConfig", "DecomposeConfig", "DownstreamConfig", "ErrorSAEConfig",
    "HarvestConfig", "ModelConfig", "PursuitConfig", "RunConfig", "SAETrainConfig",
    "SplitConfig", "TokenFilter", "TranscoderConfig", "fingerprint", "from_dict", "load_toml",
    "to_dict",
]


@dataclass(frozen=True)
class RunConfig(_Checked):
    """The whole pipeline: harvest -> train -> decompose -> report.

    ``saes`` lists pretrained SAEs to analyse instead of training the ``train`` grid:
    ``"saelens:<release>/<sae_id>"`` or local SAELens / sparsify / dictionary_learning folders.
    Their metadata then picks the model (when ``harvest.model.name`` is ``"auto"``) and the hook
    (when ``harvest.hooks`` is empty). ``transcoders`` (off by default) adds a transcoder sweep
    of one MLP, decomposed beside the SAEs.
    """

    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: SAETrainConfig = field(default_factory=SAETrainConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    pursuit: PursuitConfig = field(default_factory=PursuitConfig)
    cross_layer: CrossLayerConfig = field(default_factory=CrossLayerConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    error_saes: ErrorSAEConfig = field(default_factory=ErrorSAEConfig)
    saes: tuple[str, ...] = ()
    transcoders: TranscoderConfig = field(default_factory=TranscoderConfig,
                                          metadata={"omit_default": True})

    def _check(self) -> None:
        self.split.filter.check_context_length(self.harvest.corpus.context_length)
        tc = self.transcoders
        if self.saes and tc.enabled and not tc.pretrained:
            raise ConfigValueError(
                "", "transcoders.pretrained",
                "must name the transcoders to decompose when the run analyses pretrained SAEs "
                "(such a run has no SAE-training split to train transcoders on)")


def load_toml(path: str | Path) -> RunConfig:
    """Read a ``RunConfig`` from a TOML file with tables ``[harvest]``, ``[train]``, ...

    Errors name the file (see ``config_base.read_toml``).
    """
    return read_toml(path, RunConfig)
