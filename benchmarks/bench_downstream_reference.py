"""What downstream's recomputed clean loss adds to the splice, for a store harvested without loss.

On the embedded SmolLM2 (or --model) at its middle residual stream, with the default downstream
settings (8 contexts of 128 tokens, batches of 8, 6 SAEs as the default grid's "cross" selection
gives), times in one process:
  reference: ``downstream.reference_loss`` on a store without loss (the model's plain forward
             with the loss, and the activation check against the store);
  splice:    ``splice.splice_contexts`` over the same contexts (clean pass, 3 shared and 6 x 6
             per-SAE spliced forwards with CE/KL) with random TopK SAEs and probes (their values
             do not change the cost of a forward);
and prints reference / splice and the peak anonymous memory of each.

    python benchmarks/bench_downstream_reference.py [--model smollm2] [--contexts 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from _memory import PeakAnon
from sae_darkmatter import CorpusConfig, HarvestConfig, ModelConfig, harvest, load_model
from sae_darkmatter.analyses.downstream import reference_loss, store_contexts
from sae_darkmatter.analyses.splice import splice_contexts
from sae_darkmatter.linalg import LinearProbe
from sae_darkmatter.models import default_hook
from sae_darkmatter.saes import TopKSAE

# The default grid's "cross" selection: k = 32 at every width, and width 4,096 at every k.
SAES = ((512, 32), (1024, 32), (2048, 32), (4096, 32), (4096, 16), (4096, 64))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    lm = load_model(ModelConfig(name=args.model))
    hook = default_hook(lm.model)
    corpus = CorpusConfig(n_contexts=args.contexts, context_length=args.context_length)
    with tempfile.TemporaryDirectory() as tmp:
        store = harvest(HarvestConfig(model=ModelConfig(name=args.model), corpus=corpus,
                                      hooks=(hook,), batch_size=args.batch_size,
                                      contexts_per_shard=args.batch_size),
                        f"{tmp}/store", lm=lm, progress=False)
        tokens = store_contexts(store)
        chosen = np.arange(tokens.shape[0])
        with PeakAnon() as mem_ref:
            t = time.perf_counter()
            loss, check = reference_loss(store, lm, hook, tokens, chosen, args.batch_size)
            ref = time.perf_counter() - t
    assert check["reference"] == "recomputed"

    d = lm.d_model
    gen = torch.Generator().manual_seed(0)
    saes = {
        f"w{w}-k{k}": (TopKSAE(d, w, k, generator=gen),
                       LinearProbe(torch.randn(d, d, dtype=torch.float64, generator=gen) * 0.01,
                                   torch.zeros(d, dtype=torch.float64)))
        for w, k in SAES
    }
    spliced = np.ones(tokens.shape, bool)
    spliced[:, 0] = False  # skip_positions = 1
    with PeakAnon() as mem_splice:
        t = time.perf_counter()
        splice_contexts(lm, hook, tokens, chosen, spliced, saes, torch.zeros(d),
                        batch_size=args.batch_size, progress=False)
        splice = time.perf_counter() - t

    ref_mb, splice_mb = mem_ref.peak - mem_ref.base, mem_splice.peak - mem_splice.base
    print(f"model {lm.name} at {hook}: {tokens.shape[0]} contexts x {tokens.shape[1]} tokens, "
          f"{len(saes)} SAEs, {torch.get_num_threads()} threads")
    print(f"reference (recomputed clean loss) {ref:7.2f} s   peak +{ref_mb:,.0f} MB   "
          f"max activation difference {check['activations_vs_stored_max_rel']:.1e}")
    print(f"splice (clean + {3 + 6 * len(saes)} spliced)      {splice:7.2f} s   peak "
          f"+{splice_mb:,.0f} MB")
    print(f"reference / splice: {ref / splice:.3f}  "
          f"(downstream takes x{(ref + splice) / splice:.3f} with the recomputation)")

if __name__ == "__main__":
    main()
