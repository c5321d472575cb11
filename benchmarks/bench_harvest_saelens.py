"""Harvest throughput vs SAELens's activation store on the same model, hook and token batches.

Both sides run the same float32 model (two copies loaded by our loader, so SAELens's permanent
forward hook is not on the model we time) over the same pre-tokenized batches from our corpus,
capturing the residual stream after the middle decoder layer (our ``resid_post.L`` is the output
of the HF module ``model.layers.L``, which is SAELens's hook name for it):

  ours:                 forward_capture(lm, ids, [hook], with_loss=False)
                        (a forward hook raises after layer L, so later layers never run)
  SAELens store:        ActivationsStore.get_activations(ids) on a HookedProxyLM; it passes
                        stop_at_layer=L+1 (parsed from the hook name), so HookedProxyLM also
                        stops after layer L with an exception from a forward hook
  SAELens store+data:   ActivationsStore.get_raw_llm_batch(): the same, with the batch drawn
                        from the store's in-memory datasets.Dataset of the same token ids
  SAELens full forward: HookedProxyLM.run_with_cache(ids, names_filter=[hook]) without
                        stop_at_layer (every layer and the logits run)

The first batch is checked to give the same activations on every path (this is also each path's
warm-up), then each path makes ``--repeats`` passes over all batches, the paths taking turns
batch by batch in rotating order so that load from other jobs falls on all alike. Printed per
path: tokens/s and the ratio ours/this from each batch's fastest of the passes (other jobs only
ever slow a call down, so the fastest is the least disturbed), and the median and range over all
calls of (this path's time / ours) on the same batch, run back to back.
(``bench_harvest.py`` times the whole ``harvest()`` loop, store writes included.) Nothing is
downloaded:

    HF_HUB_OFFLINE=1 python benchmarks/bench_harvest_saelens.py [--model smollm2] [--batches 6]
        [--batch-size 16] [--context-length 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from datasets import Dataset
from sae_lens.load_model import HookedProxyLM
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

from sae_darkmatter import CorpusConfig, ModelConfig, load_model
from sae_darkmatter.contexts import build_contexts
from sae_darkmatter.models import (
    LoadedModel,
    default_hook,
    forward_capture,
    hook_module,
)

# Both sides run identical float32 kernels on identical weights and ids, so they should agree
# bit for bit; 1e-5 of the activations' scale allows a few ulps of reordering over 16 layers
# while a wrong layer or position would differ by O(1).
REL_TOL = 1e-5


def module_name(lm: LoadedModel, hook: str) -> str:
    """The HF module path (SAELens's hook name) of our hook ``hook``."""
    target = hook_module(lm.model, hook)
    return next(name for name, m in lm.model.named_modules() if m is target)


def make_store(proxy: HookedProxyLM, name: str, ctx: torch.Tensor, batch_size: int, d_in: int
               ) -> ActivationsStore:
    """An ActivationsStore reading ``ctx`` (pre-tokenized, in order) from an in-memory Dataset."""
    return ActivationsStore(
        model=proxy,
        dataset=Dataset.from_dict({"tokens": ctx.tolist()}),
        streaming=False,
        hook_name=name,
        hook_head_index=None,
        context_size=ctx.shape[1],
        d_in=d_in,
        n_batches_in_buffer=2,
        total_training_tokens=ctx.shape[0],  # only compared with the row count, to warn
        store_batch_size_prompts=batch_size,
        train_batch_size_tokens=batch_size * ctx.shape[1],
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )


def check_same(name: str, ref: torch.Tensor, other: torch.Tensor) -> None:
    diff = (ref - other).abs().max().item()
    rel = diff / ref.abs().max().item()
    print(f"  {name:22s} max |diff| {diff:.3g}  relative {rel:.3g}")
    assert other.shape == ref.shape and rel <= REL_TOL, f"{name} disagrees with ours"


def time_steps(paths: dict[str, Callable[[torch.Tensor], object]], batches: list[torch.Tensor],
               repeats: int) -> dict[str, torch.Tensor]:
    """Seconds [repeats, batches] of each path on each batch.

    The paths take turns batch by batch, in an order rotated at every batch, so the calls on one
    batch run back to back and load from other jobs on a shared machine falls on all alike.
    """
    names = list(paths)
    secs = {name: torch.zeros(repeats, len(batches), dtype=torch.float64) for name in names}
    for r in range(repeats):
        for i, b in enumerate(batches):
            shift = (r * len(batches) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                t = time.perf_counter()
                paths[name](b)
                secs[name][r, i] = time.perf_counter() - t
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    lm = load_model(ModelConfig(name=args.model))
    theirs = load_model(ModelConfig(name=args.model))
    hook = default_hook(lm.model)
    name = module_name(theirs, hook)
    proxy = HookedProxyLM(theirs.model, theirs.tokenizer, hook_names=[name])
    corpus = CorpusConfig(
        n_contexts=args.batches * args.batch_size, context_length=args.context_length
    )
    ctx = torch.from_numpy(build_contexts(corpus, lm.tokenizer))
    batches = list(ctx.split(args.batch_size))
    store = make_store(proxy, name, ctx, args.batch_size, theirs.d_model)
    stop = extract_stop_at_layer_from_tlens_hook_name(name)  # what get_activations passes

    def ours(ids: torch.Tensor) -> torch.Tensor:
        return forward_capture(lm, ids, [hook], with_loss=False)[0][hook]

    def full(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return proxy.run_with_cache(ids, names_filter=[name])[1][name]

    paths: dict[str, Callable[[torch.Tensor], object]] = {
        f"ours, early exit at {hook}": ours,
        f"SAELens store, stop_at_layer={stop}": store.get_activations,
        "SAELens store + its Dataset batches": lambda _ids: store.get_raw_llm_batch(),
        "SAELens run_with_cache, full forward": full,
    }

    # First batch on every path: the agreement check, and each path's warm-up.
    ref = ours(batches[0])
    raw, raw_ids = store.get_raw_llm_batch()  # draws the Dataset's first batch
    assert torch.equal(raw_ids, batches[0].flatten()), "the store read other tokens"
    print(
        f"activations at {hook} = SAELens hook {name!r}, first batch {tuple(ref.shape)}, vs ours:"
    )
    check_same("store.get_activations", ref, store.get_activations(batches[0]))
    check_same("store.get_raw_llm_batch", ref, raw.view_as(ref))
    check_same("run_with_cache (full)", ref, full(batches[0]))

    secs = time_steps(paths, batches, args.repeats)
    n_tok = ctx.numel()
    base = secs[f"ours, early exit at {hook}"]
    print(f"model {lm.name}, {len(batches)} batches x {args.batch_size} x {args.context_length} = "
          f"{n_tok:,} tokens per pass, {args.repeats} passes, {torch.get_num_threads()} threads")
    print(f"{'':46s} {'best tok/s':>10s} {'ours/this':>9s}   per batch: median (min-max)")
    best_base = base.min(0).values.sum()
    for k, sec in secs.items():
        best = sec.min(0).values.sum()  # each batch's fastest pass: the least disturbed
        ratio = (sec / base).flatten()
        print(f"{k:46s} {n_tok / best:10,.0f} {best / best_base:8.2f}x   "
              f"{ratio.median():.2f}x ({ratio.min():.2f}-{ratio.max():.2f})")

if __name__ == "__main__":
    main()
