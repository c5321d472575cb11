"""TopK SAE training throughput and quality: our trainer against ``sae_lens``'s own.

Both train a TopK SAE of the same width and k, with the same learning rate and schedule
(constant, then linear decay to 0 over the last 20 % of steps), on the same batches (same rows,
same order, inputs scaled to ``E||x|| = sqrt(d_in)``) of real SmolLM2 activations held in
memory, for the same number of tokens:

- ours: ``saes.train.train_sae`` (sparse encoder/decoder backward, AuxK, unit-norm decoder);
- sae_lens: ``SAETrainer`` + ``TopKTrainingSAE`` (its defaults: decoder init norm 0.1,
  ``rescale_acts_by_decoder_norm``, AuxK coefficient 1, gradient clipping at 1) fed by an
  in-memory iterator; ``lr_end`` must be given, and ``use_sparse_activations`` fails on CPU.

Reported: training tokens/s of each (wall clock of the training loop: ours from training.json,
setup and saving excluded; sae_lens ``fit()`` excluding its one-time set-up), the ratio, and
the FVU each reaches on held-out rows (probe-test tokens of the run's splits).

Data: ``--run DIR`` uses ``DIR/store`` (a pipeline run folder, e.g. ``darkmatter run -o DIR``);
otherwise a small store of SmolLM2 layer-15 activations is harvested once into ``--cache``
(~2 min). Default: W=8192, k=32, batch 4096, 25 steps (102k tokens): about 4 minutes on 2 cores.
On a shared machine, ``--repeats 3`` alternates the two trainers and reports medians.

    python benchmarks/bench_train.py [--run RUN] [--width 8192] [--k 32] [--steps 25] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sae_darkmatter.config import (
    CorpusConfig,
    HarvestConfig,
    SAETrainConfig,
    SplitConfig,
)
from sae_darkmatter.harvest import harvest
from sae_darkmatter.saes.train import default_lr, train_sae
from sae_darkmatter.saes.train_data import BatchStream
from sae_darkmatter.splits import make_splits
from sae_darkmatter.store import ActivationStore

EVAL_ROWS = 16_384


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """SAE-training rows and held-out (probe-test) rows of a SmolLM2 store."""
    if args.run is not None:
        store = ActivationStore.open(Path(args.run) / "store")
    else:
        cfg = HarvestConfig(corpus=CorpusConfig(n_contexts=args.contexts), with_loss=False)
        store = harvest(cfg, Path(args.cache), progress=True)
    splits = make_splits(store, SplitConfig())
    hook = next(iter(store.hooks))
    held_out = np.sort(splits.probe_test[:EVAL_ROWS])
    return store.gather(hook, splits.sae_train), store.gather(hook, held_out)


def held_out_fvu(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    x64 = x.double()
    return float((x64 - x_hat.double()).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())


def run_ours(x: torch.Tensor, test: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    cfg = SAETrainConfig(ks=(args.k,), train_tokens=args.steps * args.batch,
                         batch_size=args.batch, lr=args.lr, checkpoint_every=10**9, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        sae = train_sae(x, width=args.width, k=args.k, cfg=cfg, out_dir=tmp, progress=False)
        info = json.loads((Path(tmp) / "training.json").read_text())
    with torch.no_grad():
        fvu = held_out_fvu(sae(test), test)
    return {"tokens_per_s": info["tokens_per_second"], "seconds": info["seconds"], "fvu": fvu}


def run_sae_lens(x: torch.Tensor, test: torch.Tensor, args: argparse.Namespace
                 ) -> dict[str, float]:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    scale = math.sqrt(x.shape[1]) / float(x.double().norm(dim=1).mean())
    stream = BatchStream(x.shape[0], args.batch, seed=0)  # the batches ours sees, in order

    def batches() -> Iterator[torch.Tensor]:
        step = 0
        while True:
            yield x[stream.rows(step)].float() * scale
            step += 1

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=args.width, k=args.k,
                                                device="cpu"))
    cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch,
        lr=args.lr, lr_end=0.0, lr_decay_steps=math.ceil(0.2 * args.steps), device="cpu",
        dead_feature_window=max(1, args.steps // 10),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches())
    t = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t
    with torch.no_grad():
        fvu = held_out_fvu(sae.decode(sae.encode(test * scale)) / scale, test)
    return {"tokens_per_s": args.steps * args.batch / seconds, "seconds": seconds, "fvu": fvu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="pipeline run folder holding store/ (default: harvest)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bench_train_store"),
                    help="where to harvest (and reuse) a store when --run is not given")
    ap.add_argument("--contexts", type=int, default=640, help="contexts of 128 tokens to harvest")
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--lr", type=float, default=None, help="default: ours for --width")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each (median)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.lr = args.lr or default_lr(args.width)

    x, test = load_data(args)
    print(f"data: {x.shape[0]:,} training rows, {test.shape[0]:,} held-out rows, d_in "
          f"{x.shape[1]}; W={args.width} k={args.k} batch {args.batch} x {args.steps} steps "
          f"({args.steps * args.batch:,} tokens), lr {args.lr:.2e}, "
          f"{torch.get_num_threads()} threads")
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "sae_lens": []}
    for _ in range(args.repeats):  # alternating, so load from other processes hits both alike
        runs["ours"].append(run_ours(x, test, args))
        runs["sae_lens"].append(run_sae_lens(x, test, args))
    speed = {}
    for name, rs in runs.items():
        speed[name] = statistics.median(r["tokens_per_s"] for r in rs)
        each = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in rs)
        print(f"{name:9s} {speed[name]:9,.0f} tok/s (median of {each})  "
              f"held-out FVU {rs[0]['fvu']:.4f}")
    print(f"speed-up: {speed['ours'] / speed['sae_lens']:.2f}x")


if __name__ == "__main__":
    main()
