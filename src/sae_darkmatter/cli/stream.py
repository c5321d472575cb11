"""``darkmatter stream``: pretrained SAEs decomposed straight from the LM, with no store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sae_darkmatter import distributed
from sae_darkmatter.cli.common import (
    Corpus,
    CtxLen,
    Device,
    Dtype,
    GemmDtype,
    MaxNorm,
    Model,
    NContexts,
    PrependBos,
    Seed,
    Skip,
    app,
    build_config,
    given,
    main,
    sae_summary,
    show,
)


@app.command("stream")
def stream_cmd(
    sae: Annotated[
        list[str],
        typer.Option(
            help="Pretrained SAE, repeatable: 'saelens:<release>/<sae_id>' or a SAELens / sparsify "
                 "/ dictionary_learning folder."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder for <sae>.json results and the checkpoint (rerun to resume).",
        ),
    ] = Path("darkmatter_stream"),
    model: Model = None,
    hook: Annotated[
        str | None,
        typer.Option(
            help="Hook point, e.g. resid_post.15 (default: the one --sae names, else the middle "
                 "layer)."
        ),
    ] = None,
    corpus: Corpus = None,
    n_contexts: NContexts = None,
    context_length: CtxLen = None,
    prepend_bos: PrependBos = None,
    batch_size: Annotated[int | None, typer.Option(help="Contexts per forward pass.")] = None,
    dtype: Dtype = None,
    device: Device = None,
    skip_positions: Skip = None,
    max_norm_ratio: MaxNorm = None,
    seed: Seed = None,
    gemm_dtype: GemmDtype = None,
    checkpoint_every: Annotated[int, typer.Option(help="Batches between checkpoints.")] = 25,
) -> None:
    """Decompose pretrained SAEs' error straight from the LM: no activation store, memory \
independent of the token count."""
    from sae_darkmatter.adopt import adopt_sae_metadata
    from sae_darkmatter.pipeline import open_saes
    from sae_darkmatter.stream import stream_decompose

    def body() -> None:
        loaded = open_saes(sae)
        cfg = adopt_sae_metadata(
            build_config(
                None,
                model=model,
                hook=hook,
                corpus=corpus,
                n_contexts=n_contexts,
                context_length=context_length,
                loss=False,
                device=device,
                dtype=dtype,
                seed=seed,
                skip_positions=skip_positions,
                max_norm_ratio=max_norm_ratio,
                prepend_bos=prepend_bos,
                gemm_dtype=gemm_dtype,
            ),
            loaded,
        )
        harvest = given(
            cfg.harvest, batch_size=batch_size, contexts_per_shard=batch_size
        )  # shards: unused
        results = stream_decompose(harvest, {n: s.sae for n, s in loaded.items()},
                                   cfg.split, cfg.decompose, checkpoint=out / "checkpoint",
                                   checkpoint_every=checkpoint_every)
        rows = []
        for name, r in results.items():
            prov = loaded[name].provenance
            if distributed.is_main():
                r.save(out, sae={**prov, "path": str(prov.get("source"))})
            rows.append({"name": name, "k": prov.get("k"), **r.metrics.to_dict()})
        first = next(iter(results.values()))
        show(sae_summary({"model": first.model, "hook": first.metrics.hook, "saes": rows}))
        show(
            f"{first.data['probe_train_tokens']:,} probe-train and "
            f"{first.data['probe_test_tokens']:,} held-out tokens; results in {out}"
        )

    main(body)
