"""Commands around the pipeline: ``verify`` a run, ``synthetic`` ground truth, ``info``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sae_darkmatter import __version__
from sae_darkmatter._io import resolve_device
from sae_darkmatter.cli.common import (
    Seed,
    app,
    given,
    main,
    show,
)
from sae_darkmatter.errors import DarkMatterError


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="Run folder or activation store.")] = Path(
        "darkmatter_out"
    ),
    fix: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Re-harvest bad store shards; remove damaged SAEs this run trained (rerun to "
                 "retrain).",
        ),
    ] = False,
) -> None:
    """Check every store shard (sha256) and SAE file of a run; with --repair, redo what is \
damaged."""
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

    main(body, one_process=True)


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
        cfg = given(SyntheticConfig(), d=d, n_features=n_features, n_tokens=n_tokens, l0=l0,
                   frequency=frequency, magnitude=magnitude, dictionary=dictionary, seed=seed)
        results = run_synthetic(cfg, out, train_check=train_check)
        table = Table(title="Table 1: Pearson r over the noise grid (rows: true noise)")
        for col in ("fit", "noise", "est. linear", "est. nonlinear"):
            table.add_column(col, justify="right")
        for fit, t in results["table1"].items():
            for noise, row in t.items():
                table.add_row(fit, noise, *(f"{v:+.3f}" for v in row.values()))
        show(table)
        show(f"report: {results['report']}")

    main(body, one_process=True)


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
            f"sae-darkmatter {__version__}, torch {torch.__version__}, python "
            f"{sys.version.split()[0]}"
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
                f"{st.context_length:,} ({bos}), hooks {st.hooks}, model "
                f"{st.meta.get('model_name')}"
            )

    main(body, one_process=True)
