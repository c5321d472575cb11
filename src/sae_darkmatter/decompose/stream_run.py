"""One streamed decomposition's moving parts: this rank's batches, the token filter applied
to each, the norm calibration, the sums and their checkpoint (driven by ``stream``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sae_darkmatter import distributed
from sae_darkmatter._io import atomic_path, resolve_device, try_lock
from sae_darkmatter.config import DecomposeConfig, SplitConfig, TokenFilter
from sae_darkmatter.contexts import special_token_ids
from sae_darkmatter.decompose.checks import Locate, require_finite_at
from sae_darkmatter.decompose.core import (
    JACKKNIFE_GROUPS,
    HeldOutScores,
    SAEErrors,
    chunk_size,
    probe_system,
)
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.linalg import LinearProbe
from sae_darkmatter.models import LoadedModel, forward_capture, hook_dim
from sae_darkmatter.splits import norm_outliers, rule_mask, split_contexts

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 25  # batches between checkpoints
COUNTS = ("tokens_total", "excluded_positions", "excluded_special_tokens",
          "excluded_norm_outliers", "probe_train_tokens", "probe_test_tokens")


@dataclass
class Batch:
    """The kept tokens of one forwarded batch: activations [n, d] and where each came from."""

    x: torch.Tensor
    context: np.ndarray
    position: np.ndarray

    def locate(self, offset: int) -> Locate:
        """``Locate`` for the rows of a chunk starting at row ``offset``."""
        return lambda i: (self.context[offset + i], self.position[offset + i])


class StreamState:
    """Everything a checkpoint holds: this rank's sums, batches done per phase, counts, median."""

    def __init__(
        self, n_saes: int, d: int, n_groups: int, cfg: DecomposeConfig, device: torch.device
    ) -> None:
        self.fit = probe_system(cfg, n_saes, d, device)
        self.scores = [HeldOutScores(d, n_groups, device=device) for _ in range(n_saes)]
        self.done = [0, 0]
        self.counts: dict[str, int] = dict.fromkeys(COUNTS, 0)
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
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
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


class StreamRun:
    """One streamed decomposition: this rank's batches of each phase (0: probe-train, 1:
    probe-test contexts), the token filter, the sums (``StreamState``) and the checkpoint."""

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

    def _new_state(self) -> StreamState:
        return StreamState(len(self.errors.names), self.d, self.n_groups, self.cfg, self.device)

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
        median = self.state.median = distributed.broadcast(self.state.median)
        ratio = self.filter.max_norm_ratio
        assert ratio is not None, "calibrate runs only under a norm rule"
        self.threshold = ratio * median

    def batch(self, phase: int, i: int) -> Batch:
        """The kept tokens of this rank's batch ``i`` of ``phase`` (counted in the state)."""
        ctx = self.mine[phase][i]
        x = (
            self.cache.pop(i)
            if phase == 0 and i in self.cache
            else _forward(self.lm, self.contexts, ctx, self.hook)
        )
        median = None if self.threshold is None else self.state.median
        return _filtered(x, self.contexts[ctx], ctx, self.filter, self.special, median,
                         self.state.counts, COUNTS[4 + phase])

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


def _rules(ids: np.ndarray, filt: TokenFilter, special: np.ndarray) -> tuple[np.ndarray, int, int]:
    """``rule_mask`` of a batch ``ids`` [B, T] (flat, context-major)."""
    b, t = ids.shape
    return rule_mask(np.tile(np.arange(t), b), ids.ravel, t, filt, special)


def _filtered(
    x: torch.Tensor,
    ids: np.ndarray,
    ctx: np.ndarray,
    filt: TokenFilter,
    special: np.ndarray,
    median: float | None,
    counts: dict[str, int],
    kept_key: str,
) -> Batch:
    """The tokens of one batch that pass the filter (the norm rule against the calibrated
    ``median``; None: no norm rule); updates ``counts``."""
    keep, n_position, n_special = _rules(ids, filt, special)
    n_norm = 0
    if median is not None:
        rows = np.flatnonzero(keep)
        outlier = norm_outliers(x[torch.from_numpy(rows)].norm(dim=1).numpy(), filt, median)
        n_norm = int(outlier.sum())
        keep[rows[outlier]] = False
    rows = np.flatnonzero(keep)
    t = ids.shape[1]
    counts["tokens_total"] += ids.size
    counts["excluded_positions"] += n_position
    counts["excluded_special_tokens"] += n_special
    counts["excluded_norm_outliers"] += n_norm
    counts[kept_key] += int(rows.size)
    return Batch(x[torch.from_numpy(rows)], ctx[rows // t], rows % t)


def _calibrate(run: StreamRun, n_tokens: int) -> tuple[float, dict[int, torch.Tensor]]:
    """The median norm of the first probe-train tokens passing the position and special rules
    (at least ``n_tokens`` of them, whole batches), and the activations of those batches that
    are this rank's too (used again in phase 1, not recomputed)."""
    norms: list[np.ndarray] = []
    cache: dict[int, torch.Tensor] = {}
    for i, ctx in enumerate(run.batches[0]):
        x = _forward(run.lm, run.contexts, ctx, run.hook)
        keep, _, _ = _rules(run.contexts[ctx], run.filter, run.special)
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
