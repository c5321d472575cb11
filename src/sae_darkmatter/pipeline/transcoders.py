"""The run's transcoder stage: transcoders of one MLP (``mlp_in.L`` -> ``mlp_out.L``) trained on
the SAE-training split, with and without a skip term, or pretrained ones, decomposed on the
SAEs' tokens into ``decompose/transcoders/`` (``TranscoderConfig``)."""

from __future__ import annotations

from typing import Any

from sae_darkmatter.config import RunConfig
from sae_darkmatter.decompose import require_finite
from sae_darkmatter.errors import ConfigError, DarkMatterError
from sae_darkmatter.models import default_hook_for
from sae_darkmatter.pipeline.stages import (
    decompose_transcoder_specs,
    open_transcoders,
    train_metadata,
)
from sae_darkmatter.run_dir import RunDir
from sae_darkmatter.saes.train import train_grid
from sae_darkmatter.splits import Splits
from sae_darkmatter.store import ActivationStore


def transcoder_hooks(cfg: RunConfig) -> tuple[str, ...]:
    """The hooks the run's transcoders read and predict; none while they are off.

    Trained ones: ``mlp_in.L`` and ``mlp_out.L`` of ``transcoders.layer`` (else the target
    hook's layer); pretrained ones: the hooks their metadata names (checked before the
    harvest).
    """
    tc = cfg.transcoders
    if not tc.enabled:
        return ()
    if not tc.pretrained:
        layer = tc.layer if tc.layer is not None else _target_layer(cfg)
        return (f"mlp_in.{layer}", f"mlp_out.{layer}")
    hooks: list[str] = []
    for name, item in open_transcoders(tc.pretrained).items():
        if item.hook_in is None or item.hook_out is None:
            raise DarkMatterError(
                f"transcoder {name!r}: its hooks ({item.provenance.get('original_hook_name')!r} "
                f"-> {item.provenance.get('original_hook_name_out')!r}) match none of ours; "
                "decompose it with 'darkmatter decompose --transcoder SPEC --hook-in H "
                "--hook-out H' on a store of those hooks")
        hooks += [item.hook_in, item.hook_out]
    return tuple(dict.fromkeys(hooks))


def _target_layer(cfg: RunConfig) -> int:
    target = cfg.harvest.hooks[0] if cfg.harvest.hooks else default_hook_for(cfg.harvest.model)
    layer = target.rpartition(".")[2]
    if not layer.isdigit():
        raise ConfigError(f"the target hook {target!r} names no layer; set transcoders.layer")
    return int(layer)


def run_transcoders(cfg: RunConfig, store: ActivationStore, splits: Splits, run_dir: RunDir,
                    progress: bool) -> list[dict[str, Any]]:
    """Train (or load) the run's transcoders and decompose them; their result records."""
    tc = cfg.transcoders
    if tc.pretrained:
        specs: list[Any] = list(tc.pretrained)
    else:
        if splits.sae_train.size == 0:
            raise DarkMatterError("transcoders train on the SAE-training split, which is empty "
                                  "(split.sae_train_fraction = 0)")
        hook_in, hook_out = transcoder_hooks(cfg)
        x, y = (store.gather(h, splits.sae_train) for h in (hook_in, hook_out))
        for tensor, hook in ((x, hook_in), (y, hook_out)):
            require_finite(tensor, splits.sae_train, store, hook)
        metadata = train_metadata(store, hook_in) | {"hook_name_out": hook_out}
        specs = train_grid(x, tc.train, run_dir.transcoders_path, metadata=metadata, y=y,
                           skips=tc.skip, progress=progress)
    return decompose_transcoder_specs(store, splits, specs, cfg.decompose,
                                      run_dir.transcoder_results_path, progress=progress)
