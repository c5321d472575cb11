"""Train SAEs on in-memory activations: one pass over the data for a whole grid, resumable.

``train_grid`` trains one SAE per (width, sparsity value) of ``cfg`` (architecture
``cfg.architecture``; recipes in ``saes.archs``) on the same stream of batches: each batch is
gathered and scaled once, then every SAE takes its own Adam step on it. Every SAE has its own
folder (SAELens ``cfg.json`` + ``sae_weights.safetensors``, ``training.json``, and
``checkpoint.pt`` while unfinished: ``train_state``).

Shared recipe: inputs scaled by ``s = sqrt(d_in) / mean||x||`` during training, folded into the
saved weights (the saved SAE takes raw activations, SAELens ``normalize_activations="none"``);
``b_dec`` starts at the data mean; the learning rate is constant, then decays linearly to 0 over
the last 20 % of steps. Batches are a pure function of ``(seed, step)`` (seeded per-epoch
permutations of the rows) and initialisation of ``seed``, so an SAE trained in a grid equals
the same SAE trained alone, and, with checkpoints holding model, optimizer and counters, a
killed and rerun training ends with bit-identical weights (on CPU).

Given targets ``y`` (another hook's activations of the same tokens), the grid is one of
transcoders instead, with or without a skip term (``skips``): each reads ``x`` and predicts
``y`` (scaled to ``E||y|| = sqrt(d_out)`` while training), and is saved as the SAELens
transcoder of its architecture (``save_transcoder``); SAELens has no TopK transcoder, so
``topk`` is refused there (``batchtopk`` saves as ``jumprelu_transcoder``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sae_darkmatter import distributed
from sae_darkmatter._io import require_folder, resolve_device
from sae_darkmatter.config import SAETrainConfig, fingerprint
from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes.archs import ARCHITECTURES, SAE_CLASSES
from sae_darkmatter.saes.archs.base import total_variance
from sae_darkmatter.saes.io import SAELENS_TRANSCODERS, load_sae
from sae_darkmatter.saes.topk import AffineSAE
from sae_darkmatter.saes.train_data import BatchStream, column_mean, data_summary
from sae_darkmatter.saes.train_record import dead_after_tokens, finish
from sae_darkmatter.saes.train_schedule import (
    DECAY_FRACTION,
    decay_after,
    eval_every,
    heldout_count,
    heldout_split,
    lr_factor,
    plateaued,
)
from sae_darkmatter.saes.train_state import (
    Member,
    is_finished,
    maybe_resume,
    remove_checkpoint,
    save_checkpoint,
)
from sae_darkmatter.saes.transcoder import Transcoder

log = logging.getLogger(__name__)

CURVE_POINTS = 64  # about this many training-curve entries per SAE
KINDS = {False: "transcoder", True: "skip-transcoder"}  # folder-name prefix of a transcoder grid
Spec = tuple[Path, int, float, bool]  # (folder, width, sparsity value, skip term)
# inference classes with a SAELens transcoder form (``jumprelu_transcoder``, ``transcoder``)
TRANSCODER_CLASSES = {SAE_CLASSES[base] for base, _ in SAELENS_TRANSCODERS.values()}


def default_lr(width: int, architecture: str = "topk") -> float:
    """sparsify's width rule ``2e-4 / sqrt(width / 2**14)`` times 8 (16 for relu), for short runs.

    Our runs take ~100-300 Adam steps (0.4-1.2M tokens at batch 4096). On SmolLM2 layer-15
    activations (TopK, k=32, 600k tokens) the plain rule left held-out FVU at 0.27-0.30 for
    W=1024-4096; 8x gave 0.17-0.20, 16x about the same, 32x diverged (0.31). At W=1024 and 300k
    tokens, relu's L0/FVU frontier was best at 16x (L0 36: FVU 0.228 vs 0.25-0.28 at 4-8x);
    jumprelu at 16x left 55 % of latents dead (8x: < 4 %).
    """
    return ARCHITECTURES[architecture].base_lr / math.sqrt(width / 2**14)


def sae_folder_name(architecture: str, width: int, sparsity: float,
                    skip: bool | None = None) -> str:
    """Stable, filesystem-safe folder name: ``topk-w512-k32``, ``relu-w512-l1_3e-02``; a
    transcoder's (``skip`` not None) starts ``transcoder-`` or ``skip-transcoder-``."""
    tag = ARCHITECTURES[architecture].folder_tag
    kind = "" if skip is None else f"{KINDS[skip]}-"
    if ARCHITECTURES[architecture].counts_latents:
        return f"{kind}{architecture}-w{width}-{tag}{sparsity:g}"
    mantissa, exponent = f"{float(sparsity):.6e}".split("e")
    return f"{kind}{architecture}-w{width}-{tag}_{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def train_sae(
    x: torch.Tensor,
    *,
    width: int,
    k: int | None = None,
    cfg: SAETrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    sparsity: float | None = None,
) -> AffineSAE:
    """Train one ``cfg.architecture`` SAE of ``width`` latents on ``x [N, d_in]`` into ``out_dir``.

    ``k`` (topk / batchtopk) or ``sparsity`` (any architecture: k, L1 or L0 coefficient) sets
    the sparsity. ``metadata`` (model_name, hook_name, ...) goes into cfg.json. A finished SAE
    of the same config and data in ``out_dir`` is returned untrained; a checkpoint resumes.
    """
    if (k is None) == (sparsity is None):
        raise DarkMatterError("train_sae needs exactly one of k= and sparsity=")
    if k is not None and not ARCHITECTURES[cfg.architecture].counts_latents:
        with_k = "/".join(a.name for a in ARCHITECTURES.values() if a.counts_latents)
        raise DarkMatterError(f"k= is for {with_k}; pass sparsity= for {cfg.architecture}")
    value = k if k is not None else sparsity
    assert value is not None
    with distributed.main_first():  # under torchrun rank 0 trains; the others load its result
        member = _train([(Path(out_dir), width, value, False)], x, None, cfg, metadata,
                        progress)[0]
    assert not isinstance(member, Transcoder)
    return member if member is not None else load_sae(out_dir)


def train_grid(
    x: torch.Tensor,
    cfg: SAETrainConfig,
    out_dir: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    y: torch.Tensor | None = None,
    skips: tuple[bool, ...] = (False, True),
) -> list[Path]:
    """Train every (sparsity value, width) SAE of ``cfg`` in one pass; their folders, in order.

    Folders are ``out_dir / sae_folder_name(...)``, sparsity values outer, widths inner. Under
    torchrun SAE ``i`` of that order is trained by rank ``i % world_size`` (each SAE depends
    only on its seed and the shared batch order, so the weights equal one process's), and
    every rank returns once all are saved.

    With ``y`` (``[N, d_out]``, row ``i`` the target of ``x``'s row ``i``) the grid is of
    transcoders from ``x`` to ``y``, once per value of ``skips`` (the outermost axis; with a
    skip term or without); ``metadata`` then needs ``hook_name_out`` too.
    """
    require_folder(out_dir, "the SAE folders")
    axis = (None,) if y is None else tuple(skips)
    if not axis:
        raise DarkMatterError("skips must hold False, True or both")
    specs = [(Path(out_dir) / sae_folder_name(cfg.architecture, w, s, skip), w, s, bool(skip))
             for skip in axis for s in cfg.sparsity_values() for w in cfg.widths]
    names = [spec[0].name for spec in specs]
    if len(set(names)) != len(names):
        raise DarkMatterError(f"the grid has repeated SAEs (folder names {names})")
    mine = [spec for i, spec in enumerate(specs) if distributed.owns(i)]
    if mine:
        _train(mine, x, y, cfg, metadata, progress and distributed.is_main())
    distributed.barrier()
    return [spec[0] for spec in specs]


def _train(
    specs: list[Spec],
    x: torch.Tensor,
    y: torch.Tensor | None,
    cfg: SAETrainConfig,
    metadata: dict[str, Any] | None,
    progress: bool,
) -> list[AffineSAE | Transcoder | None]:
    """Train the unfinished SAEs (transcoders, given ``y``) of ``specs``; the inference
    modules (None where already done)."""
    _validate(x, y, cfg, specs, metadata)
    data = data_summary(x)
    target = data if y is None else data_summary(y)
    device = resolve_device(cfg.device)
    scales = (math.sqrt(x.shape[1]) / data["mean_norm"],
              math.sqrt((x if y is None else y).shape[1]) / target["mean_norm"])
    b_dec = column_mean(x if y is None else y) * scales[1]
    arch = ARCHITECTURES[cfg.architecture]
    members: list[Member | None] = []
    for out_dir, width, value, skip in specs:
        lr = cfg.lr if cfg.lr is not None else default_lr(width, cfg.architecture)
        options = arch.options(cfg, width)
        key = _fingerprint(cfg, width, value, lr, data,
                           (*([] if y is None else [KINDS[skip], target]),
                            *([options] if options else [])))
        if is_finished(out_dir, key):
            log.info("%s already holds this SAE (fingerprint %s); not retraining", out_dir, key)
            remove_checkpoint(out_dir)  # left when a kill came between training.json and removal
            members.append(None)
            continue
        sae = arch.trainer(x.shape[1], width, value, b_dec=b_dec, seed=cfg.seed,
                           transcoder=y is not None, skip=skip, **options)
        sae.to(device)
        member = Member(out_dir, key, lr, sae, torch.optim.Adam(sae.param_groups(), lr=lr),
                        torch.zeros(width, dtype=torch.int64))
        maybe_resume(member)
        member.since_fired = member.since_fired.to(device)
        members.append(member)
    todo = [m for m in members if m is not None]
    if todo:
        _fit(x, y, todo, cfg, scales, progress)
    return [None if m is None else finish(m, x, y, cfg, scales, target, device, metadata)
            for m in members]


def _fingerprint(cfg: SAETrainConfig, width: int, value: float, lr: float,
                 data: dict[str, Any], extra: tuple[Any, ...]) -> str:
    """Cache key of one SAE (for topk the same as before other architectures existed);
    ``extra``: a transcoder's kind and target data summary, the architecture's options."""
    arch = ARCHITECTURES[cfg.architecture]
    sparsity = int(value) if arch.counts_latents else float(value)
    until = ("plateau", cfg.plateau_tolerance) if cfg.until == "plateau" else ()
    return fingerprint(arch.algorithm, width, sparsity, cfg.train_tokens,
                       cfg.batch_size, lr, cfg.seed, data, *until, *extra)


def _fit(x: torch.Tensor, y: torch.Tensor | None, members: list[Member], cfg: SAETrainConfig,
         scales: tuple[float, float], progress: bool) -> None:
    """Run every member from its own step to its end on the shared stream of batches.

    Under ``until = "plateau"`` batches come from the rows outside the held-out ones, which
    every member is scored on each ``eval_every`` steps until its decay starts.
    """
    cap = math.ceil(cfg.train_tokens / cfg.batch_size)
    plateau = cfg.until == "plateau"
    train_rows, held_rows = heldout_split(x.shape[0], cfg.seed) if plateau else (None, None)
    stream = BatchStream(x.shape[0] if train_rows is None else len(train_rows), cfg.batch_size,
                         cfg.seed)
    every = eval_every(cap)
    dead_after = dead_after_tokens(cfg)
    curve_every = max(1, cap // CURVE_POINTS)
    device = members[0].sae.W_dec.device
    held = None if held_rows is None else (
        x[held_rows].to(device, torch.float32) * scales[0],
        (x if y is None else y)[held_rows].to(device, torch.float32) * scales[1])
    for m in members:
        if m.end == 0:  # not resumed: the fixed budget's schedule until a plateau moves it
            m.end, m.decay_steps = cap, DECAY_FRACTION * cap
    start = min(m.step for m in members)
    label = (f"SAE {members[0].out_dir.name}" if len(members) == 1
             else f"{cfg.architecture} grid ({len(members)} SAEs)")
    t0 = time.perf_counter()
    with _progress_bar(progress) as bar:
        task = bar.add_task(label, total=cap * cfg.batch_size,
                            completed=start * cfg.batch_size, fvu=math.nan, tps=0.0)
        step = start
        while step < max(m.end for m in members):
            rows = stream.rows(step)
            rows = rows if train_rows is None else train_rows[rows]
            xb = x[rows].to(device, torch.float32) * scales[0]
            yb = None if y is None else y[rows].to(device, torch.float32) * scales[1]
            total_var = total_variance(xb if yb is None else yb)
            for m in members:
                if m.step != step or step >= m.end:  # ahead (a later checkpoint), or done
                    continue
                t = time.perf_counter()
                fvu, l0 = _train_step(m, xb, yb, total_var,
                                      lr_factor(step, m.end, m.decay_steps), step / cap,
                                      dead_after)
                m.step, m.last_fvu = step + 1, fvu
                if (held is not None and m.step % every == 0 and m.end == cap
                        and m.step <= (1 - DECAY_FRACTION) * cap):  # before any decay
                    _score_heldout(m, held, cfg, cap)
                m.seconds += time.perf_counter() - t
                if m.step % curve_every == 0 or m.step == m.end:
                    m.curve.append({"tokens": m.step * cfg.batch_size, "fvu": fvu, "l0": l0,
                                    "dead_fraction": _dead_fraction(m, dead_after)})
                if m.step % cfg.checkpoint_every == 0 and m.step < m.end:
                    save_checkpoint(m)
            step += 1
            bar.update(task, total=max(m.end for m in members) * cfg.batch_size,
                       completed=step * cfg.batch_size,
                       fvu=sum(m.last_fvu for m in members) / len(members),
                       tps=(step - start) * cfg.batch_size / (time.perf_counter() - t0))


@torch.no_grad()
def _score_heldout(m: Member, held: tuple[torch.Tensor, torch.Tensor], cfg: SAETrainConfig,
                   cap: int) -> None:
    """Append the held-out FVU; on a plateau, start the decay (``train_schedule``)."""
    x, y = held
    residual = sum(float(m.sae(xc, yc).residual.pow(2).sum())
                   for xc, yc in zip(x.split(4096), y.split(4096), strict=True))
    m.heldout.append({"tokens": m.step * cfg.batch_size,
                      "fvu": residual / float(total_variance(y))})
    if plateaued(m.heldout, cfg.plateau_tolerance):
        m.end, m.decay_steps = decay_after(m.step, cap)


def _train_step(m: Member, xb: torch.Tensor, yb: torch.Tensor | None, total_var: torch.Tensor,
                lr_scale: float, progress: float, dead_after: int) -> tuple[float, float]:
    """One Adam step of one SAE; updates its dead-latent counters; batch FVU and L0."""
    for group in m.opt.param_groups:
        group["lr"] = m.lr * lr_scale * group.get("lr_scale", 1.0)  # absent in old checkpoints
    dead = m.since_fired >= dead_after
    fw = m.sae(xb, yb)
    loss = m.sae.loss(fw, total_var, dead, progress)
    m.opt.zero_grad(set_to_none=True)
    loss.backward()
    m.sae.before_step()
    m.opt.step()
    m.sae.after_step(fw)
    with torch.no_grad():
        m.since_fired += xb.shape[0]
        m.since_fired[fw.fired(m.sae.width)] = 0
        fvu = float(fw.residual.pow(2).sum() / total_var)
    return fvu, int(fw.active().sum()) / xb.shape[0]


def _dead_fraction(m: Member, dead_after: int) -> float:
    return float((m.since_fired >= dead_after).float().mean())


def _validate(x: torch.Tensor, y: torch.Tensor | None, cfg: SAETrainConfig, specs: list[Spec],
              metadata: dict[str, Any] | None) -> None:
    for name, t in (("activations", x), ("targets", y)):
        if name == "targets" and t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ShapeMismatchError(f"training {name} must be a 2-D tensor [N, d], got {shape}")
        if not t.is_floating_point() or t.shape[0] < 1 or t.shape[1] < 1:
            raise DarkMatterError(f"training {name} must be a non-empty float tensor, got "
                                  f"{t.dtype} of shape {tuple(t.shape)}")
    if y is not None:
        if y.shape[0] != x.shape[0]:
            raise ShapeMismatchError(f"a transcoder's targets need one row per input row: x has "
                                     f"{x.shape[0]} rows, y {y.shape[0]}")
        if ARCHITECTURES[cfg.architecture].sae_class not in TRANSCODER_CLASSES:
            raise DarkMatterError(
                f"SAELens has no {cfg.architecture} transcoder to save it as; train transcoders "
                f"with architecture batchtopk (saved as jumprelu_transcoder), jumprelu or relu")
        if not (metadata or {}).get("hook_name_out"):
            raise DarkMatterError("a transcoder grid needs metadata['hook_name_out'] (the hook "
                                  "of its targets y)")
    if cfg.until == "plateau" and heldout_count(x.shape[0]) < 1:
        raise DarkMatterError(f"until = 'plateau' holds out a tenth of the training rows and "
                              f"needs at least 10 of them, got {x.shape[0]}")
    for _, width, value, _ in specs:
        if width < 1:
            raise DarkMatterError(f"SAE width must be >= 1, got {width}")
        if ARCHITECTURES[cfg.architecture].counts_latents and not (
                value == int(value) and 0 < value < width):
            raise DarkMatterError(f"SAE width ({width}) must exceed k ({value}) and k must be "
                                  f"an integer >= 1")
        if not value > 0:
            raise DarkMatterError(f"{cfg.architecture} sparsity coefficient must be > 0, got "
                                  f"{value}")


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"),
        TextColumn("fvu {task.fields[fvu]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
