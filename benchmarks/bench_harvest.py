"""Harvest throughput vs a plain ``transformers`` forward of the same model on the same batches.

Compares, on the embedded SmolLM2 (or --model) at a middle-layer hook:
  plain:     model(ids, output_hidden_states=True)          (what a user would write)
  ours:      forward_capture(..., with_loss=False)          (stops after the hooked layer)
  plain+CE:  model(ids) logits + per-token cross-entropy
  ours+CE:   forward_capture(..., with_loss=True)
and the whole ``harvest()`` loop (store writes included) against the plain forward.

    python benchmarks/bench_harvest.py [--model smollm2] [--batches 6] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from sae_darkmatter import CorpusConfig, HarvestConfig, ModelConfig, harvest, load_model
from sae_darkmatter.contexts import build_contexts
from sae_darkmatter.models import default_hook, forward_capture


def timed(fn, batches) -> float:
    fn(batches[0])  # warm-up
    t = time.perf_counter()
    for b in batches:
        fn(b)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context-length", type=int, default=128)
    args = ap.parse_args()

    lm = load_model(ModelConfig(name=args.model))
    hook = default_hook(lm.model)
    layer = int(hook.split(".")[1])
    corpus = CorpusConfig(
        n_contexts=args.batches * args.batch_size, context_length=args.context_length
    )
    ctx = torch.from_numpy(build_contexts(corpus, lm.tokenizer))
    batches = list(ctx.split(args.batch_size))
    n_tok = ctx.numel()

    def plain(ids):
        with torch.inference_mode():
            return lm.model(ids, output_hidden_states=True).hidden_states[layer + 1]

    def plain_ce(ids):
        with torch.inference_mode():
            logits = lm.model(ids).logits
            return F.cross_entropy(
                logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
            )

    rows = {
        "plain forward (hidden states)": timed(plain, batches),
        f"ours, early exit at {hook}": timed(
            lambda b: forward_capture(lm, b, [hook], False), batches
        ),
        "plain forward + per-token CE": timed(plain_ce, batches),
        "ours with per-token loss": timed(lambda b: forward_capture(lm, b, [hook], True), batches),
    }
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(model=ModelConfig(name=args.model), corpus=corpus, hooks=(hook,),
                            batch_size=args.batch_size, with_loss=False,
                            contexts_per_shard=args.batch_size * 2)
        t = time.perf_counter()
        harvest(cfg, f"{tmp}/store", lm=lm, progress=False)
        rows["harvest() loop, no loss, store writes included"] = time.perf_counter() - t

    base = rows["plain forward (hidden states)"]
    base_ce = rows["plain forward + per-token CE"]
    print(f"model {lm.name}, {n_tok:,} tokens per measurement, {torch.get_num_threads()} threads")
    for name, sec in rows.items():
        ref = base_ce if "CE" in name or "loss" in name and "no loss" not in name else base
        print(f"{name:48s} {n_tok / sec:9,.0f} tok/s   x{ref / sec:5.2f} vs plain")


if __name__ == "__main__":
    main()
