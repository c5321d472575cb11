"""``darkmatter autointerp``: registered on the main typer app by ``register(app)``.

Nothing here imports ``openai``: the command works only with the ``[autointerp]`` extra, the rest
of the CLI without it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from sae_darkmatter.cli.common import given, main


def _ci(block: dict[str, Any]) -> str:
    v, (lo, hi) = block["value"], block["ci"]
    if v is None:
        return "–"
    return f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")


def summary_table(result: dict[str, Any]) -> Any:
    """A rich table of detection scores per SAE."""
    from rich.table import Table

    table = Table(title=f"Detection scoring by {result['model']} (95 % bootstrap CIs over latents)")
    for col in ("SAE", "input", "latents", "balanced acc.", "recall", "specificity", "top quantile",
                "unparsable expl. / snippets"):
        table.add_column(col, justify="right")
    for s in result["saes"]:
        d, lat = s["detection"], s["latents"]
        top = d["quantiles"][-1]["accuracy"] if d["quantiles"] else None
        table.add_row(
            s["label"],
            s["input"],
            f"{lat['scored']}/{lat['requested']}",
            _ci(d["balanced_accuracy"]),
            _ci(d["recall"]),
            _ci(d["specificity"]),
            "–" if top is None else f"{top:.3f}",
            f"{lat['unparsable_explanations']} / {s['snippets']['unparsable']}",
        )
    return table


def register(app: typer.Typer) -> None:
    """Add the ``autointerp`` command to ``app``."""

    @app.command("autointerp")
    def autointerp(
        run_dir: Annotated[
            Path,
            typer.Argument(help="Run folder with store/, saes/, decompose/ (and error_saes/)."),
        ] = Path("darkmatter_out"),
        model: Annotated[
            str, typer.Option(help="Model name the chat endpoint serves (explainer and judge).")
        ] = "",
        base_url: Annotated[
            str | None,
            typer.Option(
                help="OpenAI-compatible API base URL (default: a local server at "
                "http://127.0.0.1:8000/v1: vLLM, llama.cpp), e.g. https://openrouter.ai/api/v1."
            ),
        ] = None,
        api_key_env: Annotated[
            str | None,
            typer.Option(
                help="Name of the environment variable holding the API key (default "
                "OPENAI_API_KEY; the key itself is never stored)."
            ),
        ] = None,
        saes: Annotated[
            list[str] | None,
            typer.Option(
                "--saes",
                help="SAEs, repeatable or comma-separated: names under saes/ or error_saes/, "
                     "folders, or saelens:<release>/<id> (default: the run's error SAEs of one "
                     "width/k and their base SAE).",
            ),
        ] = None,
        n_latents: Annotated[int | None, typer.Option(help="Latents sampled per SAE.")] = None,
        n_per_quantile: Annotated[
            int | None, typer.Option(help="Held-out activating snippets per activation quantile.")
        ] = None,
        n_quantiles: Annotated[
            int | None, typer.Option(help="Activation quantiles (10: deciles).")
        ] = None,
        n_negatives: Annotated[
            int | None, typer.Option(help="Held-out non-activating snippets per latent.")
        ] = None,
        n_explain: Annotated[
            int | None, typer.Option(help="Top-activating windows shown to the explainer.")
        ] = None,
        window: Annotated[int | None, typer.Option(help="Tokens per snippet window.")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Snippets per judge prompt.")] = None,
        explain_max_tokens: Annotated[
            int | None, typer.Option(help="Answer length limit of the explainer.")
        ] = None,
        detect_max_tokens: Annotated[
            int | None, typer.Option(help="Answer length limit of the judge.")
        ] = None,
        concurrency: Annotated[int | None, typer.Option(help="Requests in flight at once.")] = None,
        max_retries: Annotated[
            int | None, typer.Option(help="Retries (exponential backoff) per request.")
        ] = None,
        timeout: Annotated[
            float | None, typer.Option(help="Seconds to wait for one answer.")
        ] = None,
        response_format: Annotated[
            str | None,
            typer.Option(
                help="Constrain answers to JSON: 'json_schema' (OpenAI, vLLM, OpenRouter), "
                     "'json_object' (llama.cpp server) or 'text' (default)."
            ),
        ] = None,
        cache_dir: Annotated[
            Path | None, typer.Option(help="Answer cache (default: <run>/autointerp/cache).")
        ] = None,
        seed: Annotated[
            int | None,
            typer.Option(help="Seed for latent sampling, context split and snippet order."),
        ] = None,
    ) -> None:
        """Auto-interpretability: an LLM explains sampled latents; a judge LLM's detection \
accuracy scores them."""
        from rich.console import Console

        from sae_darkmatter.autointerp.config import AutoInterpConfig
        from sae_darkmatter.autointerp.run import autointerp_run

        def body() -> None:
            for noisy in ("openai", "httpx2", "httpcore"):
                logging.getLogger(noisy).setLevel(logging.WARNING)
            specs = tuple(s.strip() for item in saes or () for s in item.split(",") if s.strip())
            cfg = dataclasses.replace(AutoInterpConfig(), model=model, saes=specs)
            cfg = given(
                cfg,
                base_url=base_url,
                api_key_env=api_key_env,
                n_latents=n_latents,
                n_per_quantile=n_per_quantile,
                n_quantiles=n_quantiles,
                n_negatives=n_negatives,
                n_explain=n_explain,
                window=window,
                batch_size=batch_size,
                explain_max_tokens=explain_max_tokens,
                detect_max_tokens=detect_max_tokens,
                concurrency=concurrency,
                max_retries=max_retries,
                timeout_s=timeout,
                seed=seed,
                response_format=response_format,
                cache_dir=str(cache_dir) if cache_dir else None,
            )
            result = autointerp_run(run_dir, cfg)
            out = Console()
            out.print(summary_table(result))
            req = result["requests"]
            out.print(f"requests: {req['sent']} sent, {req['from_cache']} answered from the cache")
            out.print(f"report: {run_dir / 'report.html'}")

        main(body, one_process=True)
