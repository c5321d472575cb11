"""Streaming decomposition: the LM's activations go straight into per-SAE sums, never to disk.

``harvest`` + ``decompose_many`` keep every activation (4·d bytes per token: 2.3 kB at d = 576,
23 GB per 10M tokens) and read them twice. ``stream_decompose`` forwards each context once and
keeps only the float64 sums of ``decompose``, so memory and disk do not grow with the number of
tokens. The arithmetic is ``decompose_many``'s (shared: ``decompose.core``); the batches, the
token filter, the calibration and the checkpoint are ``decompose.stream_run``'s. What differs
from the store path, because no token is kept:

- **Split by context** (``splits.split_contexts``). There is no global token permutation: the
  contexts are permuted (seed ``split.seed``); the first ``round(probe_train_fraction · n)`` are
  probe-train contexts, the rest probe-test contexts (at least one each).
  ``split.sae_train_fraction`` is not used: this mode is for pretrained SAEs, so every context
  evaluates.
- **Two phases.** Phase 1 forwards the probe-train contexts in batches of
  ``harvest.batch_size`` and updates one joint least-squares system (targets ``[e_1, ‖e_1‖²,
  e_2, ...]``); the probes are solved; phase 2 forwards the probe-test contexts and updates the
  held-out sums.
- **Norm threshold.** The token filter's position and special-token rules are the store path's.
  The outlier rule needs a median norm before any token is used: it is the median over the
  calibration tokens (those passing the other rules in the first probe-train batches, until at
  least ``calibration_tokens`` of them), then fixed. The store path uses the median of all kept
  tokens; with 8192 calibration tokens the two differ by well under 1 % on SmolLM2, and the
  threshold used is in the result (``norm_threshold``).
- **Intervals.** The jackknife interval of ``r2_error_mean_dim`` groups whole test contexts
  (test context ``i``, in permuted order, is in group ``i mod g``, ``g = min(16, test
  contexts)``), which also accounts for tokens of one context being correlated; the store path
  groups single tokens. The bootstrap intervals need per-token values and are left out.
- **Resume.** With ``checkpoint`` (a folder), the sums, the batches done per phase, the token
  counts and the median are written atomically every ``checkpoint_every`` batches and at the
  end of each phase (one safetensors file per rank, settings fingerprint in its header). A
  rerun with the same settings and SAE weights continues after the last saved batch and gives
  bit-identical results; other settings: a warning, and the checkpoint is replaced.
- **torchrun.** Each rank forwards a contiguous share of each phase's batches; the sums are
  merged in rank order (equal to one process's up to float64 rounding and float32 GEMM
  blocking, ~1e-7 relative).

Memory: the model, one batch (plus the calibration batches once), sums of size O(n_saes · d²),
and the token ids of the contexts (8 bytes per token, from ``build_contexts``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file

from sae_darkmatter import distributed
from sae_darkmatter._io import (
    atomic_path,
    limited_heap_growth,
    require_folder,
    resolve_device,
    write_json,
)
from sae_darkmatter.config import DecomposeConfig, HarvestConfig, SplitConfig, fingerprint, to_dict
from sae_darkmatter.contexts import Packing, build_contexts
from sae_darkmatter.corpus import corpus_fingerprint
from sae_darkmatter.decompose.checks import check_width
from sae_darkmatter.decompose.core import SAEErrors, split_probes
from sae_darkmatter.decompose.results import Decomposition
from sae_darkmatter.decompose.stream_run import CHECKPOINT_EVERY, COUNTS, StreamRun
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.harvest import prepare
from sae_darkmatter.linalg import LinearProbe
from sae_darkmatter.models import LoadedModel, default_hook, hook_dim, load_model
from sae_darkmatter.saes import SAE
from sae_darkmatter.saes.io import weights_digest

STREAM_VERSION = (
    2  # part of the checkpoint fingerprint: bump when the arithmetic or the counts change
)
CALIBRATION_TOKENS = 8192


@dataclass(frozen=True)
class StreamResult:
    """One SAE's streamed decomposition: held-out metrics, probes, token counts, settings.

    ``data`` counts tokens (all ranks): seen, excluded by each filter rule, and kept per phase
    (``probe_train_tokens``, ``probe_test_tokens``), plus the contexts per phase.
    ``norm_threshold`` is the norm above which tokens were excluded (None: no norm rule).
    """

    name: str
    model: str
    metrics: Decomposition
    error_probe: LinearProbe
    norm_probe: LinearProbe
    data: dict[str, int]
    median_norm: float | None
    norm_threshold: float | None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the probes are in ``save``'s safetensors file)."""
        return {"name": self.name, "kind": "stream", "model": self.model, "data": self.data,
                "median_norm": self.median_norm, "norm_threshold": self.norm_threshold,
                "settings": self.settings, "metrics": self.metrics.to_dict()}

    def save(self, folder: str | Path, *, sae: Mapping[str, Any] | None = None) -> Path:
        """Write ``<name>.safetensors`` (probes) and ``<name>.json`` in ``folder`` (atomic each).

        ``sae`` (e.g. the loader's provenance) is recorded under ``"sae"``. The JSON names its
        probe file under ``"probes"``, not ``"probe_file"``: ``load_decompositions`` reads store
        results with per-token arrays, which a stream has none of. Returns the JSON path.
        """
        folder = Path(folder)
        tensors = {
            "error_probe.weight": self.error_probe.weight,
            "error_probe.bias": self.error_probe.bias,
            "norm_probe.weight": self.norm_probe.weight,
            "norm_probe.bias": self.norm_probe.bias,
        }
        with atomic_path(folder / f"{self.name}.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        info = self.to_dict() | {"sae": dict(sae or {}), "probes": f"{self.name}.safetensors"}
        write_json(folder / f"{self.name}.json", info)
        return folder / f"{self.name}.json"


def stream_decompose(
    harvest: HarvestConfig,
    saes: Mapping[str, SAE],
    split: SplitConfig = SplitConfig(),
    cfg: DecomposeConfig = DecomposeConfig(),
    *,
    hook: str | None = None,
    lm: LoadedModel | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    calibration_tokens: int = CALIBRATION_TOKENS,
    progress: bool = True,
) -> dict[str, StreamResult]:
    """Decompose the errors of pretrained ``saes`` on ``harvest``'s contexts without storing them.

    ``harvest`` gives the model, corpus and batch size (its ``hooks``' first entry is the hook
    unless ``hook`` is given; none: the middle residual stream); ``split`` the token filter,
    ``probe_train_fraction`` and seed (see the module docstring for what differs from the store
    path). ``checkpoint``: a folder for resumable progress. Every rank returns the results.
    """
    if not saes:
        raise DarkMatterError("stream_decompose: no SAEs given")
    if checkpoint_every < 1 or calibration_tokens < 1:
        raise DarkMatterError("checkpoint_every and calibration_tokens must be >= 1")
    if checkpoint is not None:
        require_folder(checkpoint, "the stream checkpoint")
    if split.probe_train_tokens is not None:
        raise DarkMatterError(
            "stream_decompose splits contexts, not tokens: split.probe_train_tokens "
            "cannot be met; use split.probe_train_fraction (or decompose a store)"
        )
    distributed.check_initialized()
    with distributed.main_first():  # rank 0 fills the model cache, the others read it
        harvest, packing = prepare(harvest, lm)
        lm = lm or load_model(harvest.model)
    hook = hook or (harvest.hooks[0] if harvest.hooks else default_hook(lm.model))
    d = hook_dim(lm.model, hook)
    dtypes = {
        name: check_width(
            name, sae, d, hook, where=f"hook {hook!r} of model {lm.name} has width {d}",
            advice="use an SAE trained on this model and hook, or name its hook (--hook)",
        )
        for name, sae in saes.items()
    }
    split.filter.check_context_length(harvest.corpus.context_length)
    contexts = build_contexts(harvest.corpus, lm.tokenizer, packing)
    run = StreamRun(lm, contexts, hook, SAEErrors(saes, dtypes, hook, resolve_device(cfg.device)),
                    split, cfg, harvest.batch_size)
    lock = None
    if checkpoint is not None:
        fp = _fingerprint(
            harvest, packing, hook, split, cfg, saes, contexts.shape[0], calibration_tokens
        )
        lock = run.resume(Path(checkpoint), fp, checkpoint_every)
    try:
        if split.filter.max_norm_ratio is not None:
            run.calibrate(calibration_tokens)
        # per-batch buffers must not pile up in a fragmented heap
        with limited_heap_growth(), _progress_bar(progress) as bar:
            task = bar.add_task(
                f"{hook}, {len(saes)} SAE(s)", total=run.tokens(), completed=run.tokens(done=True)
            )
            joint = run.fit(lambda n: bar.update(task, advance=n))
            probes = split_probes(joint, run.errors.names, d)
            run.score(probes, lambda n: bar.update(task, advance=n))
    finally:
        if lock is not None:
            lock.release()

    st = run.state
    counts = {k: sum(c[k] for c in distributed.gather(st.counts)) for k in COUNTS}
    data = counts | {
        "probe_train_contexts": int(run.train_ctx.size),
        "probe_test_contexts": int(run.test_ctx.size),
    }
    settings = {
        "harvest": to_dict(harvest),
        "packing": packing.summary(),
        "hook": hook,
        "split": to_dict(split),
        "decompose": to_dict(cfg),
        "calibration_tokens": calibration_tokens,
    }
    out = {}
    for name, scores in zip(run.errors.names, st.scores):
        metrics = distributed.merged(scores).metrics(
            hook=hook,
            d_sae=run.errors.saes[name].d_sae,
            n_probe_train=counts["probe_train_tokens"],
            probe=joint,
            cfg=cfg,
        )
        out[name] = StreamResult(
            name, lm.name, metrics, *probes[name], dict(data), st.median, run.threshold, settings
        )
    return out


def _fingerprint(harvest: HarvestConfig, packing: Packing, hook: str, split: SplitConfig,
                 cfg: DecomposeConfig, saes: Mapping[str, SAE], n_contexts: int,
                 calibration_tokens: int) -> str:
    """What the checkpointed sums depend on: data, model, filter, split, SAE weights, ranks.

    Devices are left out (a job may resume on another device), and so are settings a stream
    does not use (``sae_train_fraction``, loss, shard size).
    """
    modules = {n: s for n, s in saes.items() if isinstance(s, torch.nn.Module)}
    odd = [n for n in saes if n not in modules]
    if odd:
        raise DarkMatterError(
            f"checkpoints need torch.nn.Module SAEs (their weights are fingerprinted); "
            f"{odd} are not: run without a checkpoint"
        )
    model = {k: v for k, v in to_dict(harvest.model).items() if k != "device"}
    return fingerprint(
        STREAM_VERSION, corpus_fingerprint(harvest.corpus), model, harvest.batch_size, hook,
        split.filter, split.probe_train_fraction, split.seed, cfg.bias, cfg.ridge, cfg.chunk_rows,
        cfg.gemm_dtype,
        [[n, weights_digest(s)] for n, s in modules.items()], n_contexts, calibration_tokens,
        distributed.rank(), distributed.world_size(), *filter(None, [packing.cache_key()]),
    )


def _progress_bar(progress: bool) -> Progress:
    return Progress(
        TextColumn("[bold]stream[/] {task.description}"), BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"), TimeRemainingColumn(),
        disable=not progress or not distributed.is_main(), transient=True,
    )
