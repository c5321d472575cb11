"""Streaming decomposition: the LM's activations go straight into per-SAE sums, never to disk.

``harvest`` + ``decompose_many`` keep every activation (4·d bytes per token: 2.3 kB at d = 576,
23 GB per 10M tokens) and read them twice. ``stream_decompose`` forwards each context once and
keeps only the float64 sums of ``decompose``, so memory and disk do not grow with the number of
tokens. The arithmetic is ``decompose_many``'s (shared: ``SAEErrors``, ``probe_system``,
``HeldOutScores``); what differs, because no token is kept:

- **Split by context.** There is no global token permutation: the contexts are permuted (seed
  ``split.seed``); the first ``round(probe_train_fraction · n)`` are probe-train contexts, the
  rest probe-test contexts (at least one each). ``split.sae_train_fraction`` is not used: this
  mode is for pretrained SAEs, so every context evaluates.
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

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sae_darkmatter import distributed
from sae_darkmatter._io import (
    atomic_path,
    limit_heap_growth,
    require_folder,
    resolve_device,
    try_lock,
    write_json,
)
from sae_darkmatter.config import (
    DecomposeConfig,
    HarvestConfig,
    SplitConfig,
    TokenFilter,
    fingerprint,
    to_dict,
)
from sae_darkmatter.contexts import Packing, build_contexts, special_token_ids
from sae_darkmatter.corpus import corpus_fingerprint
from sae_darkmatter.decompose import (
    JACKKNIFE_GROUPS,
    Decomposition,
    HeldOutScores,
    Locate,
    SAEErrors,
    chunk_size,
    probe_system,
    require_finite_at,
    sae_compute_dtype,
    split_probes,
)
from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.harvest import prepare
from sae_darkmatter.linalg import LinearProbe
from sae_darkmatter.models import LoadedModel, default_hook, forward_capture, hook_dim, load_model
from sae_darkmatter.saes import SAE
from sae_darkmatter.saes.io import weights_digest

log = logging.getLogger(__name__)

STREAM_VERSION = (
    2  # part of the checkpoint fingerprint: bump when the arithmetic or the counts change
)
CALIBRATION_TOKENS = 8192
CHECKPOINT_EVERY = 25  # batches between checkpoints
_COUNTS = ("tokens_total", "excluded_positions", "excluded_special_tokens",
           "excluded_norm_outliers", "probe_train_tokens", "probe_test_tokens")


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


def split_contexts(n_contexts: int, split: SplitConfig) -> tuple[np.ndarray, np.ndarray]:
    """(probe-train, probe-test) context indices, each in the seeded permuted order."""
    frac = split.probe_train_fraction
    n_train = round(frac * n_contexts)
    if n_contexts < 2 or not 0 < n_train < n_contexts:
        side = "probe-train" if n_train == 0 else "probe-test"
        raise DarkMatterError(
            f"cannot split {n_contexts} context(s) by probe_train_fraction {frac}: no {side} "
            f"context would be left; use more contexts (n_contexts) or a fraction nearer 0.5"
        )
    order = np.random.default_rng(split.seed).permutation(n_contexts)
    return order[:n_train], order[n_train:]


@dataclass
class _Batch:
    """The kept tokens of one forwarded batch: activations [n, d] and where each came from."""

    x: torch.Tensor
    context: np.ndarray
    position: np.ndarray

    def locate(self, offset: int) -> Locate:
        """``Locate`` for the rows of a chunk starting at row ``offset``."""
        return lambda i: (self.context[offset + i], self.position[offset + i])


class _State:
    """Everything a checkpoint holds: this rank's sums, batches done per phase, counts, median."""

    def __init__(
        self, n_saes: int, d: int, n_groups: int, cfg: DecomposeConfig, device: torch.device
    ) -> None:
        self.fit = probe_system(cfg, n_saes, d, device)
        self.scores = [HeldOutScores(d, n_groups, device=device) for _ in range(n_saes)]
        self.done = [0, 0]
        self.counts = dict.fromkeys(_COUNTS, 0)
        self.median: float | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"fit.{k}": v for k, v in self.fit.state_dict().items()}
        for i, s in enumerate(self.scores):
            out |= {f"scores{i}.{k}": v for k, v in s.state_dict().items()}
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save(self, path: Path, fp: str) -> None:
        meta = {"fingerprint": fp, "progress": json.dumps(
            {"done": self.done, "counts": self.counts, "median": self.median})}
        with atomic_path(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata=meta)

    def load(self, path: Path, fp: str) -> bool:
        """Take the state saved at ``path`` if it was made with fingerprint ``fp``."""
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("fingerprint") != fp:
                    log.warning("checkpoint %s was made with other settings or SAE weights: "
                                "starting over (it will be replaced)", path)
                    return False
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
            progress = json.loads(meta["progress"])
            self.fit.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("fit.")})
            for i, s in enumerate(self.scores):
                s.load_state_dict({k.removeprefix(f"scores{i}."): v for k, v in tensors.items()
                                   if k.startswith(f"scores{i}.")})
        except (
            OSError,
            ValueError,
            KeyError,
            RuntimeError,
            SafetensorError,
        ) as err:  # damaged: redo
            log.warning("cannot read checkpoint %s (%s): starting over", path, err)
            return False
        self.done, self.counts, self.median = (
            progress["done"],
            progress["counts"],
            progress["median"],
        )
        return True


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
    limit_heap_growth()  # per-batch buffers must not pile up in a fragmented heap
    with distributed.main_first():  # rank 0 fills the model cache, the others read it
        harvest, packing = prepare(harvest, lm)
        lm = lm or load_model(harvest.model)
    hook = hook or (harvest.hooks[0] if harvest.hooks else default_hook(lm.model))
    d = hook_dim(lm.model, hook)
    dtypes = {name: _check_width(name, sae, d, hook, lm.name) for name, sae in saes.items()}
    split.filter.check_context_length(harvest.corpus.context_length)
    contexts = build_contexts(harvest.corpus, lm.tokenizer, packing)
    run = _Stream(lm, contexts, hook, SAEErrors(saes, dtypes, hook, resolve_device(cfg.device)),
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
        with _progress_bar(progress) as bar:
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
    counts = {k: sum(c[k] for c in distributed.gather(st.counts)) for k in _COUNTS}
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


class _Stream:
    """One streamed decomposition: this rank's batches of each phase (0: probe-train, 1:
    probe-test contexts), the token filter, the sums (``_State``) and the checkpoint."""

    def __init__(
        self,
        lm: LoadedModel,
        contexts: np.ndarray,
        hook: str,
        errors: SAEErrors,
        split: SplitConfig,
        cfg: DecomposeConfig,
        batch_size: int,
    ) -> None:
        self.lm, self.contexts, self.hook, self.errors, self.filter = (
            lm,
            contexts,
            hook,
            errors,
            split.filter,
        )
        self.train_ctx, self.test_ctx = split_contexts(contexts.shape[0], split)
        self.n_groups = min(JACKKNIFE_GROUPS, self.test_ctx.size)
        self.group_of = np.zeros(
            contexts.shape[0], np.int64
        )  # jackknife group of each test context
        self.group_of[self.test_ctx] = np.arange(self.test_ctx.size) % self.n_groups
        self.d, self.cfg, self.device = hook_dim(lm.model, hook), cfg, resolve_device(cfg.device)
        self.chunk = chunk_size(cfg, len(errors.names), self.d)
        b = batch_size
        self.batches = [
            [c[i : i + b] for i in range(0, c.size, b)] for c in (self.train_ctx, self.test_ctx)
        ]
        self.mine = [phase[distributed.share(len(phase))] for phase in self.batches]
        ids = special_token_ids(lm.tokenizer) if self.filter.exclude_special else []
        self.special = np.asarray(ids, np.int64)
        self.state = self._new_state()
        self.path: Path | None = None
        self.fp, self.every = "", CHECKPOINT_EVERY
        self.threshold: float | None = None
        self.cache: dict[int, torch.Tensor] = {}  # calibration activations of phase-0 batches

    def resume(self, folder: Path, fp: str, every: int) -> FileLock:
        """Use ``folder`` for this rank's checkpoint, continuing from it when it matches ``fp``;
        returns the lock held on it meanwhile."""
        self.path = (
            folder / f"stream.rank{distributed.rank()}-of-{distributed.world_size()}.safetensors"
        )
        self.fp, self.every = fp, every
        folder.mkdir(parents=True, exist_ok=True)
        lock = try_lock(
            self.path.with_suffix(".lock"),
            f"another process is streaming into {self.path}; "
            "wait for it to finish or use another checkpoint folder",
        )
        saved = self._new_state()
        if self.path.exists() and saved.load(self.path, fp):
            self.state = saved
            log.info("stream: resuming from %s (%d + %d batches done)", self.path, *saved.done)
        return lock

    def _new_state(self) -> _State:
        return _State(len(self.errors.names), self.d, self.n_groups, self.cfg, self.device)

    def tokens(self, *, done: bool = False) -> int:
        """Tokens in this rank's batches (``done``: in those already done)."""
        n = sum(
            c.size
            for p, phase in enumerate(self.mine)
            for c in phase[: self.state.done[p] if done else None]
        )
        return n * self.contexts.shape[1]

    def calibrate(self, n_tokens: int) -> None:
        """Fix the norm threshold: rank 0 measures the median (``_calibrate``), all take it."""
        if self.state.median is None and distributed.is_main():
            self.state.median, self.cache = _calibrate(self, n_tokens)
        self.state.median = distributed.broadcast(self.state.median)
        self.threshold = self.filter.max_norm_ratio * self.state.median

    def batch(self, phase: int, i: int) -> _Batch:
        """The kept tokens of this rank's batch ``i`` of ``phase`` (counted in the state)."""
        ctx = self.mine[phase][i]
        x = (
            self.cache.pop(i)
            if phase == 0 and i in self.cache
            else _forward(self.lm, self.contexts, ctx, self.hook)
        )
        return _filtered(x, self.contexts[ctx], ctx, self.filter, self.special, self.threshold,
                         self.state.counts, _COUNTS[4 + phase])

    def fit(self, advance: Callable[[int], None]) -> LinearProbe:
        """Phase 1: the joint probe system over the probe-train contexts, merged and solved."""
        for i in range(self.state.done[0], len(self.mine[0])):
            batch = self.batch(0, i)
            for lo in range(0, batch.x.shape[0], self.chunk):
                x = batch.x[lo : lo + self.chunk].to(self.device)
                self.state.fit.update(x, self.errors.probe_targets(x, batch.locate(lo)))
            self._done(0, i, advance)
        fit = distributed.merged(self.state.fit)
        if fit.n == 0:
            raise DarkMatterError(
                "no probe-train tokens passed the token filter; use more contexts or a "
                "looser filter (skip_positions, max_norm_ratio)"
            )
        return fit.solve(self.cfg.ridge)

    def score(
        self, probes: Mapping[str, tuple[LinearProbe, LinearProbe]], advance: Callable[[int], None]
    ) -> None:
        """Phase 2: the held-out sums over the probe-test contexts."""
        for i in range(self.state.done[1], len(self.mine[1])):
            batch = self.batch(1, i)
            for lo in range(0, batch.x.shape[0], self.chunk):
                x = batch.x[lo : lo + self.chunk].to(self.device)
                groups = torch.from_numpy(self.group_of[batch.context[lo : lo + self.chunk]]).to(
                    self.device
                )
                for name, scores in zip(self.errors.names, self.state.scores):
                    x_hat, e, l0 = self.errors(name, x, batch.locate(lo))
                    scores.update(x, x_hat, e, l0, probes[name], groups)
            self._done(1, i, advance)

    def _done(self, phase: int, i: int, advance: Callable[[int], None]) -> None:
        """Count a finished batch; checkpoint every ``every`` batches and at the end of a phase."""
        self.state.done[phase] += 1
        advance(self.mine[phase][i].size * self.contexts.shape[1])
        n = self.state.done[phase]
        if self.path is not None and (n % self.every == 0 or n == len(self.mine[phase])):
            self.state.save(self.path, self.fp)


def _check_width(name: str, sae: SAE, d: int, hook: str, model: str) -> torch.dtype | None:
    """``check_sae`` for activations computed on the fly: the widths must agree."""
    if sae.d_in != d:
        raise ShapeMismatchError(
            f"SAE {name!r} has d_in {sae.d_in} but hook {hook!r} of model {model} has width {d}; "
            f"use an SAE trained on this model and hook, or name its hook (--hook)"
        )
    return sae_compute_dtype(name, sae, hook)


def _fingerprint(harvest: HarvestConfig, packing: Packing, hook: str, split: SplitConfig,
                 cfg: DecomposeConfig, saes: Mapping[str, SAE], n_contexts: int,
                 calibration_tokens: int) -> str:
    """What the checkpointed sums depend on: data, model, filter, split, SAE weights, ranks.

    Devices are left out (a job may resume on another device), and so are settings a stream
    does not use (``sae_train_fraction``, loss, shard size).
    """
    odd = [n for n, s in saes.items() if not isinstance(s, torch.nn.Module)]
    if odd:
        raise DarkMatterError(
            f"checkpoints need torch.nn.Module SAEs (their weights are fingerprinted); "
            f"{odd} are not: run without a checkpoint"
        )
    model = {k: v for k, v in to_dict(harvest.model).items() if k != "device"}
    return fingerprint(
        STREAM_VERSION, corpus_fingerprint(harvest.corpus), model, harvest.batch_size, hook,
        split.filter, split.probe_train_fraction, split.seed, cfg.bias, cfg.ridge, cfg.chunk_rows,
        [[n, weights_digest(s)] for n, s in saes.items()], n_contexts, calibration_tokens,
        distributed.rank(), distributed.world_size(), *filter(None, [packing.cache_key()]),
    )


def _forward(lm: LoadedModel, contexts: np.ndarray, ctx: np.ndarray, hook: str) -> torch.Tensor:
    """The hook's activations of contexts ``ctx``, float32 [len(ctx) · T, d] (context-major)."""
    acts, _ = forward_capture(lm, torch.from_numpy(contexts[ctx]), [hook], with_loss=False)
    x = acts[hook].reshape(-1, acts[hook].shape[-1])
    t = contexts.shape[1]
    require_finite_at(
        x, lambda i: (ctx[i // t], i % t), what=f"the model's activations at hook {hook!r}",
        advice="check the model's weights for NaN/inf, or use harvest.model.dtype = \"float32\" "
               "(float16 overflows above 65504)")
    return x


def _rule_mask(
    ids: np.ndarray, filt: TokenFilter, special: np.ndarray
) -> tuple[np.ndarray, int, int]:
    """Tokens of a batch ``ids`` [B, T] passing the position and special-token rules (flat),
    and how many each rule excluded."""
    window = filt.kept_positions(ids.shape[1])
    inside = np.zeros(ids.shape[1], bool)
    inside[window] = True
    keep = np.broadcast_to(inside, ids.shape).ravel().copy()
    n_position = int((~keep).sum())
    n_special = 0
    if special.size:
        hit = np.isin(ids.ravel(), special) & keep
        n_special = int(hit.sum())
        keep &= ~hit
    return keep, n_position, n_special


def _filtered(
    x: torch.Tensor,
    ids: np.ndarray,
    ctx: np.ndarray,
    filt: TokenFilter,
    special: np.ndarray,
    threshold: float | None,
    counts: dict[str, int],
    kept_key: str,
) -> _Batch:
    """The tokens of one batch that pass the filter (norms above ``threshold`` excluded, as
    ``splits.select_rows`` does against its median); updates ``counts``."""
    keep, n_position, n_special = _rule_mask(ids, filt, special)
    n_norm = 0
    if threshold is not None:
        rows = np.flatnonzero(keep)
        outlier = x[torch.from_numpy(rows)].norm(dim=1).numpy() > threshold
        n_norm = int(outlier.sum())
        keep[rows[outlier]] = False
    rows = np.flatnonzero(keep)
    t = ids.shape[1]
    counts["tokens_total"] += ids.size
    counts["excluded_positions"] += n_position
    counts["excluded_special_tokens"] += n_special
    counts["excluded_norm_outliers"] += n_norm
    counts[kept_key] += int(rows.size)
    return _Batch(x[torch.from_numpy(rows)], ctx[rows // t], rows % t)


def _calibrate(run: _Stream, n_tokens: int) -> tuple[float, dict[int, torch.Tensor]]:
    """The median norm of the first probe-train tokens passing the position and special rules
    (at least ``n_tokens`` of them, whole batches), and the activations of those batches that
    are this rank's too (used again in phase 1, not recomputed)."""
    norms: list[np.ndarray] = []
    cache: dict[int, torch.Tensor] = {}
    for i, ctx in enumerate(run.batches[0]):
        x = _forward(run.lm, run.contexts, ctx, run.hook)
        keep, _, _ = _rule_mask(run.contexts[ctx], run.filter, run.special)
        norms.append(x[torch.from_numpy(np.flatnonzero(keep))].norm(dim=1).numpy())
        if i < len(run.mine[0]):  # rank 0's share starts at the first batch
            cache[i] = x
        if sum(n.size for n in norms) >= n_tokens:
            break
    kept = np.concatenate(norms)
    if not kept.size:
        raise DarkMatterError("no probe-train tokens pass the position and special-token filters; "
                              "use more contexts or a smaller skip_positions")
    median = float(np.median(kept))
    log.info(
        "stream: median norm %.4g over %d calibration tokens; tokens above %s x that are excluded",
        median,
        kept.size,
        run.filter.max_norm_ratio,
    )
    return median, cache


def _progress_bar(progress: bool) -> Progress:
    return Progress(
        TextColumn("[bold]stream[/] {task.description}"), BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"), TimeRemainingColumn(),
        disable=not progress or not distributed.is_main(), transient=True,
    )

