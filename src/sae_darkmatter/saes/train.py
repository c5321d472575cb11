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
from sae_darkmatter._io import require_folder, resolve_device, write_json
from sae_darkmatter.config import SAETrainConfig, fingerprint, to_dict
from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.linalg import R2Accumulator
from sae_darkmatter.saes.archs import ARCHITECTURES
from sae_darkmatter.saes.archs.base import total_variance
from sae_darkmatter.saes.io import TRAINING_FILENAME, load_sae, save_sae
from sae_darkmatter.saes.latents import encode_decode
from sae_darkmatter.saes.topk import AffineSAE
from sae_darkmatter.saes.train_data import BatchStream, column_mean, data_summary
from sae_darkmatter.saes.train_schedule import (
    DECAY_FRACTION,
    decay_after,
    doubling_gain,
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

log = logging.getLogger(__name__)

MAX_DEAD_AFTER_TOKENS = 1_000_000
EVAL_ROWS = 16_384  # training rows scored with the final (folded) SAE for training.json
CURVE_POINTS = 64  # about this many training-curve entries per SAE


def default_lr(width: int, architecture: str = "topk") -> float:
    """sparsify's width rule ``2e-4 / sqrt(width / 2**14)`` times 8 (16 for relu), for short runs.

    Our runs take ~100-300 Adam steps (0.4-1.2M tokens at batch 4096). On SmolLM2 layer-15
    activations (TopK, k=32, 600k tokens) the plain rule left held-out FVU at 0.27-0.30 for
    W=1024-4096; 8x gave 0.17-0.20, 16x about the same, 32x diverged (0.31). At W=1024 and 300k
    tokens, relu's L0/FVU frontier was best at 16x (L0 36: FVU 0.228 vs 0.25-0.28 at 4-8x);
    jumprelu at 16x left 55 % of latents dead (8x: < 4 %).
    """
    return ARCHITECTURES[architecture].base_lr / math.sqrt(width / 2**14)


def dead_after_tokens(cfg: SAETrainConfig) -> int:
    """A latent is dead when it has not fired for this many tokens (a tenth of the run, capped)."""
    return min(MAX_DEAD_AFTER_TOKENS, max(cfg.batch_size, cfg.train_tokens // 10))


def sae_folder_name(architecture: str, width: int, sparsity: float) -> str:
    """Stable, filesystem-safe folder name: ``topk-w512-k32``, ``relu-w512-l1_3e-02``."""
    tag = ARCHITECTURES[architecture].folder_tag
    if ARCHITECTURES[architecture].counts_latents:
        return f"{architecture}-w{width}-{tag}{sparsity:g}"
    mantissa, exponent = f"{float(sparsity):.6e}".split("e")
    return f"{architecture}-w{width}-{tag}_{mantissa.rstrip('0').rstrip('.')}e{exponent}"


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
        member = _train([(Path(out_dir), width, value)], x, cfg, metadata, progress)[0]
    return member if member is not None else load_sae(out_dir)


def train_grid(
    x: torch.Tensor,
    cfg: SAETrainConfig,
    out_dir: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Train every (sparsity value, width) SAE of ``cfg`` in one pass; their folders, in order.

    Folders are ``out_dir / sae_folder_name(...)``, sparsity values outer, widths inner. Under
    torchrun SAE ``i`` of that order is trained by rank ``i % world_size`` (each SAE depends
    only on its seed and the shared batch order, so the weights equal one process's), and
    every rank returns once all are saved.
    """
    require_folder(out_dir, "the SAE folders")
    specs = [(Path(out_dir) / sae_folder_name(cfg.architecture, w, s), w, s)
             for s in cfg.sparsity_values() for w in cfg.widths]
    names = [p.name for p, _, _ in specs]
    if len(set(names)) != len(names):
        raise DarkMatterError(f"the grid has repeated SAEs (folder names {names})")
    mine = [spec for i, spec in enumerate(specs) if distributed.owns(i)]
    if mine:
        _train(mine, x, cfg, metadata, progress and distributed.is_main())
    distributed.barrier()
    return [p for p, _, _ in specs]


def _train(
    specs: list[tuple[Path, int, float]],
    x: torch.Tensor,
    cfg: SAETrainConfig,
    metadata: dict[str, Any] | None,
    progress: bool,
) -> list[AffineSAE | None]:
    """Train the unfinished SAEs of ``specs``; the inference SAEs (None where already done)."""
    _validate(x, cfg, specs)
    data = data_summary(x)
    device = resolve_device(cfg.device)
    scale = math.sqrt(x.shape[1]) / data["mean_norm"]
    b_dec = column_mean(x) * scale
    arch = ARCHITECTURES[cfg.architecture]
    members: list[Member | None] = []
    for out_dir, width, value in specs:
        lr = cfg.lr if cfg.lr is not None else default_lr(width, cfg.architecture)
        key = _fingerprint(cfg, width, value, lr, data)
        if is_finished(out_dir, key):
            log.info("%s already holds this SAE (fingerprint %s); not retraining", out_dir, key)
            remove_checkpoint(out_dir)  # left when a kill came between training.json and removal
            members.append(None)
            continue
        sae = arch.trainer(x.shape[1], width, value, b_dec=b_dec, seed=cfg.seed)
        sae.to(device)
        member = Member(out_dir, key, lr, sae, torch.optim.Adam(sae.param_groups(), lr=lr),
                        torch.zeros(width, dtype=torch.int64))
        maybe_resume(member)
        member.since_fired = member.since_fired.to(device)
        members.append(member)
    todo = [m for m in members if m is not None]
    if todo:
        _fit(x, todo, cfg, scale, progress)
    return [None if m is None else _finish(m, x, cfg, scale, data, device, metadata)
            for m in members]


def _fingerprint(cfg: SAETrainConfig, width: int, value: float, lr: float,
                 data: dict[str, Any]) -> str:
    """Cache key of one SAE (for topk the same as before other architectures existed)."""
    arch = ARCHITECTURES[cfg.architecture]
    sparsity = int(value) if arch.counts_latents else float(value)
    until = ("plateau", cfg.plateau_tolerance) if cfg.until == "plateau" else ()
    return fingerprint(arch.algorithm, width, sparsity, cfg.train_tokens,
                       cfg.batch_size, lr, cfg.seed, data, *until)


def _fit(x: torch.Tensor, members: list[Member], cfg: SAETrainConfig, scale: float,
         progress: bool) -> None:
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
    held = None if held_rows is None else x[held_rows].to(device, torch.float32) * scale
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
            xb = x[rows if train_rows is None else train_rows[rows]].to(device, torch.float32)
            xb = xb * scale
            total_var = total_variance(xb)
            for m in members:
                if m.step != step or step >= m.end:  # ahead (a later checkpoint), or done
                    continue
                t = time.perf_counter()
                fvu, l0 = _train_step(m, xb, total_var, lr_factor(step, m.end, m.decay_steps),
                                      step / cap, dead_after)
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
def _score_heldout(m: Member, held: torch.Tensor, cfg: SAETrainConfig, cap: int) -> None:
    """Append the held-out FVU; on a plateau, start the decay (``train_schedule``)."""
    residual = sum(float(m.sae(chunk).residual.pow(2).sum()) for chunk in held.split(4096))
    m.heldout.append({"tokens": m.step * cfg.batch_size,
                      "fvu": residual / float(total_variance(held))})
    if plateaued(m.heldout, cfg.plateau_tolerance):
        m.end, m.decay_steps = decay_after(m.step, cap)


def _train_step(m: Member, xb: torch.Tensor, total_var: torch.Tensor, lr_scale: float,
                progress: float, dead_after: int) -> tuple[float, float]:
    """One Adam step of one SAE; updates its dead-latent counters; batch FVU and L0."""
    for group in m.opt.param_groups:
        group["lr"] = m.lr * lr_scale * group.get("lr_scale", 1.0)  # absent in old checkpoints
    dead = m.since_fired >= dead_after
    fw = m.sae(xb)
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


def _finish(m: Member, x: torch.Tensor, cfg: SAETrainConfig, scale: float,
            data: dict[str, Any], device: torch.device, metadata: dict[str, Any] | None
            ) -> AffineSAE:
    """Save the inference SAE and training.json; remove the checkpoint."""
    sae = m.sae.cpu().export(scale)
    save_sae(sae, m.out_dir, metadata=dict(metadata or {}))
    eval_fvu, eval_mse, eval_l0 = _score(sae, x)
    dead_after = dead_after_tokens(cfg)
    n_dead = int((m.since_fired >= dead_after).sum())
    tokens = m.step * cfg.batch_size
    arch = ARCHITECTURES[cfg.architecture]
    write_json(m.out_dir / TRAINING_FILENAME, {
        "fingerprint": m.key,
        "algorithm": arch.algorithm,
        "architecture": cfg.architecture,
        "config": to_dict(cfg),
        "width": m.sae.width,
        **({"k": int(m.sae.sparsity)} if arch.counts_latents else {}),
        "sparsity": {"name": arch.sparsity_name, "value": m.sae.sparsity},
        "lr": m.lr,
        "steps": m.step,
        "tokens_seen": tokens,
        "data": data,
        "input_scale": scale,
        "last_batch_fvu": m.last_fvu,
        "final_train_fvu": eval_fvu,
        "final_train_mse": eval_mse,
        "final_train_l0": eval_l0,
        "eval_rows": min(EVAL_ROWS, x.shape[0]),
        "dead_after_tokens": dead_after,
        "dead_latents": n_dead,
        "dead_fraction": n_dead / m.sae.width,
        "seconds": m.seconds,
        "tokens_per_second": tokens / max(m.seconds, 1e-9),
        "device": str(device),
        **m.sae.summary(),
        "schedule": _schedule_record(m, cfg, x.shape[0]),
        "curve": m.curve,
    })
    remove_checkpoint(m.out_dir)
    return sae


def _schedule_record(m: Member, cfg: SAETrainConfig, n_rows: int) -> dict[str, Any]:
    """How training stopped and how far from its plateau the SAE was when the decay began."""
    cap = math.ceil(cfg.train_tokens / cfg.batch_size)
    decay_step = round(m.end - m.decay_steps)
    decay_start = decay_step * cfg.batch_size
    if cfg.until == "plateau":
        gain, source = doubling_gain(m.heldout), "held-out rows"
        stopped = "plateau" if decay_step < round((1 - DECAY_FRACTION) * cap) else "cap"
    else:
        gain, source, stopped = doubling_gain(m.curve, decay_start), "training batches", "tokens"
    return {"until": cfg.until, "stopped": stopped, "decay_start_tokens": decay_start,
            "doubling_gain": gain, "doubling_gain_from": source,
            **({"plateau_tolerance": cfg.plateau_tolerance,
                "heldout_rows": heldout_count(n_rows), "heldout": m.heldout}
               if cfg.until == "plateau" else {})}


def _validate(x: torch.Tensor, cfg: SAETrainConfig, specs: list[tuple[Path, int, float]]) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeMismatchError(f"training activations must be a 2-D tensor [N, d_in], got "
                                 f"{shape}")
    if not x.is_floating_point() or x.shape[0] < 1 or x.shape[1] < 1:
        raise DarkMatterError(f"training activations must be a non-empty float tensor, got "
                              f"{x.dtype} of shape {tuple(x.shape)}")
    if cfg.until == "plateau" and heldout_count(x.shape[0]) < 1:
        raise DarkMatterError(f"until = 'plateau' holds out a tenth of the training rows and "
                              f"needs at least 10 of them, got {x.shape[0]}")
    for _, width, value in specs:
        if width < 1:
            raise DarkMatterError(f"SAE width must be >= 1, got {width}")
        if ARCHITECTURES[cfg.architecture].counts_latents and not (
                value == int(value) and 0 < value < width):
            raise DarkMatterError(f"SAE width ({width}) must exceed k ({value}) and k must be "
                                  f"an integer >= 1")
        if not value > 0:
            raise DarkMatterError(f"{cfg.architecture} sparsity coefficient must be > 0, got "
                                  f"{value}")


@torch.no_grad()
def _score(sae: AffineSAE, x: torch.Tensor) -> tuple[float, float, float]:
    """FVU, per-element MSE and mean L0 of the saved (raw-input) SAE on the first rows."""
    xs = x[:EVAL_ROWS].to(torch.float32)
    acc, active = R2Accumulator(xs.shape[1]), 0
    for chunk in xs.split(4096):
        x_hat, latents = encode_decode(sae, chunk)
        acc.update(chunk, x_hat)
        active += int(latents.l0().sum())
    return acc.fvu(), float(acc.sse_dim.sum()) / xs.numel(), active / xs.shape[0]


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
