"""``darkmatter decompose``: the error of stored SAEs, SAE prefixes or transcoders, split
into linear and nonlinear parts on held-out tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sae_darkmatter.cli.common import (
    Device,
    GemmDtype,
    MaxNorm,
    Seed,
    Skip,
    app,
    given,
    main,
    prefix_request,
    sae_summary,
    show,
    skip_summary,
    split_config,
)
from sae_darkmatter.config import DecomposeConfig, SplitConfig
from sae_darkmatter.errors import DarkMatterError


@app.command("decompose")
def decompose_cmd(
    sae: Annotated[
        list[str] | None,
        typer.Option(
            help="SAE, repeatable: 'saelens:<release>/<sae_id>' or a SAELens / sparsify / "
                 "dictionary_learning folder."
        ),
    ] = None,
    transcoder: Annotated[
        list[str] | None,
        typer.Option(
            help="Transcoder, repeatable (instead of --sae): 'saelens:<release>/<sae_id>' or a "
                 "SAELens / sparsify folder. Its error y - y_hat at the output hook is probed "
                 "from x at the input hook; the store must hold both."
        ),
    ] = None,
    prefixes: Annotated[
        str | None,
        typer.Option(help="Decompose each --sae cut to its first m latents, per width m: 'auto' "
                          "(a Matryoshka SAE's cfg.json widths, else W/16,W/8,W/4,W/2,W) or "
                          "widths, e.g. 256,1024. Results: <sae>__prefix<m>."),
    ] = None,
    latent_order: Annotated[
        str | None,
        typer.Option(help="With --prefixes, the latents' order: 'stored' (the SAE's own, right "
                          "for Matryoshka SAEs; default) or 'frequency' (most often firing on "
                          "the probe-train tokens first)."),
    ] = None,
    store: Annotated[Path, typer.Option(help="Activation store folder.")] = Path(
        "darkmatter_out/store"
    ),
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Folder for results (default: darkmatter_out/decompose; "
                                          "with --prefixes darkmatter_out/prefixes)."),
    ] = None,
    hook: Annotated[
        str | None,
        typer.Option(help="Stored hook (default: the first); with --transcoder, the hook whose "
                          "norms the outlier filter reads (default: each one's input hook)."),
    ] = None,
    hook_in: Annotated[
        str | None, typer.Option(help="Transcoders' input hook (default: their metadata's).")
    ] = None,
    hook_out: Annotated[
        str | None, typer.Option(help="Transcoders' output hook (default: their metadata's).")
    ] = None,
    skip_positions: Skip = None,
    max_norm_ratio: MaxNorm = None,
    ridge: Annotated[float | None, typer.Option(help="Ridge penalty of the probes.")] = None,
    bias: Annotated[
        bool | None, typer.Option("--bias/--no-bias", help="Bias column in the probes.")
    ] = None,
    seed: Seed = None,
    device: Device = None,
    gemm_dtype: GemmDtype = None,
) -> None:
    """Split each SAE's (or transcoder's) error into linear and nonlinear parts on held-out \
tokens."""
    from sae_darkmatter.pipeline import (
        decompose_sae_prefixes,
        decompose_saes,
        decompose_transcoder_specs,
    )
    from sae_darkmatter.splits import make_splits
    from sae_darkmatter.store import ActivationStore

    def body() -> None:
        if bool(sae) == bool(transcoder):
            raise DarkMatterError("give --sae or --transcoder (repeatable), not both: SAEs and "
                                  "transcoders are decomposed in separate calls")
        if sae and (hook_in or hook_out):
            raise DarkMatterError("--hook-in and --hook-out apply to --transcoder only")
        order, widths, folder = prefix_request(prefixes, latent_order, out,
                                               transcoder=bool(transcoder))
        split = split_config(SplitConfig(), seed, skip_positions, max_norm_ratio)
        cfg = given(DecomposeConfig(), ridge=ridge, bias=bias, device=device,
                    gemm_dtype=gemm_dtype)
        st = ActivationStore.open(store)
        if transcoder:
            results = decompose_transcoder_specs(
                st, make_splits(st, split, hook=hook) if hook else split, transcoder, cfg, folder,
                hook_in=hook_in, hook_out=hook_out)
        elif prefixes:
            rows = make_splits(st, split, hook=hook)  # every SAE's prefixes: one call each
            results = [r for spec in sae or [] for r in decompose_sae_prefixes(
                st, rows, spec, cfg, folder, widths=widths, order=order, hook=hook)]
        else:
            results = decompose_saes(st, make_splits(st, split, hook=hook), sae or [], cfg,
                                     folder, hook=hook)
        where = ", ".join(dict.fromkeys(
            m["hook"] + (f" -> {m['hook_out']}" if "hook_out" in m else "")
            for m in (r["metrics"] for r in results)))
        show(sae_summary({"model": results[0]["model"], "hook": where,
                       "saes": [{"name": r["name"], "k": r["sae"].get("k"), **r["metrics"]}
                                for r in results]}))
        for r in results:
            if r["metrics"].get("skip"):
                show(skip_summary(r["name"], r["metrics"]))

    main(body)
