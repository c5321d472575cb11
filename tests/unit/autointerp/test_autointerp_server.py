"""Auto-interpretability: the whole protocol against a real OpenAI-compatible server
(llama.cpp's, serving the embedded SmolLM2 GGUF).

The 135M judge answers poorly; these tests check the protocol, the cache, the failure paths and
the arithmetic, never the quality of explanations.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import AUTOINTERP_HOOK as HOOK
from helpers import collect_examples_of, make_run
from llama_server import KEY, KEY_ENV, free_port, start_server, stop
from sae_darkmatter.autointerp import (
    AutoInterpConfig,
    ChatClient,
    EndpointError,
    autointerp_run,
    latent_counts,
    prompts,
    summarize,
)
from sae_darkmatter.autointerp.client import cache_key
from sae_darkmatter.autointerp.run import (
    LATENTS_FILE,
    batches,
    detect,
    explain,
)

# Small and fast: 1 latent per SAE, 2 quantiles, 8-token windows, short answers.
FAST = {
    "model": "smollm2",
    "api_key_env": KEY_ENV,
    "n_latents": 1,
    "n_quantiles": 2,
    "n_per_quantile": 1,
    "n_negatives": 1,
    "n_explain": 2,
    "window": 8,
    "batch_size": 3,
    "explain_max_tokens": 16,
    "detect_max_tokens": 16,
    "n_boot": 200,
    "concurrency": 2,
    "max_retries": 1,
    "timeout_s": 60.0,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ[KEY_ENV] = KEY
    proc, url = start_server(tmp_path_factory.mktemp("server") / "server.log")
    yield url
    stop(proc)
    os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def first_run(run_dir, server, tokenizer):
    """JSON-constrained answers (llama.cpp's json_object + schema): real verdicts to score."""
    cfg = AutoInterpConfig(base_url=server, response_format="json_object", **FAST)
    t = time.perf_counter()
    result = autointerp_run(run_dir, cfg, tokenizer=tokenizer, progress=False)
    return cfg, result, time.perf_counter() - t


def _without_timings(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("requests", "seconds")}


def test_run_writes_results_report_and_metrics(run_dir, first_run):
    cfg, result, _ = first_run
    assert [s["input"] for s in result["saes"]] == ["x", "error", "linear", "nonlinear"]
    assert result["requests"]["sent"] >= 8 and result["requests"]["from_cache"] == 0
    # constrained to the schema, even SmolLM2's answers parse (as free text almost none do)
    assert all(
        s["snippets"]["judged"] > 0 and s["snippets"]["unparsable"] == 0 for s in result["saes"]
    )
    analyses = json.loads((run_dir / "analyses.json").read_text())
    assert analyses["autointerp"] == json.loads(json.dumps(result))
    assert "error_saes" in analyses  # merged, not replaced
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["analyses"]["autointerp"]["saes"][0]["label"] == result["saes"][0]["label"]
    html = (run_dir / "report.html").read_text()
    assert "Detection scoring by an LLM judge" in html and "figures/autointerp.png" in html
    assert (run_dir / "figures" / "autointerp.png").stat().st_size > 1000
    # every summary agrees with the per-latent verdicts in latents.json
    records = json.loads((run_dir / LATENTS_FILE).read_text())["saes"]
    for s in result["saes"]:
        recs = [r for r in records[s["label"]] if r["status"] == "scored"]
        assert s["latents"]["scored"] == len(recs) <= cfg.n_latents
        verdicts = [
            (max(e["quantile"], 0), e["judged_active"]) for r in recs for e in r["scored_examples"]
        ]
        judged = [v for v in verdicts if v[1] is not None]
        assert s["snippets"]["unparsable"] == len(verdicts) - len(judged)
        c, t = latent_counts(judged, cfg.n_quantiles)
        assert s["snippets"]["judged"] == int(t.sum())
        assert (
            s["detection"]["negatives"]["correct"] == c[0]
            and s["detection"]["negatives"]["total"] == t[0]
        )
        assert [q["correct"] for q in s["detection"]["quantiles"]] == c[1:].tolist()


def test_rerun_is_answered_from_the_cache_even_with_the_server_gone(run_dir, first_run, tokenizer):
    cfg, result, _ = first_run
    again = autointerp_run(run_dir, cfg, tokenizer=tokenizer, progress=False)
    assert again["requests"]["sent"] == 0
    assert again["requests"]["from_cache"] == result["requests"]["sent"]
    assert _without_timings(again) == _without_timings(json.loads(json.dumps(result)))
    # the cache key holds no URL: a stopped server (nothing listening) costs nothing either
    gone = dataclasses.replace(cfg, base_url=f"http://127.0.0.1:{free_port()}/v1")
    offline = autointerp_run(run_dir, gone, tokenizer=tokenizer, progress=False)
    assert offline["requests"]["sent"] == 0
    assert offline["saes"] == again["saes"]


def test_api_key_is_sent_but_never_written(run_dir, first_run, tmp_path, server, caplog, capfd):
    cfg, _, _ = first_run
    caplog.set_level(logging.DEBUG)
    # a fresh cache: real requests, with every logger at DEBUG
    fresh = dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache"), saes=("topk-w64-k8",))
    autointerp_run(run_dir, fresh, tokenizer=None, progress=False)
    captured = capfd.readouterr()
    assert KEY not in caplog.text and KEY not in captured.out + captured.err
    written = [p for root in (run_dir, tmp_path) for p in root.rglob("*") if p.is_file()]
    assert len(written) > 10
    assert not [p for p in written if KEY.encode() in p.read_bytes()]
    # the server requires the key: without it the client is refused, with a message naming the
    # variable
    client = ChatClient(
        server, "smollm2", cache_dir=tmp_path / "other", api_key_env="DM_UNSET_VARIABLE"
    )
    with pytest.raises(EndpointError, match="DM_UNSET_VARIABLE") as err:
        client.complete([{"role": "user", "content": "hi"}], max_tokens=2)
    assert KEY not in str(err.value)


def test_unreachable_endpoint_fails_fast_and_clearly(run_dir, tmp_path, tokenizer):
    url = f"http://127.0.0.1:{free_port()}/v1"
    cfg = AutoInterpConfig(
        base_url=url, cache_dir=str(tmp_path / "cache"), **{**FAST, "max_retries": 3}
    )
    t = time.perf_counter()
    with pytest.raises(EndpointError, match="cannot reach") as err:
        autointerp_run(
            run_dir,
            dataclasses.replace(cfg, saes=("topk-w64-k8",)),
            tokenizer=tokenizer,
            progress=False,
        )
    assert url in str(err.value)
    assert time.perf_counter() - t < 15  # examples included; the endpoint check does not retry
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.json"))


def _cache_entry(cache: Path, messages: list, max_tokens: int, answer: str) -> None:
    key = cache_key("smollm2", messages, {"max_tokens": max_tokens, "temperature": 0.0})
    path = cache / key[:2] / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"answer": answer}))


def test_scores_match_recorded_verdicts(run_dir, tmp_path, tokenizer):
    """Answers recorded in the cache (its own format) drive a whole run with no server: the
    summary must equal the counts of the recorded verdicts, the unparsable batch left out."""
    cache = tmp_path / "cache"
    cfg = AutoInterpConfig(
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        cache_dir=str(cache),
        saes=("topk-w64-k8",),
        **{**FAST, "n_latents": 3, "n_per_quantile": 2, "n_negatives": 3, "batch_size": 4},
    )
    ex = collect_examples_of(HOOK, run_dir, cfg, tokenizer)[0]
    rng = np.random.default_rng(0)
    counts, unparsable = [], 0
    for le in ex.latents:
        _cache_entry(cache, prompts.explanation_messages([e.highlighted for e in le.explain]),
                     cfg.explain_max_tokens, f"Explanation: latent {le.latent}")
        judged = []
        for i, batch in enumerate(batches(le, cfg)):
            messages = prompts.detection_messages(f"latent {le.latent}", [e.text for e in batch])
            if le is ex.latents[0] and i == 0:  # unparsable twice: excluded and counted
                _cache_entry(cache, messages, cfg.detect_max_tokens, "no idea")
                _cache_entry(
                    cache,
                    prompts.retry_messages(messages, "no idea", prompts.DETECT_RETRY),
                    cfg.detect_max_tokens,
                    "still no idea",
                )
                unparsable += len(batch)
                continue
            said = rng.random(len(batch)) < 0.5
            _cache_entry(
                cache,
                messages,
                cfg.detect_max_tokens,
                json.dumps([int(j) + 1 for j in np.flatnonzero(said)]),
            )
            judged += [(max(e.quantile, 0), bool(v)) for e, v in zip(batch, said, strict=True)]
        counts.append(latent_counts(judged, cfg.n_quantiles))
    result = autointerp_run(run_dir, cfg, tokenizer=tokenizer, progress=False)
    assert result["requests"] == {
        **result["requests"],
        "sent": 0,
        "from_cache": len(list(cache.rglob("*.json"))),
    }
    s = result["saes"][0]
    correct, total = np.stack([c for c, _ in counts]), np.stack([t for _, t in counts])
    assert s["detection"] == summarize(correct, total, n_boot=cfg.n_boot, seed=cfg.seed)
    assert (
        s["snippets"] == {"judged": int(total.sum()), "unparsable": unparsable} and unparsable > 0
    )
    # balanced accuracy by plain counting over all recorded verdicts
    recall = correct[:, 1:].sum() / total[:, 1:].sum()
    specificity = correct[:, 0].sum() / total[:, 0].sum()
    assert s["detection"]["balanced_accuracy"]["value"] == pytest.approx((recall + specificity) / 2)
    assert [e["explanation"] for e in s["explanations"]] == [
        f"latent {le.latent}" for le in ex.latents
    ]


def test_unparsable_answers_are_retried_once_then_excluded(run_dir, server, tmp_path, tokenizer):
    cfg = AutoInterpConfig(base_url=server, cache_dir=str(tmp_path), **FAST)
    ex = collect_examples_of(HOOK, run_dir, cfg, tokenizer)[0]
    latent = ex.latents[0]
    batch = list(latent.scored[:2])
    first = prompts.detection_messages("digits", [e.text for e in batch])
    retry = prompts.retry_messages(first, "I cannot tell.", prompts.DETECT_RETRY)
    # recorded answers (the cache's own format): unparsable, then the retry's answer
    _cache_entry(tmp_path, first, cfg.detect_max_tokens, "I cannot tell.")
    _cache_entry(tmp_path, retry, cfg.detect_max_tokens, "Still no idea")
    client = ChatClient(server, "smollm2", cache_dir=tmp_path, api_key_env=KEY_ENV)
    assert detect(client, cfg, "digits", batch) is None
    assert (client.requests_sent, client.cache_hits) == (0, 2)
    _cache_entry(tmp_path, retry, cfg.detect_max_tokens, "[2]")
    assert detect(client, cfg, "digits", batch) == [False, True]
    # an unparsable explanation: the retry goes to the server (one real request, then cached)
    messages = prompts.explanation_messages([e.highlighted for e in latent.explain])
    _cache_entry(tmp_path, messages, cfg.explain_max_tokens, "  ")
    explain(client, cfg, latent)
    assert client.requests_sent == 1
    sent = prompts.retry_messages(messages, "  ", prompts.EXPLAIN_RETRY)
    key = cache_key("smollm2", sent, {"max_tokens": cfg.explain_max_tokens, "temperature": 0.0})
    assert (tmp_path / key[:2] / f"{key}.json").is_file()  # the retry's answer, cached


def test_server_killed_mid_run_keeps_cached_answers(run_dir, server, tmp_path, tokenizer):
    proc, url = start_server(tmp_path / "server.log")
    cache = tmp_path / "cache"
    cfg = AutoInterpConfig(
        base_url=url,
        cache_dir=str(cache),
        **{**FAST, "concurrency": 1, "seed": 3},
        saes=("topk-w64-k8", "topk-w64-k8/nonlinear/topk-w32-k4"),
    )
    failure: list[BaseException] = []

    def work() -> None:
        try:
            autointerp_run(run_dir, cfg, tokenizer=tokenizer, progress=False)
        except BaseException as err:  # noqa: BLE001 (handed to the test thread)
            failure.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    deadline = time.monotonic() + 60
    while not list(cache.rglob("*.json")) and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    stop(proc)
    t = time.perf_counter()
    thread.join(60)
    assert not thread.is_alive() and time.perf_counter() - t < 30
    assert failure and isinstance(failure[0], EndpointError), failure
    assert url in str(failure[0])
    kept = len(list(cache.rglob("*.json")))
    assert kept >= 1
    # resumed on the other server: the kept answers are reused, only the rest is asked
    resumed = autointerp_run(
        run_dir, dataclasses.replace(cfg, base_url=server), tokenizer=tokenizer, progress=False
    )
    assert resumed["requests"]["from_cache"] == kept
    assert resumed["requests"]["sent"] == len(list(cache.rglob("*.json"))) - kept > 0


def test_cli_command(run_dir, first_run, tmp_path):
    import typer
    from typer.testing import CliRunner

    from sae_darkmatter.cli.autointerp import register

    cfg, result, _ = first_run
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps "autointerp" a named subcommand
    args = [
        "autointerp",
        str(run_dir),
        "--base-url",
        cfg.base_url,
        "--model",
        cfg.model,
        "--api-key-env",
        KEY_ENV,
        "--n-latents",
        "1",
        "--n-quantiles",
        "2",
        "--n-per-quantile",
        "1",
        "--n-negatives",
        "1",
        "--n-explain",
        "2",
        "--window",
        "8",
        "--batch-size",
        "3",
        "--explain-max-tokens",
        "16",
        "--detect-max-tokens",
        "16",
        "--response-format",
        "json_object",
    ]
    wide = {"COLUMNS": "200"}
    out = CliRunner().invoke(
        app, args, env=wide
    )  # the same requests as first_run: all answered by its cache
    assert out.exit_code == 0, out.output
    assert "Detection scoring" in out.output and "topk-w64-k8" in out.output
    assert f"requests: 0 sent, {result['requests']['sent']} answered from the cache" in out.output
    dead = f"http://127.0.0.1:{free_port()}/v1"
    out = CliRunner().invoke(
        app,
        [*args, "--base-url", dead, "--cache-dir", str(tmp_path / "d"), "--saes", "topk-w64-k8"],
        env=wide,
    )
    assert out.exit_code == 2 and "cannot reach" in out.output


# ---------------------------------------------------------------------------- SmolLM2 itself


@pytest.mark.slow
def test_smollm2_run(tmp_path, server, smollm2_tokenizer):
    """A few contexts of the embedded SmolLM2, a small SAE, and the whole protocol on it."""
    out = make_run(
        Path("smollm2"), tmp_path, "resid_post.15", n_contexts=24, length=32, widths=(128,), ks=(8,)
    )
    cfg = AutoInterpConfig(base_url=server, saes=("topk-w128-k8",), **{**FAST, "n_latents": 2})
    result = autointerp_run(out, cfg, tokenizer=smollm2_tokenizer, progress=False)
    s = result["saes"][0]
    assert s["latents"]["scored"] + s["latents"]["unparsable_explanations"] == 2
    assert result["requests"]["sent"] >= 4
    records = json.loads((out / LATENTS_FILE).read_text())["saes"]["topk-w128-k8"]
    assert all("<<" in e["text"] for r in records for e in r["explain_examples"])
