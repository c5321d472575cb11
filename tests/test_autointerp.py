"""Auto-interpretability: parsing, scoring arithmetic, example collection, and the whole protocol
against a real OpenAI-compatible server (llama.cpp's, serving the embedded SmolLM2 GGUF).

The 135M judge answers poorly; these tests check the protocol, the cache, the failure paths and
the arithmetic, never the quality of explanations.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_darkmatter._io import write_json
from sae_darkmatter.analyses.error_saes import error_sae_analysis
from sae_darkmatter.autointerp import (
    AutoInterpConfig,
    ChatClient,
    EndpointError,
    autointerp_run,
    collect_examples,
    default_saes,
    latent_counts,
    parse_detection,
    parse_explanation,
    prompts,
    resolve_sae,
    summarize,
)
from sae_darkmatter.autointerp.choose import RunData
from sae_darkmatter.autointerp.client import cache_key
from sae_darkmatter.autointerp.run import (
    LATENTS_FILE,
    batches,
    detect,
    explain,
)
from sae_darkmatter.autointerp.scoring import latent_balanced_accuracy
from sae_darkmatter.config import ErrorSAEConfig, SAETrainConfig
from sae_darkmatter.errors import ConfigError, DarkMatterError
from sae_darkmatter.models import embedded_gguf_path
from sae_darkmatter.run_dir import RunDir
from sae_darkmatter.saes import load_sae
from sae_darkmatter.store import ActivationStore
from test_downstream import make_run

HOOK = "resid_post.2"
KEY_ENV = "DM_AUTOINTERP_TEST_KEY"
KEY = "sk-darkmatter-fake-5e1b7c93d04a"  # distinctive: grepped for in every file and log
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


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "n", "expected"), [
    ("[1, 3]", 4, [True, False, True, False]),
    ("The matching snippets are:\n[2]", 3, [False, True, False]),
    ("[1, 0, 0, 1]", 4, [True, False, False, True]),  # one 0/1 per snippet
    ("[1, 1, 1]", 3, [True, True, True]),  # n values, a repeat: a 0/1 vector
    ("[]", 3, [False, False, False]),
    ("1, 3 and 4", 4, [True, False, True, True]),
    ("3", 3, [False, False, True]),
    ("1: yes\n2: no\n3: Yes", 3, [True, False, True]),
    ("Snippet 1 - no\nSnippet 2 - yes", 2, [False, True]),
    ("None of them.", 2, [False, False]),
    ("[7]", 4, None),  # out of range
    ("1: yes\n2: no", 3, None),  # yes/no for only some snippets
    ("The output of", 3, None),
    ("", 3, None),
])
def test_parse_detection(text, n, expected):
    assert parse_detection(text, n) == expected


def test_parse_explanation():
    assert parse_explanation("Explanation: the keyword return.\nMore text") == "the keyword return."
    assert parse_explanation('  "Python keywords" ') == "Python keywords"
    assert parse_explanation("Sure! explanation:\n\n  closing brackets") == "closing brackets"
    assert parse_explanation("ok") is None and parse_explanation("") is None
    assert (
        parse_explanation('{"explanation": "Python keywords"}') == "Python keywords"
    )  # constrained
    assert parse_detection('{"matches": [2, 3]}', 3) == [False, True, True]


# ---------------------------------------------------------------------------- scoring


def test_scoring_against_hand_computed_counts():
    # latent A: Q1 yes+no, Q2 yes, negatives no+yes; latent B: Q1 yes, Q2 yes, negative no
    a = latent_counts([(1, True), (1, False), (2, True), (0, False), (0, True)], 2)
    b = latent_counts([(1, True), (2, True), (0, False)], 2)
    assert a[0].tolist() == [1, 1, 1] and a[1].tolist() == [2, 2, 1]
    s = summarize(np.stack([a[0], b[0]]), np.stack([a[1], b[1]]), n_boot=500, seed=1)
    assert [q["accuracy"] for q in s["quantiles"]] == pytest.approx([2 / 3, 1.0])
    assert (s["quantiles"][0]["correct"], s["quantiles"][0]["total"]) == (2, 3)
    assert s["negatives"]["accuracy"] == pytest.approx(2 / 3)
    assert s["recall"]["value"] == pytest.approx(4 / 5)
    assert s["specificity"]["value"] == pytest.approx(2 / 3)
    assert s["balanced_accuracy"]["value"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    p, n = 2 / 3, 3
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    assert s["negatives"]["ci_normal"] == pytest.approx([p - half, 1.0])  # clipped at 1
    for block in (s["recall"], s["specificity"], s["balanced_accuracy"]):
        assert block["ci"][0] <= block["value"] <= block["ci"][1]
    # resampling latents: recall is 2/3 (A alone), 4/5 (mixed) or 1 (B alone)
    assert s["recall"]["ci"][0] == pytest.approx(2 / 3) and s["recall"]["ci"][1] == pytest.approx(
        1.0
    )
    assert latent_balanced_accuracy(*a) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert summarize(np.stack([a[0], b[0]]), np.stack([a[1], b[1]]), n_boot=500, seed=1) == s


def test_scoring_edge_cases():
    c, t = latent_counts([(1, True), (2, False)], 2)  # no negatives: specificity undefined
    s = summarize(np.stack([c, c]), np.stack([t, t]), n_boot=100)
    assert s["specificity"]["value"] is None and s["balanced_accuracy"]["value"] is None
    assert s["recall"]["ci"] == [0.5, 0.5]  # identical latents: no spread
    empty = summarize(np.zeros((0, 3), int), np.zeros((0, 3), int), n_boot=50)
    assert empty["n_latents"] == 0 and empty["recall"]["value"] is None
    with pytest.raises(ValueError):
        latent_counts([(3, True)], 2)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="explain_fraction"):
        AutoInterpConfig(explain_fraction=1.0)
    with pytest.raises(ConfigError, match="pool"):
        AutoInterpConfig(pool=5)


# ---------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny run (store, base SAE, decomposition) with error SAEs on e, ê and e − ê."""
    out = make_run(
        tiny_model_dir, tmp_path_factory.mktemp("run"), HOOK, n_contexts=48, widths=(64,)
    )
    cfg = ErrorSAEConfig(
        train=SAETrainConfig(widths=(32,), ks=(4,), train_tokens=1500, batch_size=256)
    )
    write_json(
        out / "analyses.json", {"error_saes": error_sae_analysis(out, cfg=cfg, progress=False)}
    )
    return out


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def _collect(run_dir: Path, cfg: AutoInterpConfig, tokenizer, spec: str = "topk-w64-k8", sae=None):
    data = RunData(RunDir(run_dir), cfg, tokenizer)
    choice = resolve_sae(run_dir, spec)
    sae = sae if sae is not None else load_sae(choice.spec).eval()
    windows = data.windows(data.hook_of(choice, HOOK))
    found = collect_examples(
        [(sae, choice.input)], data.parts(HOOK, choice.base), windows, cfg, tokenizer
    )
    return found[0], windows, sae


def test_examples_by_quantile_negatives_and_highlights(run_dir, tokenizer):
    cfg = AutoInterpConfig(
        n_latents=4, n_quantiles=3, n_per_quantile=2, n_negatives=3, n_explain=3, window=8
    )
    ex, windows, sae = _collect(run_dir, cfg, tokenizer)
    assert len(ex.latents) == 4 and ex.n_eligible == 4
    store = ActivationStore.open(run_dir / "store")
    context = store.column("context")
    checked = 0
    for le in ex.latents:
        for e in le.explain + le.scored:
            # the window's activations, recomputed from the stored x of its kept rows
            kept = windows.rows[slice(*windows.bounds(e.window))]
            with torch.inference_mode():
                acts = sae.encode(store.gather(HOOK, kept))[:, le.latent].numpy()
            assert float(acts.max()) == pytest.approx(e.activation, abs=1e-5)
            all_rows, _ = windows.token_ids(e.window)
            active = np.isin(all_rows, kept[acts > 0]).astype(int)
            runs = int(np.count_nonzero(np.diff(np.concatenate([[0], active])) == 1))
            if "<" not in e.text and ">" not in e.text:  # markers are unambiguous in this text
                assert e.highlighted.count("<<") == e.highlighted.count(">>") == runs
                assert e.text == e.highlighted.replace("<<", "").replace(">>", "")
                checked += 1
        neg = [e for e in le.scored if e.quantile == 0]
        pos = [e for e in le.scored if e.quantile > 0]
        assert all(e.activation == 0 and "<<" not in e.highlighted for e in neg)
        assert len(neg) == min(3, cfg.n_negatives) and len(pos) == 6
        by_q = {q: [e.activation for e in pos if e.quantile == q] for q in (1, 2, 3)}
        assert max(by_q[1]) <= min(by_q[2]) and max(by_q[2]) <= min(
            by_q[3]
        )  # equal-count quantiles
        acts = [e.activation for e in le.explain]
        assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
        # explanation and scoring windows come from disjoint contexts
        assert not _contexts(windows, context, le.explain) & _contexts(windows, context, le.scored)
        assert all(windows.explain[e.window] for e in le.explain)
        assert not any(windows.explain[e.window] for e in le.scored)
    assert checked > 10


def _contexts(windows, context: np.ndarray, examples) -> set[int]:
    return set(context[windows.rows[[windows.bounds(e.window)[0] for e in examples]]].tolist())


def test_examples_do_not_depend_on_chunking_and_follow_the_seed(run_dir, tokenizer):
    cfg = AutoInterpConfig(
        n_latents=3, n_quantiles=2, n_per_quantile=2, n_negatives=2, n_explain=2, window=8
    )
    a = _collect(run_dir, cfg, tokenizer)[0]
    b = _collect(run_dir, dataclasses.replace(cfg, chunk_rows=40), tokenizer)[0]
    assert a == b
    c = _collect(run_dir, dataclasses.replace(cfg, seed=5), tokenizer)[0]
    assert [le.latent for le in c.latents] != [le.latent for le in a.latents]


def test_dead_latents_are_skipped(run_dir, tokenizer):
    sae = load_sae(run_dir / "saes" / "topk-w64-k8").eval()
    dead = torch.arange(0, 64, 2)
    with torch.no_grad():
        sae.b_enc[dead] = -1e6  # never among the top k
    cfg = AutoInterpConfig(
        n_latents=64, n_quantiles=2, n_per_quantile=1, n_negatives=1, n_explain=1, window=8
    )
    ex = _collect(run_dir, cfg, tokenizer, sae=sae)[0]
    assert ex.n_dead >= dead.numel()
    assert ex.n_dead + ex.n_rare + ex.n_eligible == 64
    assert len(ex.latents) == ex.n_eligible and not {le.latent for le in ex.latents} & set(
        dead.tolist()
    )


def test_error_saes_see_the_error_parts(run_dir, tokenizer):
    specs = default_saes(run_dir)
    choices = [resolve_sae(run_dir, s) for s in specs]
    assert [c.input for c in choices] == ["x", "error", "linear", "nonlinear"]
    assert {c.base for c in choices[1:]} == {"topk-w64-k8"}
    assert len({Path(c.spec).name for c in choices[1:]}) == 1  # one width and k
    with pytest.raises(DarkMatterError, match="no SAE"):
        resolve_sae(run_dir, "no-such-sae")
    cfg = AutoInterpConfig(
        n_latents=2, n_quantiles=2, n_per_quantile=1, n_negatives=1, n_explain=2, window=8
    )
    data = RunData(RunDir(run_dir), cfg, tokenizer)
    base = load_sae(run_dir / "saes" / "topk-w64-k8").eval()
    store = ActivationStore.open(run_dir / "store")
    rows = data.windows(HOOK).rows[:50]
    x = store.gather(HOOK, rows)
    parts = data.parts(HOOK, "topk-w64-k8")(rows)
    torch.testing.assert_close(data.parts(HOOK, None)(rows)["x"], x)
    with torch.inference_mode():
        torch.testing.assert_close(parts["error"], x - base(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        parts["linear"] + parts["nonlinear"], parts["error"], rtol=1e-5, atol=1e-5
    )
    # the three error SAEs collected together (inputs computed once) = each collected alone
    members = [(load_sae(c.spec).eval(), c.input) for c in choices[1:]]
    together = collect_examples(
        members, data.parts(HOOK, "topk-w64-k8"), data.windows(HOOK), cfg, tokenizer
    )
    alone = [_collect(run_dir, cfg, tokenizer, spec=c.spec)[0] for c in choices[1:]]
    assert together == alone and all(len(ex.latents) == 2 for ex in alone)


# ---------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    """llama.cpp's OpenAI-compatible server on the embedded SmolLM2, requiring KEY.

    One thread: on a shared 2-core machine two spinning llama.cpp threads made requests ~20x
    slower (16 s instead of 0.7 s each).
    """
    import llama_cpp  # noqa: F401  (the [autointerp] extra: a missing package fails here, never skips)
    import openai  # noqa: F401

    port = _free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(embedded_gguf_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--n_threads",
            "1",
            "--n_threads_batch",
            "1",
            "--api_key",
            KEY,
            "--verbose",
            "False",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama.cpp server exited: {log_path.read_text()[-2000:]}")
        try:
            request = urllib.request.Request(
                f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}
            )
            with urllib.request.urlopen(request, timeout=2) as answer:
                if answer.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"llama.cpp server did not answer in 90 s: {log_path.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ[KEY_ENV] = KEY
    proc, url = _start_server(tmp_path_factory.mktemp("server") / "server.log")
    yield url
    _stop(proc)
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
    gone = dataclasses.replace(cfg, base_url=f"http://127.0.0.1:{_free_port()}/v1")
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
    # the server requires the key: without it the client is refused, with a message naming the variable
    client = ChatClient(
        server, "smollm2", cache_dir=tmp_path / "other", api_key_env="DM_UNSET_VARIABLE"
    )
    with pytest.raises(EndpointError, match="DM_UNSET_VARIABLE") as err:
        client.complete([{"role": "user", "content": "hi"}], max_tokens=2)
    assert KEY not in str(err.value)


def test_unreachable_endpoint_fails_fast_and_clearly(run_dir, tmp_path, tokenizer):
    url = f"http://127.0.0.1:{_free_port()}/v1"
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
        base_url=f"http://127.0.0.1:{_free_port()}/v1",
        cache_dir=str(cache),
        saes=("topk-w64-k8",),
        **{**FAST, "n_latents": 3, "n_per_quantile": 2, "n_negatives": 3, "batch_size": 4},
    )
    ex = _collect(run_dir, cfg, tokenizer)[0]
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
    ex = _collect(run_dir, cfg, tokenizer)[0]
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
    proc, url = _start_server(tmp_path / "server.log")
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
    _stop(proc)
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
    dead = f"http://127.0.0.1:{_free_port()}/v1"
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
