"""What the trainer writes when an SAE (or transcoder) is done: the inference module, its
scores on the training rows and ``training.json`` (recipe, schedule, curve)."""

from __future__ import annotations

import math
from typing import Any

import torch

from sae_darkmatter._io import write_json
from sae_darkmatter.config import SAETrainConfig, to_dict
from sae_darkmatter.linalg import R2Accumulator
from sae_darkmatter.saes.archs import ARCHITECTURES
from sae_darkmatter.saes.io import TRAINING_FILENAME, save_sae
from sae_darkmatter.saes.latents import encode_decode
from sae_darkmatter.saes.topk import AffineSAE
from sae_darkmatter.saes.train_schedule import DECAY_FRACTION, doubling_gain, heldout_count
from sae_darkmatter.saes.train_state import Member, remove_checkpoint
from sae_darkmatter.saes.transcoder import Transcoder, save_transcoder

MAX_DEAD_AFTER_TOKENS = 1_000_000
EVAL_ROWS = 16_384  # training rows scored with the final (folded) SAE for training.json


def dead_after_tokens(cfg: SAETrainConfig) -> int:
    """A latent is dead when it has not fired for this many tokens (a tenth of the run, capped)."""
    return min(MAX_DEAD_AFTER_TOKENS, max(cfg.batch_size, cfg.train_tokens // 10))


def finish(m: Member, x: torch.Tensor, y: torch.Tensor | None, cfg: SAETrainConfig,
           scales: tuple[float, float], data: dict[str, Any], device: torch.device,
           metadata: dict[str, Any] | None) -> AffineSAE | Transcoder:
    """Save the inference SAE (a transcoder, given targets ``y``) and training.json; remove
    the checkpoint. ``data`` summarises what it was trained to reconstruct."""
    trained = m.sae.cpu()
    meta = {**(metadata or {}), **trained.saelens_metadata()}
    module: AffineSAE | Transcoder
    if y is None:
        module = trained.export(scales[0])
        save_sae(module, m.out_dir, metadata=meta)
    else:
        skip = trained.W_skip
        module = Transcoder(trained.export(*scales),
                            None if skip is None else skip.detach() * (scales[0] / scales[1]))
        save_transcoder(module, m.out_dir, metadata=meta)
    eval_fvu, eval_mse, eval_l0 = _score(module, x, y)
    dead_after = dead_after_tokens(cfg)
    n_dead = int((m.since_fired >= dead_after).sum())
    tokens = m.step * cfg.batch_size
    arch = ARCHITECTURES[cfg.architecture]
    write_json(m.out_dir / TRAINING_FILENAME, {
        "fingerprint": m.key,
        "algorithm": arch.algorithm,
        "architecture": cfg.architecture,
        **({} if y is None else {"transcoder": {"skip": trained.W_skip is not None,
                                                "output_scale": scales[1]}}),
        "config": to_dict(cfg),
        "width": m.sae.width,
        **({"k": int(m.sae.sparsity)} if arch.counts_latents else {}),
        "sparsity": {"name": arch.sparsity_name, "value": m.sae.sparsity},
        "lr": m.lr,
        "steps": m.step,
        "tokens_seen": tokens,
        "data": data,
        "input_scale": scales[0],
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
    return module


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


@torch.no_grad()
def _score(module: AffineSAE | Transcoder, x: torch.Tensor, y: torch.Tensor | None
           ) -> tuple[float, float, float]:
    """FVU, per-element MSE and mean L0 of the saved (raw-input) module on the first rows."""
    xs = x[:EVAL_ROWS].to(torch.float32)
    ys = xs if y is None else y[:EVAL_ROWS].to(torch.float32)
    sparse = module.sparse if isinstance(module, Transcoder) else module
    acc, active = R2Accumulator(ys.shape[1]), 0
    for xc, yc in zip(xs.split(4096), ys.split(4096), strict=True):
        y_hat, latents = encode_decode(sparse, xc)
        if isinstance(module, Transcoder):
            y_hat = y_hat + module.skip(xc)
        acc.update(yc, y_hat)
        active += int(latents.l0().sum())
    return acc.fvu(), float(acc.sse_dim.sum()) / ys.numel(), active / xs.shape[0]
