"""The pipeline's commands: ``run`` it whole, or each stage alone (``harvest`` ... ``report``,
``stream``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sae_darkmatter.analyses.registry import NAMES as ANALYSES
from sae_darkmatter.cli.common import (
    Arch,
    ConfigFile,
    Corpus,
    CtxLen,
    Device,
    Dtype,
    GemmDtype,
    Ks,
    Loss,
    MaxNorm,
    Model,
    NContexts,
    PrependBos,
    SaeSpecs,
    Seed,
    Skip,
    TrainTokens,
    Until,
    Widths,
    app,
    bos_value,
    build_config,
    console,
    given,
    grid_config,
    main,
    sae_summary,
    show,
    split_config,
    timings_summary,
)
from sae_darkmatter.config import (
    HarvestConfig,
    SAETrainConfig,
    SplitConfig,
    load_toml,
)
from sae_darkmatter.errors import DarkMatterError


@app.command()
def run(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder (reused and resumed).")
    ] = Path("darkmatter_out"),
    quick: Annotated[
        bool, typer.Option(help="Same pipeline on less data (a few minutes on a CPU).")
    ] = False,
    protocol: Annotated[
        str,
        typer.Option(
            help="'paper': Engels et al.'s protocol (1,024-token contexts, positions 200..1022, "
                 "150k probe-train tokens; README); other flags still apply."
        ),
    ] = "default",
    config: ConfigFile = None,
    sae: SaeSpecs = None,
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
    loss: Loss = None,
    architecture: Arch = None,
    widths: Widths = None,
    k: Ks = None,
    train_tokens: TrainTokens = None,
    until: Until = None,
    skip_positions: Skip = None,
    max_norm_ratio: MaxNorm = None,
    seed: Seed = None,
    device: Device = None,
    dtype: Dtype = None,
    gemm_dtype: GemmDtype = None,
    transcoders: Annotated[
        bool | None,
        typer.Option(
            "--transcoders/--no-transcoders",
            help="Also train transcoders and skip transcoders of the target layer's MLP "
                 "(mlp_in.L -> mlp_out.L; widths and k from [transcoders.train]) and decompose "
                 "them beside the SAEs ([transcoders] enabled).",
        ),
    ] = None,
) -> None:
    """Run the whole pipeline: harvest -> train SAEs (or load --sae ones) -> decompose their \
error -> report."""
    from sae_darkmatter import pipeline, presets

    def body() -> None:
        if quick and protocol != "default":
            raise DarkMatterError(f"--quick and --protocol {protocol} cannot be combined: the "
                                  "protocol fixes the amount of data")
        cfg = build_config(
            config,
            model=model,
            hook=hook,
            corpus=corpus,
            n_contexts=n_contexts,
            context_length=context_length,
            loss=loss,
            device=device,
            dtype=dtype,
            widths=widths,
            k=k,
            train_tokens=train_tokens,
            seed=seed,
            skip_positions=skip_positions,
            max_norm_ratio=max_norm_ratio,
            saes=sae,
            architecture=architecture,
            protocol=protocol,
            prepend_bos=prepend_bos,
            gemm_dtype=gemm_dtype,
            until=until,
            transcoders=transcoders,
        )
        if quick:
            cfg = presets.quick(cfg)
        metrics = pipeline.run(cfg, out)
        if metrics:  # {} on the ranks other than 0 under torchrun
            show(sae_summary(metrics))
            show(timings_summary(metrics))
            show(f"report: {out / 'report.html'}")

    main(body)


@app.command("harvest")
def harvest_cmd(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Store folder (resumed if it exists).")
    ] = Path("darkmatter_out/store"),
    model: Model = None,
    hook: Annotated[
        list[str] | None,
        typer.Option(help="Hook point(s), repeatable: resid_post.L, mlp_out.L, attn_out.L, "
                          "mlp_in.L."),
    ] = None,
    corpus: Corpus = None,
    n_contexts: NContexts = None,
    context_length: CtxLen = None,
    prepend_bos: PrependBos = None,
    batch_size: Annotated[int | None, typer.Option(help="Contexts per forward pass.")] = None,
    contexts_per_shard: Annotated[
        int | None,
        typer.Option(help="Contexts per committed shard (a multiple of the batch size)."),
    ] = None,
    loss: Loss = None,
    dtype: Dtype = None,
    seed: Seed = None,
    device: Device = None,
) -> None:
    """Harvest activations (and per-token loss) of a causal LM into an activation store."""
    from sae_darkmatter.harvest import harvest

    def body() -> None:
        base = HarvestConfig()
        cfg = given(
            base,
            model=given(base.model, name=model, dtype=dtype, device=device),
            corpus=given(base.corpus, source=corpus, n_contexts=n_contexts,
                         context_length=context_length, seed=seed,
                         prepend_bos=bos_value(prepend_bos)),
            hooks=tuple(hook) if hook else None,
            batch_size=batch_size,
            contexts_per_shard=contexts_per_shard,
            with_loss=loss,
        )
        store = harvest(cfg, out)
        show(f"store: {out} ({store.n_rows:,} tokens; hooks {', '.join(store.hooks)})")

    main(body)


@app.command()
def train(
    store: Annotated[Path, typer.Option(help="Activation store folder.")] = Path(
        "darkmatter_out/store"
    ),
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the SAE folders.")] = Path(
        "darkmatter_out/saes"
    ),
    hook: Annotated[
        str | None, typer.Option(help="Stored hook to train on (default: the first).")
    ] = None,
    architecture: Arch = None,
    widths: Widths = None,
    k: Ks = None,
    train_tokens: TrainTokens = None,
    until: Until = None,
    lr: Annotated[
        float | None, typer.Option(help="Adam learning rate (default: scaled by width).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Tokens per step.")] = None,
    skip_positions: Skip = None,
    max_norm_ratio: MaxNorm = None,
    seed: Seed = None,
    device: Device = None,
) -> None:
    """Train a width × sparsity grid of SAEs in one pass over a store's SAE-training split \
(SAELens format)."""
    from sae_darkmatter.pipeline import train_saes
    from sae_darkmatter.splits import make_splits
    from sae_darkmatter.store import ActivationStore

    def body() -> None:
        split = split_config(SplitConfig(), seed, skip_positions, max_norm_ratio)
        cfg = grid_config(SAETrainConfig(), architecture, widths, k, train_tokens=train_tokens,
                          lr=lr, batch_size=batch_size, seed=seed, device=device, until=until)
        st = ActivationStore.open(store)
        dirs = train_saes(st, make_splits(st, split, hook=hook), cfg, out, hook=hook)
        table = Table(
            title=f"SAEs in {out} (scores on up to 16k training rows; curves in training.json)"
        )
        for col in ("SAE", "FVU", "L0", "dead latents", "tokens", "last doubling", "tok/s"):
            table.add_column(col, justify="right")
        for d in dirs:
            t = json.loads((d / "training.json").read_text())
            gain = t["schedule"]["doubling_gain"]
            table.add_row(d.name, f"{t['final_train_fvu']:.4f}", f"{t['final_train_l0']:.1f}",
                          f"{t['dead_latents']:,} ({100 * t['dead_fraction']:.1f} %)",
                          f"{t['tokens_seen']:,} ({t['schedule']['stopped']})",
                          "–" if gain is None else f"FVU {-100 * gain:+.1f} %",
                          f"{t['tokens_per_second']:,.0f}")
        show(table)

    main(body)


@app.command()
def analyze(
    run_dir: Annotated[
        Path, typer.Argument(help="Run folder with store/, saes/ and decompose/.")
    ] = Path("darkmatter_out"),
    only: Annotated[
        str | None,
        typer.Option(
            help=f"Comma-separated subset of: {', '.join(ANALYSES)}."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML run config (default: the run's run_config.json)."),
    ] = None,
    model: Model = None,
    seed: Seed = None,
) -> None:
    """Every analysis the run's config enables (or --only some); then the report."""
    from sae_darkmatter.analyses import run_analyses
    from sae_darkmatter.models import load_tokenizer
    from sae_darkmatter.report import write_report
    from sae_darkmatter.run_dir import RunDir

    def body() -> None:
        run = RunDir(run_dir)
        cfg = load_toml(config) if config else run.config
        cfg = given(cfg, split=given(cfg.split, seed=seed))
        name = model or run.model.name
        try:
            run.tokenizer = load_tokenizer(dataclasses.replace(cfg.harvest.model, name=name))
        except DarkMatterError as err:
            console.print(f"[yellow]token texts unavailable[/] ({err}); showing token ids")
            run.tokenizer = None
        chosen = tuple(x.strip() for x in only.split(",")) if only else None
        with run.lock():  # one writer per run folder, as in `run`
            run.remove_stale_temps()
            run_analyses(run, only=chosen, cfg=cfg)
            show(f"report: {write_report(run)}")

    main(body, one_process=True)


@app.command("report")
def report_cmd(
    decompose_dir: Annotated[Path, typer.Argument(help="Folder of decomposition results.")] = Path(
        "darkmatter_out/decompose"
    ),
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Report folder (default: the results' parent)."),
    ] = None,
) -> None:
    """Write report.html, metrics.json and figures from decomposition results."""
    from sae_darkmatter.report import write_report

    main(
        lambda: show(f"report: {write_report(decompose_dir, out or decompose_dir.parent)}"),
        one_process=True,
    )
