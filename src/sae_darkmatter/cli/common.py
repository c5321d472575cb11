"""What the commands share: the typer app, option declarations, config building, error handling."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from sae_darkmatter import distributed
from sae_darkmatter.config import (
    RunConfig,
    SAETrainConfig,
    SplitConfig,
    load_toml,
)
from sae_darkmatter.errors import DarkMatterError

app = typer.Typer(
    help="Measure and decompose the dark matter (reconstruction error) of sparse autoencoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

# Shared option declarations (None = keep the config's value).
Model = Annotated[
    str | None,
    typer.Option(
        help="'smollm2' (embedded), HF model id, local folder or .gguf file (default: the one "
             "--sae names, else smollm2)."
    ),
]
SaeSpecs = Annotated[
    list[str] | None,
    typer.Option(
        "--sae",
        help="Pretrained SAE, repeatable: 'saelens:<release>/<sae_id>' or a SAELens / sparsify / "
             "dictionary_learning folder.",
    ),
]
Corpus = Annotated[
    str | None,
    typer.Option(
        help="'stdlib', a .txt/.jsonl/.parquet file or folder, or 'hf:<dataset>[:<config>]'."
    ),
]
NContexts = Annotated[int | None, typer.Option(help="Number of contexts to harvest.")]
CtxLen = Annotated[int | None, typer.Option(help="Tokens per context.")]
Loss = Annotated[
    bool | None,
    typer.Option(
        "--loss/--no-loss",
        help="Also store the per-token LM loss (off by default). It costs the full forward "
        "pass and the vocabulary head (2.5x the harvest time on SmolLM2 layer 15); without it "
        "the forward stops after the deepest hook. Downstream does not need it: it recomputes "
        "the clean loss of the contexts it splices.",
    ),
]
Device = Annotated[str | None, typer.Option(help="'auto' (CUDA if present), 'cpu', 'cuda:0', ...")]
Widths = Annotated[
    str | None, typer.Option(help="Comma-separated SAE widths, e.g. 1024,2048,4096.")
]
Ks = Annotated[
    str | None,
    typer.Option(
        "--k",
        help="Comma-separated sparsities: k (active latents per token) for topk/batchtopk, e.g. "
             "16,32,64; the L1 (relu) or L0 (jumprelu) coefficients otherwise.",
    ),
]
Arch = Annotated[
    str | None,
    typer.Option(
        "--architecture", help="SAE architecture to train: topk, batchtopk, relu (L1) or jumprelu."
    ),
]
TrainTokens = Annotated[
    int | None, typer.Option(help="Training tokens per SAE (epochs repeat the data).")
]
Until = Annotated[
    str | None,
    typer.Option(help="'tokens': train --train-tokens; 'plateau': until a doubling of tokens "
                      "lowers the held-out FVU by < 1 % ([train] plateau_tolerance), "
                      "--train-tokens the cap."),
]
Seed = Annotated[int | None, typer.Option(help="Seed for corpus shuffling, splits and training.")]
Skip = Annotated[
    int | None, typer.Option(help="Leading positions of each context excluded from statistics.")
]
MaxNorm = Annotated[
    float | None,
    typer.Option(
        help="Exclude tokens whose norm exceeds this multiple of the median (attention sinks); 0 "
             "keeps all."
    ),
]
GemmDtype = Annotated[
    str | None,
    typer.Option(
        help="Block products of the probe fit: float32 (default; float64 sums, held-out metrics "
             "within 1e-6 of float64 on SmolLM2, falls back when ill-conditioned) or float64.",
    ),
]
Dtype = Annotated[
    str | None,
    typer.Option(
        help="LM dtype: float32, bfloat16, float16 (SAEs run in their stored dtype; statistics are "
             "float64)."
    ),
]
PrependBos = Annotated[
    str | None,
    typer.Option(
        help="Start every context with the BOS token: auto (when the model's tokenizer adds one), "
             "true or false."
    ),
]
ConfigFile = Annotated[  # brackets escaped: rich reads [name] as markup and drops it
    Path | None,
    typer.Option(
        "--config", help="TOML file with \\[harvest], \\[split], \\[train], \\[decompose], ... "
                         "tables."
    ),
]


def given(obj: Any, **values: Any) -> Any:
    """dataclasses.replace with the values that were actually given."""
    given = {k: v for k, v in values.items() if v is not None}
    return dataclasses.replace(obj, **given) if given else obj


def split_config(cfg: SplitConfig, seed: int | None, skip_positions: int | None,
           max_norm_ratio: float | None) -> SplitConfig:
    filt = given(cfg.filter, skip_positions=skip_positions)
    if max_norm_ratio is not None:  # 0 turns the norm filter off
        filt = dataclasses.replace(filt, max_norm_ratio=max_norm_ratio or None)
    return given(cfg, seed=seed, filter=filt)


def int_list(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None


def prefix_request(prefixes: str | None, latent_order: str | None, out: Path | None, *,
                   transcoder: bool) -> tuple[Any, tuple[int, ...] | None, Path]:
    """``decompose --prefixes``: (latent order, widths or None for the defaults, results
    folder), after refusing combinations that do not apply and unknown orders."""
    from sae_darkmatter.decompose import ORDERS

    if prefixes and transcoder:
        raise DarkMatterError("--prefixes applies to --sae only (transcoders' prefixes are not "
                              "decomposed)")
    if latent_order is not None and not prefixes:
        raise DarkMatterError("--latent-order orders the latents of --prefixes; give --prefixes")
    if latent_order is not None and latent_order not in ORDERS:
        raise DarkMatterError(f"--latent-order must be one of {', '.join(ORDERS)}, got "
                              f"{latent_order!r}")
    widths = None if prefixes in (None, "auto") else int_list(prefixes, "--prefixes")
    folder = out or Path("darkmatter_out/prefixes" if prefixes else "darkmatter_out/decompose")
    return latent_order or "stored", widths, folder


def grid_config(cfg: SAETrainConfig, architecture: str | None, widths: str | None,
          k: str | None, **values: Any) -> SAETrainConfig:
    """The training grid with command-line overrides; ``--k`` fills the architecture's axis."""
    cfg = given(cfg, architecture=architecture, widths=int_list(widths, "widths"), **values)
    if k is None:
        return cfg
    if cfg.sparsity_field() == "ks":
        return dataclasses.replace(cfg, ks=int_list(k, "k"))
    try:
        coefs = tuple(float(w) for w in k.split(",") if w.strip())
    except ValueError:
        raise typer.BadParameter(f"--k must be comma-separated numbers, got {k!r}") from None
    return dataclasses.replace(cfg, **{cfg.sparsity_field(): coefs})


def build_config(
    config: Path | RunConfig | None, *, model=None, hook=None, corpus=None, n_contexts=None,
    context_length=None, loss=None, device=None, dtype=None, widths=None, k=None, train_tokens=None,
    seed=None, skip_positions=None, max_norm_ratio=None, saes=None, architecture=None,
    protocol="default", prepend_bos=None, gemm_dtype=None, until=None, transcoders=None,
) -> RunConfig:
    """The run's config: the TOML file (or a config read already, or defaults), then the
    protocol's settings, then flags."""
    from sae_darkmatter.presets import protocol as apply_protocol

    cfg = config if isinstance(config, RunConfig) else load_toml(config) if config else RunConfig()
    cfg = apply_protocol(protocol, given(cfg, saes=tuple(saes) if saes else None))
    h = cfg.harvest
    harvest = given(
        h,
        model=given(h.model, name=model, device=device, dtype=dtype),
        corpus=given(h.corpus, source=corpus, n_contexts=n_contexts,
                    context_length=context_length, seed=seed, prepend_bos=bos_value(prepend_bos)),
        hooks=(hook,) if hook else None,
        with_loss=loss,
    )
    split = split_config(cfg.split, seed, skip_positions, max_norm_ratio)
    train = grid_config(cfg.train, architecture, widths, k, train_tokens=train_tokens, seed=seed,
                  device=device, until=until)
    return given(cfg, harvest=harvest, split=split, train=train,
                decompose=given(cfg.decompose, device=device, gemm_dtype=gemm_dtype),
                cross_layer=given(cfg.cross_layer, device=device),
                error_saes=given(cfg.error_saes, train=given(cfg.error_saes.train, device=device)),
                transcoders=given(cfg.transcoders, enabled=transcoders,
                                  train=given(cfg.transcoders.train, device=device)))


def bos_value(value: str | None) -> bool | str | None:
    """``--prepend-bos auto|true|false`` as the config's value."""
    if value is None or value == "auto":
        return value
    if value in ("true", "false"):
        return value == "true"
    raise typer.BadParameter(f"--prepend-bos must be auto, true or false, got {value!r}")


def show(*items: Any) -> None:
    """Print a command's results (under torchrun: rank 0 only)."""
    if distributed.is_main():
        Console().print(*items)


def main(fn: Any, *, one_process: bool = False) -> Any:
    """Run a command body; print library errors plainly and exit non-zero.

    Under torchrun the ranks share the work of distributed stages; a ``one_process`` command
    runs on rank 0 alone (the other ranks return at once).
    """
    logging.basicConfig(
        level=logging.INFO, format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if distributed.init() and not distributed.is_main():
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports progress for all
        if not one_process:
            result = fn()
        elif distributed.is_main():
            with distributed.local():
                result = fn()
        else:
            result = None
        distributed.shutdown()
        return result
    except DarkMatterError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted[/]: committed work is kept; rerun the same command to resume"
        )
        raise typer.Exit(130) from None


def sae_summary(metrics: dict[str, Any]) -> Table:
    """The held-out metrics of each SAE, readable in an 80-column terminal: numbers never
    shrink to ``…``; a long SAE name wraps instead (widths and k sit in trained SAEs' names)."""
    from sae_darkmatter.report import display_name

    model = display_name(metrics.get("model"))
    table = Table(
        title=f"SAE dark matter: {model} @ {metrics.get('hook')} (held-out)",
        caption="FVU = linear + nonlinear; share: linear share of the error; R² e, R² ‖e‖²: "
        "error probe (mean over dims) and norm probe",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    cols = [
        ("width", "d_sae", "{:,}"),
        ("L0", "l0", "{:.1f}"),
        ("FVU", "fvu", "{:.4f}"),
        ("linear", "fvu_linear", "{:.4f}"),
        ("nonlin", "fvu_nonlinear", "{:.4f}"),
        ("share", "linear_share", "{:.3f}"),
        ("R² e", "r2_error_mean_dim", "{:.3f}"),
        ("R² ‖e‖²", "r2_error_norm", "{:.3f}"),
    ]
    table.add_column("SAE", overflow="fold", min_width=14)
    for title, _, _ in cols:
        table.add_column(title, justify="right", no_wrap=True, min_width=len(title))
    for s in metrics["saes"]:
        table.add_row(str(s.get("name")), *(_fmt(fmt, s.get(key)) for _, key, fmt in cols))
    return table


def timings_summary(metrics: dict[str, Any]) -> Table:
    """Seconds per stage of this run (``metrics["timings_s"]``), each analysis under its stage;
    analyses whose cached result was reused say so."""
    table = Table(title="time per stage (s)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("stage")
    table.add_column("seconds", justify="right", no_wrap=True)
    timings = metrics.get("timings_s", {})
    for stage, seconds in timings.items():
        table.add_row(stage, f"{seconds:,.1f}")
        if stage == "analyses":
            for name, result in metrics.get("analyses", {}).items():
                if not isinstance(result, dict) or "seconds" not in result:
                    continue
                shown = "reused" if result.get("reused") else f"{result['seconds']:,.1f}"
                table.add_row(f"  {name}" + (" (skipped)" if "skipped" in result else ""), shown)
    table.add_row("total", f"{sum(timings.values()):,.1f}", style="bold")
    return table


def skip_summary(name: str, metrics: dict[str, Any]) -> str:
    """One line on what a skip transcoder's skip term absorbs (``metrics["skip"]``)."""
    skip = metrics["skip"]
    without = skip["without_skip"]
    lo, hi = skip["ci"].get("fvu_absorbed", (None, None))
    ci = "" if lo is None else f" [95 % CI {lo:.4f}, {hi:.4f}]"
    return (f"{name}: its skip term absorbs FVU {skip['fvu_absorbed']:.4f}{ci} of linear dark "
            f"matter, {_fmt('{:.1%}', skip['absorbed_share'])} of the "
            f"{without['fvu_linear']:.4f} left without it (FVU without it "
            f"{without['fvu']:.4f}; nonlinear {without['fvu_nonlinear']:.4f}, unchanged)")


def _fmt(fmt: str, value: Any) -> str:
    return "–" if value is None else fmt.format(value)
