"""Settings of an auto-interpretability run (kept here: the core config does not need them)."""

from __future__ import annotations

from dataclasses import dataclass

from sae_darkmatter.config_base import _Checked

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


@dataclass(frozen=True)
class AutoInterpConfig(_Checked):
    """Which SAEs and latents, how examples are drawn, and which chat endpoint explains and judges.

    Endpoint: any OpenAI-compatible chat API at ``base_url`` (vLLM, llama.cpp, OpenRouter,
    OpenAI) serving ``model``; the API key is read from the environment variable named
    ``api_key_env`` at request time and never stored. ``concurrency`` requests run at once;
    ``max_retries`` is the openai client's own retry count (exponential backoff on connection
    errors, 408/409/429 and 5xx). ``response_format`` constrains answers to a JSON schema where
    the server can: ``"json_schema"`` (OpenAI, vLLM, OpenRouter), ``"json_object"`` (llama.cpp's
    server: JSON object with the schema inside), ``"text"`` (no constraint; the parser copes).
    Small local models rarely follow the text format, so constrained answers matter for them.
    Every answer is cached under ``cache_dir`` (default ``<run>/autointerp/cache``), keyed by
    model, messages and sampling settings.

    Examples: each context is cut into windows of ``window`` tokens; a window's activation is
    the latent's largest activation on a token of it that the run's token filter keeps. Contexts
    are split (seeded) into explanation contexts (``explain_fraction``) and scoring contexts.
    The explainer sees the ``n_explain`` top windows of the explanation contexts; the judge sees
    ``n_per_quantile`` windows from each of ``n_quantiles`` equal-count activation quantiles of
    the scoring contexts (drawn from a uniform sample of ``pool`` active windows per latent) and
    ``n_negatives`` random windows where the latent is silent, ``batch_size`` snippets per prompt.

    ``saes`` empty: the run's error SAEs (one width and k, see ``run.default_saes``) and their
    base SAE. ``n_latents`` latents per SAE are drawn (seeded) from those active in at least
    ``n_quantiles`` scoring windows and one explanation window; dead and rarer ones are counted
    and skipped.
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    max_retries: int = 3
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    temperature: float = 0.0
    response_format: str = "text"
    explain_max_tokens: int = 60
    detect_max_tokens: int = 30
    saes: tuple[str, ...] = ()
    n_latents: int = 50
    n_quantiles: int = 10
    n_per_quantile: int = 5
    n_negatives: int = 20
    n_explain: int = 10
    window: int = 32
    batch_size: int = 5
    explain_fraction: float = 0.5
    pool: int = 500
    n_boot: int = 1000
    seed: int = 0
    chunk_rows: int = 4096
    cache_dir: str | None = None

    PATH = "autointerp"

    def _check(self) -> None:
        for name in ("concurrency", "explain_max_tokens", "detect_max_tokens", "n_latents",
                     "n_quantiles", "n_per_quantile", "n_explain", "window", "batch_size",
                     "n_boot", "chunk_rows"):
            self._need(name, getattr(self, name) >= 1, ">= 1")
        for name in ("timeout_s", "connect_timeout_s"):
            self._need(name, getattr(self, name) > 0, "> 0 seconds")
        for name in ("max_retries", "n_negatives", "temperature"):
            self._need(name, getattr(self, name) >= 0, ">= 0")
        self._need("response_format", self.response_format in RESPONSE_FORMATS,
                   f"one of {list(RESPONSE_FORMATS)}")
        self._need("explain_fraction", 0 < self.explain_fraction < 1, "strictly between 0 and 1")
        least = self.n_quantiles * self.n_per_quantile
        self._need("pool", self.pool >= least,
                   f">= n_quantiles * n_per_quantile ({least}) windows, to fill every quantile")
