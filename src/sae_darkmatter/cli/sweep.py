"""``darkmatter sweep``: the whole pipeline once per value of one setting, and one report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from sae_darkmatter.cli.common import (
    Arch,
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
    build_config,
    main,
    show,
)
from sae_darkmatter.config import RunConfig
from sae_darkmatter.errors import DarkMatterError


@app.command()
def sweep(
    over: Annotated[
        str | None,
        typer.Option(
            help="The setting and its values, axis=v1,v2,...: layer, protocol, train_tokens, "
                 "context_length, n_contexts or a dotted config path (train.lr=1e-3,3e-3); "
                 "default: the --config file's \\[sweep] table."
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Sweep folder: one run folder per value.")
    ] = Path("sweep_out"),
    quick: Annotated[
        bool, typer.Option(help="Each run on less data, as `run --quick`.")
    ] = False,
    protocol: Annotated[
        str, typer.Option(help="Protocol of every run ('default' or 'paper'), as in `run`.")
    ] = "default",
    config: Annotated[
        Path | None,
        typer.Option(help="TOML run config (\\[harvest], \\[train], ... as in `run`), with "
                          "an optional \\[sweep] table: over = \"layer\", values = \\[5, 10]."),
    ] = None,
    sae: SaeSpecs = None,
    model: Model = None,
    hook: Annotated[
        str | None,
        typer.Option(help="Hook point; a layer sweep keeps its kind and sets its layer."),
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
) -> None:
    """Run the pipeline once per value of one setting into OUT/<axis>=<value>/ (each cached \
and resumable like `run`), then write OUT/report.html and OUT/sweep.json comparing them."""
    from sae_darkmatter import presets
    from sae_darkmatter.sweep import PROTOCOL, load_sweep_toml, parse_over, run_sweep

    flags: dict[str, Any] = dict(
        model=model, hook=hook, corpus=corpus, n_contexts=n_contexts,
        context_length=context_length, loss=loss, device=device, dtype=dtype, widths=widths, k=k,
        train_tokens=train_tokens, seed=seed, skip_positions=skip_positions,
        max_norm_ratio=max_norm_ratio, saes=sae, architecture=architecture,
        prepend_bos=prepend_bos, gemm_dtype=gemm_dtype, until=until,
    )

    def body() -> None:
        file_cfg, table = load_sweep_toml(config) if config else (RunConfig(), None)
        plan = parse_over(over) if over else table
        if plan is None or not plan.over:
            raise DarkMatterError("nothing to sweep: give --over axis=v1,v2,... (e.g. "
                                  "layer=5,10,15) or a [sweep] table in the --config file")
        protocols = {str(v) for v in plan.values} if plan.over == PROTOCOL else {protocol}
        if plan.over == PROTOCOL and protocol != "default":
            raise DarkMatterError(f"--protocol {protocol} and a sweep over protocols cannot be "
                                  "combined: the sweep chooses each run's protocol")
        if quick and protocols != {"default"}:
            raise DarkMatterError("--quick cannot be combined with the paper's protocol: the "
                                  "protocol fixes the amount of data")

        def configure(name: str) -> RunConfig:  # the protocol first, then flags, then --quick
            cfg = build_config(file_cfg, protocol=name, **flags)
            return presets.quick(cfg) if quick else cfg

        summary = run_sweep(plan, configure(protocol), out, protocol_base=configure)
        if summary:  # {} on the ranks other than 0 under torchrun
            show(_summary_table(summary))
            show(f"sweep report: {out / 'report.html'}")

    main(body)


def _summary_table(summary: dict[str, Any]) -> Table:
    """One row per value: hook, SAEs, ranges of the main metrics, verdicts, seconds."""
    table = Table(title=f"sweep over {summary['over']} (held-out; ranges over each run's SAEs)",
                  caption="claims: agree / disagree / inconclusive (report.html: which)",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("value", overflow="fold")
    table.add_column("hook", overflow="fold", min_width=12)
    for col in ("SAEs", "FVU", "FVU nonlin", "R² ‖e‖²", "claims", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    for p in summary["points"]:
        def span(key: str, p: dict[str, Any] = p) -> str:
            vals = [s[key] for s in p["saes"] if s.get(key) is not None]
            return "–" if not vals else f"{min(vals):.3f}" + (
                f"–{max(vals):.3f}" if max(vals) > min(vals) else "")
        verdicts = [c["verdict"] for c in p["claims"]]
        table.add_row(str(p["value"]), str(p["hook"]), str(len(p["saes"])), span("fvu"),
                      span("fvu_nonlinear"), span("r2_error_norm"),
                      "/".join(str(verdicts.count(v))
                               for v in ("agrees", "disagrees", "inconclusive")),
                      f"{sum(p['timings_s'].values()):,.1f}")
    return table
