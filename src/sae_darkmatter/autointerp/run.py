"""Auto-interpretability of a run's SAEs: explain latents, score the explanations by detection.

``autointerp_run(run_dir, cfg)``: for each chosen SAE (by default the run's error SAEs trained on
e, ê and e − ê for one width and k, plus their base SAE), sample latents and collect example
windows (``examples``), ask the explainer for one explanation per latent from its top
explanation windows, then ask the judge which held-out snippets (per activation quantile, plus
silent windows) activate the latent. Error SAEs see what they were trained on: the base SAE's
error parts, computed from x with the base SAE and the decomposition's error probe.

Writes ``<run>/autointerp/latents.json`` (examples, explanations and verdicts per latent),
``<run>/figures/autointerp.png``, the ``"autointerp"`` entry of ``<run>/analyses.json``, and
refreshes ``metrics.json`` / ``report.html``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from sae_darkmatter import layout
from sae_darkmatter._io import read_json, write_json
from sae_darkmatter.autointerp import prompts
from sae_darkmatter.autointerp.choose import RunData, SAEChoice, default_saes, resolve_sae
from sae_darkmatter.autointerp.client import ChatClient, safe_url
from sae_darkmatter.autointerp.config import AutoInterpConfig
from sae_darkmatter.autointerp.examples import (
    Example,
    ExampleSet,
    LatentExamples,
    collect_examples,
)
from sae_darkmatter.autointerp.figures import detection_figure
from sae_darkmatter.autointerp.scoring import latent_balanced_accuracy, latent_counts, summarize
from sae_darkmatter.config import to_dict
from sae_darkmatter.decompose import check_sae
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.run_dir import RunDir
from sae_darkmatter.saes.formats import open_sae

log = logging.getLogger(__name__)

RESULT_KEY = "autointerp"
LATENTS_FILE = f"{layout.AUTOINTERP}/latents.json"
FIGURE = f"{layout.FIGURES}/autointerp.png"
Key = tuple[str, int]  # (SAE label, latent)


def explain(client: ChatClient, cfg: AutoInterpConfig, latent: LatentExamples) -> str | None:
    """One explanation from the highlighted top windows; one corrective retry if unparsable."""
    messages = prompts.explanation_messages([e.highlighted for e in latent.explain])
    params = {
        "max_tokens": cfg.explain_max_tokens,
        "temperature": cfg.temperature,
        "response_format": prompts.response_format(
            cfg.response_format, prompts.EXPLAIN_SCHEMA, "explanation"
        ),
    }
    answer = client.complete(messages, **params)
    parsed = prompts.parse_explanation(answer)
    if parsed is None:
        retry = prompts.retry_messages(messages, answer, prompts.EXPLAIN_RETRY)
        parsed = prompts.parse_explanation(client.complete(retry, **params))
    return parsed


def detect(
    client: ChatClient, cfg: AutoInterpConfig, explanation: str, batch: list[Example]
) -> list[bool] | None:
    """The judge's verdict per snippet of ``batch``; one corrective retry; None if still
    unparsable."""
    messages = prompts.detection_messages(explanation, [e.text for e in batch])
    params = {
        "max_tokens": cfg.detect_max_tokens,
        "temperature": cfg.temperature,
        "response_format": prompts.response_format(
            cfg.response_format, prompts.DETECT_SCHEMA, "detection"
        ),
    }
    answer = client.complete(messages, **params)
    parsed = prompts.parse_detection(answer, len(batch))
    if parsed is None:
        retry = prompts.retry_messages(messages, answer, prompts.DETECT_RETRY)
        parsed = prompts.parse_detection(client.complete(retry, **params), len(batch))
    return parsed


def batches(latent: LatentExamples, cfg: AutoInterpConfig) -> list[list[Example]]:
    """The latent's scored windows in a seeded shuffled order, ``batch_size`` per prompt."""
    order = np.random.default_rng([cfg.seed, latent.latent, 7]).permutation(len(latent.scored))
    shuffled = [latent.scored[i] for i in order]
    return [shuffled[i : i + cfg.batch_size] for i in range(0, len(shuffled), cfg.batch_size)]


def _bar(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not enabled)


def _example(e: Example, verdict: bool | None = None) -> dict[str, Any]:
    out = {"window": e.window, "quantile": e.quantile, "activation": round(e.activation, 5),
           "text": e.highlighted if e.quantile < 0 else e.text}
    return out if e.quantile < 0 else {**out, "judged_active": verdict}


def _score_sae(choice: SAEChoice, ex: ExampleSet, hook: str, explanations: dict[Key, str | None],
               verdicts: dict[Key, list[list[bool] | None]], cfg: AutoInterpConfig,
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Summary (for analyses.json) and per-latent records (for latents.json) of one SAE."""
    records, correct, total = [], [], []
    unparsable_snippets = 0
    for le in ex.latents:
        explanation = explanations[(choice.label, le.latent)]
        record: dict[str, Any] = {"latent": le.latent, "explanation": explanation,
                                  "active_windows": {"explain": le.active_windows_explain,
                                                     "score": le.active_windows_score},
                                  "explain_examples": [_example(e) for e in le.explain]}
        if explanation is None:
            records.append({**record, "status": "unparsable explanation"})
            continue
        judged, shown = [], []
        for batch, said in zip(batches(le, cfg), verdicts[(choice.label, le.latent)]):
            if said is None:
                unparsable_snippets += len(batch)
            shown += [
                _example(e, None if said is None else s)
                for e, s in zip(batch, said or [None] * len(batch))
            ]
            judged += [] if said is None else [(max(e.quantile, 0), s) for e, s in zip(batch, said)]
        c, t = latent_counts(judged, cfg.n_quantiles)
        correct.append(c)
        total.append(t)
        records.append(
            {
                **record,
                "status": "scored",
                "correct": c.tolist(),
                "total": t.tolist(),
                "balanced_accuracy": latent_balanced_accuracy(c, t),
                "scored_examples": shown,
            }
        )
    q = cfg.n_quantiles + 1
    detection = summarize(np.array(correct).reshape(-1, q), np.array(total).reshape(-1, q),
                          n_boot=cfg.n_boot, seed=cfg.seed)
    n_unexplained = sum(r["explanation"] is None for r in records)
    summary = {
        "label": choice.label,
        "sae": choice.spec,
        "input": choice.input,
        "base": choice.base,
        "d_sae": ex.d_sae,
        "hook": hook,
        "latents": {
            "requested": cfg.n_latents,
            "sampled": len(ex.latents),
            "scored": len(correct),
            "unparsable_explanations": n_unexplained,
            "dead": ex.n_dead,
            "too_rare": ex.n_rare,
        },
        "snippets": {
            "judged": int(np.sum(total)) if total else 0,
            "unparsable": unparsable_snippets,
        },
        "detection": detection,
        "explanations": [
            {
                "latent": r["latent"],
                "explanation": r["explanation"],
                "balanced_accuracy": r.get("balanced_accuracy"),
            }
            for r in records[:5]
        ],
    }
    return summary, records


def _settings(cfg: AutoInterpConfig) -> dict[str, Any]:
    """The config as stored: the URL without credentials; the key's variable name, never its
    value."""
    return {**to_dict(cfg), "base_url": safe_url(cfg.base_url)}


def _collect_all(data: RunData, choices: list[SAEChoice], cfg: AutoInterpConfig,
                 bar: Progress) -> tuple[dict[str, ExampleSet], dict[str, str]]:
    """Examples of every chosen SAE (SAEs computed from the same inputs together), and their
    hooks."""
    loaded = {c.label: open_sae(c.spec) for c in choices}
    hooks: dict[str, str] = {}
    groups: dict[tuple[str, str | None], list[SAEChoice]] = {}
    for c in choices:
        sae = loaded[c.label].sae
        hook = hooks[c.label] = data.hook_of(c, loaded[c.label].provenance.get("hook_name"))
        check_sae(c.label, sae, data.store, hook)
        groups.setdefault((hook, None if c.input == "x" else c.base), []).append(c)
    sets: dict[str, ExampleSet] = {}
    task = bar.add_task("examples", total=len(choices))
    for (hook, base), members in groups.items():
        found = collect_examples([(loaded[c.label].sae.eval(), c.input) for c in members],
                                 data.parts(hook, base), data.windows(hook), cfg, data.tokenizer)
        for c, ex in zip(members, found, strict=True):
            sets[c.label] = ex
            log.info(
                "%s: %d latents sampled (%d dead, %d too rare skipped)",
                c.label,
                len(ex.latents),
                ex.n_dead,
                ex.n_rare,
            )
        bar.advance(task, len(members))
    return sets, hooks


def _ask(client: ChatClient, cfg: AutoInterpConfig, sets: dict[str, ExampleSet],
         bar: Progress) -> tuple[dict[Key, str | None], dict[Key, list[list[bool] | None]]]:
    """All explanations, then all detection batches, ``cfg.concurrency`` requests at a time."""
    jobs = [(label, le) for label, ex in sets.items() for le in ex.latents]
    task = bar.add_task("explanations", total=len(jobs))
    found = client.map(
        lambda job: explain(client, cfg, job[1]), jobs, on_done=lambda: bar.advance(task)
    )
    explanations = {(label, le.latent): e for (label, le), e in zip(jobs, found, strict=True)}
    work = [
        ((label, le.latent), b)
        for label, le in jobs
        if explanations[(label, le.latent)] is not None
        for b in batches(le, cfg)
    ]
    task = bar.add_task("detection", total=len(work))
    said = client.map(
        lambda w: detect(client, cfg, explanations[w[0]], w[1]),
        work,
        on_done=lambda: bar.advance(task),
    )
    verdicts: dict[Key, list[list[bool] | None]] = {}
    for (key, _), v in zip(work, said, strict=True):
        verdicts.setdefault(key, []).append(v)
    return explanations, verdicts


def autointerp_run(run_dir: str | Path, cfg: AutoInterpConfig, *, tokenizer: Any | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Explain and detection-score latents of a run's SAEs; returns the ``analyses.json`` entry.

    ``tokenizer`` defaults to the run's model's. Raises ``EndpointError`` when the endpoint cannot
    be reached or refuses; answers received until then stay cached, so a rerun resumes.
    """
    from sae_darkmatter.report import write_report

    run = RunDir(run_dir)
    t0 = time.perf_counter()
    client = ChatClient(
        cfg.base_url,
        cfg.model,
        cache_dir=cfg.cache_dir or run.autointerp_path / "cache",
        api_key_env=cfg.api_key_env,
        concurrency=cfg.concurrency,
        max_retries=cfg.max_retries,
        timeout_s=cfg.timeout_s,
        connect_timeout_s=cfg.connect_timeout_s,
    )
    data = RunData(run, cfg, tokenizer)
    choices = [resolve_sae(run.path, s) for s in (cfg.saes or default_saes(run))]
    if len({c.label for c in choices}) < len(choices):
        raise DarkMatterError(f"two SAEs share a label: {[c.label for c in choices]}")
    with _bar(progress) as bar:
        sets, hooks = _collect_all(data, choices, cfg, bar)
        t_llm = time.perf_counter()
        explanations, verdicts = _ask(client, cfg, sets, bar)
    llm_seconds = time.perf_counter() - t_llm
    summaries, records = [], {}
    for c in choices:
        summary, records[c.label] = _score_sae(
            c, sets[c.label], hooks[c.label], explanations, verdicts, cfg
        )
        summaries.append(summary)
    write_json(run.path / LATENTS_FILE, {"model": cfg.model, "saes": records})
    sent = client.requests_sent
    result: dict[str, Any] = {
        "model": cfg.model,
        "base_url": safe_url(cfg.base_url),
        "saes": summaries,
        "requests": {
            "sent": sent,
            "from_cache": client.cache_hits,
            "llm_seconds": round(llm_seconds, 2),
            "sent_per_second": round(sent / llm_seconds, 3) if sent else None,
        },
        "latents_file": LATENTS_FILE,
        "settings": _settings(cfg),
    }
    result["figures"] = {
        "autointerp": str(detection_figure(result, run.path / FIGURE).relative_to(run.path))
    }
    result["seconds"] = round(time.perf_counter() - t0, 2)
    _save(run, result, write_report)
    return result


def _save(run: RunDir, result: dict[str, Any], write_report: Any) -> None:
    """Merge the result into ``analyses.json``; refresh metrics.json and report.html if possible."""
    path = run.analyses_path
    analyses = read_json(path) if path.is_file() else {}
    analyses[RESULT_KEY] = result
    write_json(path, analyses)
    try:
        write_report(run)
    except DarkMatterError as err:
        log.warning("report not refreshed: %s", err)
