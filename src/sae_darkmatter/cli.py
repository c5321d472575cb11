"""The ``darkmatter`` command line: ``run`` the whole pipeline or each stage alone."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from sae_darkmatter import __version__, distributed
from sae_darkmatter._io import limit_heap_growth, resolve_device
from sae_darkmatter.autointerp.cli import register as register_autointerp
from sae_darkmatter.config import (
    DecomposeConfig,
    HarvestConfig,
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
        help="'smollm2' (embedded), HF model id, local folder or .gguf file (default: the one --sae names, else smollm2)."
    ),
]
SaeSpecs = Annotated[
    list[str] | None,
    typer.Option(
        "--sae",
        help="Pretrained SAE, repeatable: 'saelens:<release>/<sae_id>' or a SAELens / sparsify / dictionary_learning folder.",
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
        help="Also store per-token LM loss (full forward; without it the forward stops early).",
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
        help="Comma-separated sparsities: k (active latents per token) for topk/batchtopk, e.g. 16,32,64; the L1 (relu) or L0 (jumprelu) coefficients otherwise.",
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
Seed = Annotated[int | None, typer.Option(help="Seed for corpus shuffling, splits and training.")]
Skip = Annotated[
    int | None, typer.Option(help="Leading positions of each context excluded from statistics.")
]
MaxNorm = Annotated[
    float | None,
    typer.Option(
        help="Exclude tokens whose norm exceeds this multiple of the median (attention sinks); 0 keeps all."
    ),
]
Dtype = Annotated[
    str | None,
    typer.Option(
        help="LM dtype: float32, bfloat16, float16 (SAEs run in their stored dtype; statistics are float64)."
    ),
]
PrependBos = Annotated[
    str | None,
    typer.Option(
        help="Start every context with the BOS token: auto (when the model's tokenizer adds one), true or false."
    ),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config", help="TOML file with [harvest], [split], [train], [decompose] tables."
    ),
]


def _set(obj: Any, **values: Any) -> Any:
    """dataclasses.replace with the values that were actually given."""
    given = {k: v for k, v in values.items() if v is not None}
    return dataclasses.replace(obj, **given) if given else obj


def _split(cfg: SplitConfig, seed: int | None, skip_positions: int | None,
           max_norm_ratio: float | None) -> SplitConfig:
    filt = _set(cfg.filter, skip_positions=skip_positions)
    if max_norm_ratio is not None:  # 0 turns the norm filter off
        filt = dataclasses.replace(filt, max_norm_ratio=max_norm_ratio or None)
    return _set(cfg, seed=seed, filter=filt)


def _ints(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None


def _grid(cfg: SAETrainConfig, architecture: str | None, widths: str | None,
          k: str | None, **values: Any) -> SAETrainConfig:
    """The training grid with command-line overrides; ``--k`` fills the architecture's axis."""
    cfg = _set(cfg, architecture=architecture, widths=_ints(widths, "widths"), **values)
    if k is None:
        return cfg
    if cfg.sparsity_field() == "ks":
        return dataclasses.replace(cfg, ks=_ints(k, "k"))
    try:
        coefs = tuple(float(w) for w in k.split(",") if w.strip())
    except ValueError:
        raise typer.BadParameter(f"--k must be comma-separated numbers, got {k!r}") from None
    return dataclasses.replace(cfg, **{cfg.sparsity_field(): coefs})


def _build_config(
    config: Path | None, *, model=None, hook=None, corpus=None, n_contexts=None,
    context_length=None, loss=None, device=None, dtype=None, widths=None, k=None, train_tokens=None,
    seed=None, skip_positions=None, max_norm_ratio=None, saes=None, architecture=None,
    protocol="default", prepend_bos=None,
) -> RunConfig:
    """The run's config: the TOML file (or defaults), then the protocol's settings, then flags."""
    from sae_darkmatter.presets import protocol as apply_protocol

    cfg = load_toml(config) if config else RunConfig()
    cfg = apply_protocol(protocol, _set(cfg, saes=tuple(saes) if saes else None))
    h = cfg.harvest
    harvest = _set(
        h,
        model=_set(h.model, name=model, device=device, dtype=dtype),
        corpus=_set(h.corpus, source=corpus, n_contexts=n_contexts,
                    context_length=context_length, seed=seed, prepend_bos=_bos(prepend_bos)),
        hooks=(hook,) if hook else None,
        with_loss=loss,
    )
    split = _split(cfg.split, seed, skip_positions, max_norm_ratio)
    train = _grid(cfg.train, architecture, widths, k, train_tokens=train_tokens, seed=seed,
                  device=device)
    return _set(cfg, harvest=harvest, split=split, train=train,
                decompose=_set(cfg.decompose, device=device),
                cross_layer=_set(cfg.cross_layer, device=device),
                error_saes=_set(cfg.error_saes, train=_set(cfg.error_saes.train, device=device)))


def _bos(value: str | None) -> bool | str | None:
    """``--prepend-bos auto|true|false`` as the config's value."""
    if value is None or value == "auto":
        return value
    if value in ("true", "false"):
        return value == "true"
    raise typer.BadParameter(f"--prepend-bos must be auto, true or false, got {value!r}")


def _out(*items: Any) -> None:
    """Print a command's results (under torchrun: rank 0 only)."""
    if distributed.is_main():
        Console().print(*items)


def _main(fn: Any, *, one_process: bool = False) -> Any:
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
    limit_heap_growth()
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


def _summary(metrics: dict[str, Any]) -> Table:
    from sae_darkmatter.report import display_name

    model = display_name(metrics.get("model"))
    table = Table(title=f"SAE dark matter: {model} @ {metrics.get('hook')} (held-out)")
    cols = [
        ("SAE", "name", "{}"),
        ("width", "d_sae", "{:,}"),
        ("k", "k", "{}"),
        ("L0", "l0", "{:.1f}"),
        ("FVU", "fvu", "{:.4f}"),
        ("linear", "fvu_linear", "{:.4f}"),
        ("nonlinear", "fvu_nonlinear", "{:.4f}"),
        ("lin. share", "linear_share", "{:.3f}"),
        ("R² e", "r2_error_mean_dim", "{:.3f}"),
        ("R² ‖e‖²", "r2_error_norm", "{:.3f}"),
    ]
    for title, _, _ in cols:
        table.add_column(title, justify="right")
    for s in metrics["saes"]:
        table.add_row(*(fmt.format(s.get(key)) for _, key, fmt in cols))
    return table


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
            help="'paper': Engels et al.'s protocol (1,024-token contexts, positions 200..1022, 150k probe-train tokens; README); other flags still apply."
        ),
    ] = "default",
    config: ConfigFile = None,
    sae: SaeSpecs = None,
    model: Model = None,
    hook: Annotated[
        str | None,
        typer.Option(
            help="Hook point, e.g. resid_post.15 (default: the one --sae names, else the middle layer)."
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
    skip_positions: Skip = None,
    max_norm_ratio: MaxNorm = None,
    seed: Seed = None,
    device: Device = None,
    dtype: Dtype = None,
) -> None:
    """Run the whole pipeline: harvest -> train SAEs (or load --sae ones) -> decompose their error -> report."""
    from sae_darkmatter import pipeline, presets

    def body() -> None:
        if quick and protocol != "default":
            raise DarkMatterError(f"--quick and --protocol {protocol} cannot be combined: the "
                                  "protocol fixes the amount of data")
        cfg = _build_config(
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
        )
        if quick:
            cfg = presets.quick(cfg)
        metrics = pipeline.run(cfg, out)
        if metrics:  # {} on the ranks other than 0 under torchrun
            _out(_summary(metrics))
            _out(f"report: {out / 'report.html'}")

    _main(body)


@app.command("harvest")
def harvest_cmd(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Store folder (resumed if it exists).")
    ] = Path("darkmatter_out/store"),
    model: Model = None,
    hook: Annotated[
        list[str] | None,
        typer.Option(help="Hook point(s), repeatable: resid_post.L, mlp_out.L, attn_out.L."),
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
        cfg = _set(
            base,
            model=_set(base.model, name=model, dtype=dtype, device=device),
            corpus=_set(base.corpus, source=corpus, n_contexts=n_contexts,
                        context_length=context_length, seed=seed, prepend_bos=_bos(prepend_bos)),
            hooks=tuple(hook) if hook else None,
            batch_size=batch_size,
            contexts_per_shard=contexts_per_shard,
            with_loss=loss,
        )
        store = harvest(cfg, out)
        _out(f"store: {out} ({store.n_rows:,} tokens; hooks {', '.join(store.hooks)})")

    _main(body)


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
    lr: Annotated[
        float | None, typer.Option(help="Adam learning rate (default: scaled by width).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Tokens per step.")] = None,
    skip_positions: Skip = None,
    max_norm_ratio: MaxNorm = None,
    seed: Seed = None,
    device: Device = None,
) -> None:
    """Train a width × sparsity grid of SAEs in one pass over a store's SAE-training split (SAELens format)."""
    from sae_darkmatter.pipeline import train_saes
    from sae_darkmatter.splits import make_splits
    from sae_darkmatter.store import ActivationStore

    def body() -> None:
        split = _split(SplitConfig(), seed, skip_positions, max_norm_ratio)
        cfg = _grid(SAETrainConfig(), architecture, widths, k, train_tokens=train_tokens, lr=lr,
                    batch_size=batch_size, seed=seed, device=device)
        st = ActivationStore.open(store)
        dirs = train_saes(st, make_splits(st, split, hook=hook), cfg, out, hook=hook)
        table = Table(
            title=f"SAEs in {out} (scores on up to 16k training rows; curves in training.json)"
        )
        for col in ("SAE", "FVU", "L0", "dead latents", "tokens", "tok/s"):
            table.add_column(col, justify="right")
        for d in dirs:
            t = json.loads((d / "training.json").read_text())
            table.add_row(d.name, f"{t['final_train_fvu']:.4f}", f"{t['final_train_l0']:.1f}",
                          f"{t['dead_latents']:,} ({100 * t['dead_fraction']:.1f} %)",
                          f"{t['tokens_seen']:,}", f"{t['tokens_per_second']:,.0f}")
        _out(table)

    _main(body)


@app.command("decompose")
def decompose_cmd(
    sae: Annotated[
        list[str],
        typer.Option(
            help="SAE, repeatable: 'saelens:<release>/<sae_id>' or a SAELens / sparsify / dictionary_learning folder."
        ),
    ],
    store: Annotated[Path, typer.Option(help="Activation store folder.")] = Path(
        "darkmatter_out/store"
    ),
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for results.")] = Path(
        "darkmatter_out/decompose"
    ),
    hook: Annotated[str | None, typer.Option(help="Stored hook (default: the first).")] = None,
    skip_positions: Skip = None,
    max_norm_ratio: MaxNorm = None,
    ridge: Annotated[float | None, typer.Option(help="Ridge penalty of the probes.")] = None,
    bias: Annotated[
        bool | None, typer.Option("--bias/--no-bias", help="Bias column in the probes.")
    ] = None,
    seed: Seed = None,
    device: Device = None,
) -> None:
    """Split each SAE's error into linear and nonlinear parts on held-out tokens."""
    from sae_darkmatter.pipeline import decompose_saes
    from sae_darkmatter.splits import make_splits
    from sae_darkmatter.store import ActivationStore

    def body() -> None:
        split = _split(SplitConfig(), seed, skip_positions, max_norm_ratio)
        cfg = _set(DecomposeConfig(), ridge=ridge, bias=bias, device=device)
        st = ActivationStore.open(store)
        results = decompose_saes(st, make_splits(st, split, hook=hook), sae, cfg, out, hook=hook)
        _out(_summary({"model": results[0]["model"], "hook": results[0]["metrics"]["hook"],
                       "saes": [{"name": r["name"], "k": r["sae"].get("k"), **r["metrics"]}
                                for r in results]}))

    _main(body)


@app.command()
def analyze(
    run_dir: Annotated[
        Path, typer.Argument(help="Run folder with store/, saes/ and decompose/.")
    ] = Path("darkmatter_out"),
    only: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset of: encoder_error, scaling, per_token, norms, cross_layer."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML run config (default: the run's run_config.json)."),
    ] = None,
    model: Model = None,
    seed: Seed = None,
) -> None:
    """Encoder error, scaling law, per-token scaling, norm baselines, cross-layer prediction; then the report."""
    from sae_darkmatter.analyses import run_analyses
    from sae_darkmatter.config import RunConfig, from_dict
    from sae_darkmatter.models import load_tokenizer
    from sae_darkmatter.pipeline import RUN_CONFIG_FILE, remove_stale_temps, run_lock
    from sae_darkmatter.report import write_report
    from sae_darkmatter.store import ActivationStore

    def body() -> None:
        saved = run_dir / RUN_CONFIG_FILE
        cfg = load_toml(config) if config else (
            from_dict(RunConfig, json.loads(saved.read_text())) if saved.exists() else RunConfig())
        cfg = _set(cfg, split=_set(cfg.split, seed=seed))
        name = model or ActivationStore.open(run_dir / "store").meta.get("config", {}).get(
            "model", {}).get("name", "smollm2")
        try:
            tokenizer = load_tokenizer(dataclasses.replace(cfg.harvest.model, name=name))
        except DarkMatterError as err:
            console.print(f"[yellow]token texts unavailable[/] ({err}); showing token ids")
            tokenizer = None
        chosen = tuple(x.strip() for x in only.split(",")) if only else None
        with run_lock(run_dir):  # one writer per run folder, as in `run`
            remove_stale_temps(run_dir)
            run_analyses(run_dir, only=chosen, cfg=cfg, tokenizer=tokenizer)
            _out(f"report: {write_report(run_dir / 'decompose', run_dir)}")

    _main(body, one_process=True)


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="Run folder or activation store.")] = Path(
        "darkmatter_out"
    ),
    fix: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Re-harvest bad store shards; remove damaged SAEs this run trained (rerun to retrain).",
        ),
    ] = False,
) -> None:
    """Check every store shard (sha256) and SAE file of a run; with --repair, redo what is damaged."""
    from sae_darkmatter import integrity

    def body() -> None:
        c = Console()
        repaired: list[integrity.Damage] = []
        if fix:
            repaired, left = integrity.repair(path)
            for d in repaired:
                c.print(f"repaired {d.kind} {d.path}")
        else:
            left = integrity.check(path)
        for d in left:
            c.print(f"[bold red]damaged[/] {d.kind} {d.path}: {d.reason}")
        if left:
            hint = "" if fix else "; `darkmatter verify --repair` redoes what can be redone"
            raise DarkMatterError(f"{len(left)} damaged item(s) in {path}{hint}")
        retrain = fix and any(d.kind == "sae" for d in repaired)
        c.print(f"{path}: all store shards and SAE files are intact"
                + ("; rerun `darkmatter run` to retrain the removed SAEs" if retrain else ""))

    _main(body, one_process=True)


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

    _main(
        lambda: _out(f"report: {write_report(decompose_dir, out or decompose_dir.parent)}"),
        one_process=True,
    )


@app.command()
def synthetic(
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path(
        "darkmatter_synthetic"
    ),
    d: Annotated[int | None, typer.Option(help="Activation width.")] = None,
    n_features: Annotated[int | None, typer.Option(help="Number of true features.")] = None,
    n_tokens: Annotated[int | None, typer.Option(help="Synthetic tokens.")] = None,
    l0: Annotated[float | None, typer.Option(help="Expected active features per token.")] = None,
    frequency: Annotated[
        str | None, typer.Option(help="Feature frequencies: zipf or uniform.")
    ] = None,
    magnitude: Annotated[
        str | None, typer.Option(help="Activation magnitudes: exponential, lognormal or constant.")
    ] = None,
    dictionary: Annotated[
        str | None,
        typer.Option(help="'random' or an SAELens SAE folder whose decoder rows are the features."),
    ] = None,
    train_check: Annotated[
        bool,
        typer.Option(
            "--train-check/--no-train-check",
            help="Also train real TopK SAEs on synthetic data and split their error.",
        ),
    ] = True,
    seed: Seed = None,
) -> None:
    """Synthetic activations with known ground truth: the paper's Fig. 15 grid and Table 1."""
    from sae_darkmatter.synthetic import SyntheticConfig, run_synthetic

    def body() -> None:
        cfg = _set(SyntheticConfig(), d=d, n_features=n_features, n_tokens=n_tokens, l0=l0,
                   frequency=frequency, magnitude=magnitude, dictionary=dictionary, seed=seed)
        results = run_synthetic(cfg, out, train_check=train_check)
        table = Table(title="Table 1: Pearson r over the noise grid (rows: true noise)")
        for col in ("fit", "noise", "est. linear", "est. nonlinear"):
            table.add_column(col, justify="right")
        for fit, t in results["table1"].items():
            for noise, row in t.items():
                table.add_row(fit, noise, *(f"{v:+.3f}" for v in row.values()))
        _out(table)
        _out(f"report: {results['report']}")

    _main(body, one_process=True)


@app.command()
def info(
    store: Annotated[
        Path | None, typer.Option(help="Also summarise this activation store.")
    ] = None,
) -> None:
    """Versions, devices, the embedded model's location, and an optional store summary."""
    import torch

    from sae_darkmatter.models import embedded_gguf_path

    def body() -> None:
        c = Console()
        c.print(
            f"sae-darkmatter {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}"
        )
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        c.print(f"GPUs: {', '.join(f'cuda:{i} {n}' for i, n in enumerate(gpus)) or 'none'}; "
                f"default device {resolve_device('auto')}")
        backends = [b for b, ok in (("gloo", torch.distributed.is_gloo_available()),
                                    ("nccl", torch.distributed.is_nccl_available())) if ok]
        c.print(f"torchrun backends: {', '.join(backends) or 'none'} "
                f"({'nccl' if gpus else 'gloo'} would be used here)")
        try:
            c.print(f"embedded model: {embedded_gguf_path()}")
        except DarkMatterError as err:
            c.print(f"embedded model: missing ({err})")
        if store is not None:
            from sae_darkmatter.store import ActivationStore

            st = ActivationStore.open(store)
            bos = (f"BOS token {st.meta['bos_token_id']} first" if st.meta.get("prepend_bos")
                   else "no BOS prepended")
            c.print(
                f"store {store}: {st.n_rows:,} tokens, {st.committed_contexts:,} contexts of "
                f"{st.context_length:,} ({bos}), hooks {st.hooks}, model {st.meta.get('model_name')}"
            )

    _main(body, one_process=True)


@app.command("stream")
def stream_cmd(
    sae: Annotated[
        list[str],
        typer.Option(
            help="Pretrained SAE, repeatable: 'saelens:<release>/<sae_id>' or a SAELens / sparsify / dictionary_learning folder."
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
            help="Hook point, e.g. resid_post.15 (default: the one --sae names, else the middle layer)."
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
    checkpoint_every: Annotated[int, typer.Option(help="Batches between checkpoints.")] = 25,
) -> None:
    """Decompose pretrained SAEs' error straight from the LM: no activation store, memory independent of the token count."""
    from sae_darkmatter.adopt import adopt_sae_metadata
    from sae_darkmatter.pipeline import open_saes
    from sae_darkmatter.stream import stream_decompose

    def body() -> None:
        loaded = open_saes(sae)
        cfg = adopt_sae_metadata(
            _build_config(
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
            ),
            loaded,
        )
        harvest = _set(
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
        _out(_summary({"model": first.model, "hook": first.metrics.hook, "saes": rows}))
        _out(
            f"{first.data['probe_train_tokens']:,} probe-train and {first.data['probe_test_tokens']:,} "
            f"held-out tokens; results in {out}"
        )

    _main(body)


register_autointerp(app)  # `darkmatter autointerp`: needs the [autointerp] extra only when it runs

if __name__ == "__main__":
    app()
