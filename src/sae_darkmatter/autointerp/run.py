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

import dataclasses
import logging
import time
from dataclasses import dataclass
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

from sae_darkmatter._io import read_json, write_json
from sae_darkmatter.analyses.downstream import open_run_sae
from sae_darkmatter.analyses.error_saes import TARGETS, error_targets
from sae_darkmatter.autointerp import prompts
from sae_darkmatter.autointerp.client import ChatClient, safe_url
from sae_darkmatter.autointerp.config import AutoInterpConfig
from sae_darkmatter.autointerp.examples import (
    Example,
    ExampleSet,
    LatentExamples,
    PartsFn,
    Windows,
    collect_examples,
    make_windows,
)
from sae_darkmatter.autointerp.figures import detection_figure
from sae_darkmatter.autointerp.scoring import latent_balanced_accuracy, latent_counts, summarize
from sae_darkmatter.config import ModelConfig, RunConfig, TokenFilter, from_dict, to_dict
from sae_darkmatter.decompose import SavedDecomposition, check_sae, load_decompositions
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.models import load_tokenizer
from sae_darkmatter.saes.formats import open_sae
from sae_darkmatter.saes.io import CFG_FILENAME
from sae_darkmatter.saes.registry import REGISTRY_PREFIX
from sae_darkmatter.splits import select_rows
from sae_darkmatter.store import ActivationStore

log = logging.getLogger(__name__)

RESULT_KEY = "autointerp"
LATENTS_FILE = "autointerp/latents.json"
FIGURE = "figures/autointerp.png"
Key = tuple[str, int]  # (SAE label, latent)


@dataclass(frozen=True)
class SAEChoice:
    """An SAE to interpret: its spec for ``open_sae``, its input and (for error SAEs) its base."""

    label: str
    spec: str
    input: str = "x"
    base: str | None = None


def _error_meta(folder: Path, run_dir: Path) -> tuple[str, str] | None:
    """(base SAE, target) of an error SAE folder: from its place in the run, else its cfg.json."""
    try:
        base, target, _ = folder.resolve().relative_to((run_dir / "error_saes").resolve()).parts
        if target in TARGETS:
            return base, target
    except ValueError:
        pass
    meta = (
        read_json(folder / CFG_FILENAME).get("metadata", {})
        if (folder / CFG_FILENAME).is_file()
        else {}
    )
    if meta.get("error_target") in TARGETS and meta.get("base_sae"):
        return str(meta["base_sae"]), str(meta["error_target"])
    return None


def resolve_sae(run_dir: Path, spec: str) -> SAEChoice:
    """An SAE by registry spec, path, or name in the run (``saes/<name>``, ``error_saes/<...>``)."""
    if spec.startswith(REGISTRY_PREFIX):
        return SAEChoice(spec[len(REGISTRY_PREFIX):], spec)
    candidates = [
        Path(spec),
        run_dir / spec,
        run_dir / "saes" / spec,
        run_dir / "error_saes" / spec,
    ]
    folder = next((p for p in candidates if p.is_dir()), None)
    if folder is None:
        raise DarkMatterError(f"no SAE {spec!r}: not a folder, nor one under {run_dir}/saes or "
                              f"{run_dir}/error_saes, nor '{REGISTRY_PREFIX}<release>/<id>'")
    meta = _error_meta(folder, run_dir)
    if meta:
        return SAEChoice(f"{meta[0]}/{meta[1]}/{folder.name}", str(folder), meta[1], meta[0])
    return SAEChoice(folder.name, str(folder))


def _k(folder: Path) -> int | None:
    cfg = read_json(folder / CFG_FILENAME) if (folder / CFG_FILENAME).is_file() else {}
    return cfg.get("k")


def default_saes(run_dir: Path) -> list[str]:
    """The first base SAE with error SAEs, and its error SAEs of one width and k (all three targets).

    Among the names present for e, ê and e − ê: the one with the base SAE's k, else the middle
    one. Without error SAEs: the widest SAE of the run at the median k.
    """
    bases = sorted(p for p in (run_dir / "error_saes").glob("*") if p.is_dir())
    decs = {d.name: d for d in load_decompositions(run_dir / "decompose")}
    for base in bases:
        names = set.intersection(
            *({p.name for p in (base / t).glob("*") if p.is_dir()} for t in TARGETS)
        )
        if not names or base.name not in decs:
            continue
        ordered = sorted(names, key=lambda n: (_k(base / "error" / n) or 0, n))
        pick = next((n for n in ordered if _k(base / "error" / n) == decs[base.name].k),
                    ordered[len(ordered) // 2])
        return [decs[base.name].info["sae"]["path"], *(str(base / t / pick) for t in TARGETS)]
    if not decs:
        raise DarkMatterError(
            f"no decompositions in {run_dir / 'decompose'}; give SAEs with --saes"
        )
    ks = [d.k for d in decs.values() if d.k is not None]
    median = float(np.median(ks)) if ks else 0.0
    best = max(decs.values(), key=lambda d: (d.width, -abs((d.k or 0) - median), d.name))
    return [best.info["sae"]["path"]]


class _RunData:
    """What the SAEs share: the store, its decompositions, windows per hook, the tokenizer."""

    def __init__(self, run_dir: Path, cfg: AutoInterpConfig, tokenizer: Any | None):
        self.run_dir, self.cfg = run_dir, cfg
        self.store = ActivationStore.open(run_dir / "store")
        config_file = run_dir / "run_config.json"
        run_cfg = (
            from_dict(RunConfig, read_json(config_file)) if config_file.is_file() else RunConfig()
        )
        self.filter: TokenFilter = run_cfg.split.filter
        decompose = run_dir / "decompose"
        self.decs = (
            {d.name: d for d in load_decompositions(decompose)} if decompose.is_dir() else {}
        )
        self.tokenizer = tokenizer if tokenizer is not None else self._tokenizer(run_cfg)
        self._windows: dict[str, Windows] = {}

    def _tokenizer(self, run_cfg: RunConfig) -> Any:
        name = (
            self.store.meta.get("config", {}).get("model", {}).get("name")
            or run_cfg.harvest.model.name
        )
        model: ModelConfig = dataclasses.replace(run_cfg.harvest.model, name=name)
        return load_tokenizer(model)

    def windows(self, hook: str) -> Windows:
        if hook not in self._windows:
            rows = select_rows(
                self.store, self.filter, self.store.meta.get("special_token_ids", []), hook=hook
            ).rows
            self._windows[hook] = make_windows(
                self.store,
                rows,
                window=min(self.cfg.window, self.store.context_length),
                explain_fraction=self.cfg.explain_fraction,
                seed=self.cfg.seed,
            )
        return self._windows[hook]

    def base(self, name: str) -> SavedDecomposition:
        if name not in self.decs:
            raise DarkMatterError(
                f"error SAE of {name!r}, but {self.run_dir / 'decompose'} has no decomposition "
                f"of it (have {sorted(self.decs)})"
            )
        return self.decs[name]

    def hook_of(self, choice: SAEChoice, hook_hint: str | None) -> str:
        """The stored hook an SAE reads: its base's for error SAEs, else the one its metadata
        names, else the decompositions', else the store's first."""
        if choice.input != "x":
            return self.base(str(choice.base)).info["metrics"]["hook"]
        hooks = [
            h for h in (hook_hint, *(d.info["metrics"]["hook"] for d in self.decs.values())) if h
        ]
        return next((h for h in hooks if h in self.store.hooks), next(iter(self.store.hooks)))

    def parts(self, hook: str, base: str | None) -> PartsFn:
        """SAE inputs for sorted store rows: ``{"x"}``, or the error parts of ``base`` (e, ê, e − ê)."""
        if base is None:
            return lambda rows: {"x": self.store.gather(hook, rows)}
        dec = self.base(base)
        base_sae = open_run_sae(dec, self.run_dir)
        return lambda rows: error_targets(
            self.store, hook, rows, base_sae, dec, chunk_rows=self.cfg.chunk_rows
        )


# ---------------------------------------------------------------------------- the LLM steps


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
    """The judge's verdict per snippet of ``batch``; one corrective retry; None if still unparsable."""
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
    """The config as stored: the URL without credentials; the key's variable name, never its value."""
    return {**to_dict(cfg), "base_url": safe_url(cfg.base_url)}


def _collect_all(data: _RunData, choices: list[SAEChoice], cfg: AutoInterpConfig,
                 bar: Progress) -> tuple[dict[str, ExampleSet], dict[str, str]]:
    """Examples of every chosen SAE (SAEs computed from the same inputs together), and their hooks."""
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

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    client = ChatClient(
        cfg.base_url,
        cfg.model,
        cache_dir=cfg.cache_dir or run_dir / "autointerp" / "cache",
        api_key_env=cfg.api_key_env,
        concurrency=cfg.concurrency,
        max_retries=cfg.max_retries,
        timeout_s=cfg.timeout_s,
        connect_timeout_s=cfg.connect_timeout_s,
    )
    data = _RunData(run_dir, cfg, tokenizer)
    choices = [resolve_sae(run_dir, s) for s in (cfg.saes or default_saes(run_dir))]
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
    write_json(run_dir / LATENTS_FILE, {"model": cfg.model, "saes": records})
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
        "autointerp": str(detection_figure(result, run_dir / FIGURE).relative_to(run_dir))
    }
    result["seconds"] = round(time.perf_counter() - t0, 2)
    _save(run_dir, result, write_report)
    return result


def _save(run_dir: Path, result: dict[str, Any], write_report: Any) -> None:
    """Merge the result into ``analyses.json``; refresh metrics.json and report.html if possible."""
    path = run_dir / "analyses.json"
    analyses = read_json(path) if path.is_file() else {}
    analyses[RESULT_KEY] = result
    write_json(path, analyses)
    try:
        write_report(run_dir / "decompose", run_dir)
    except DarkMatterError as err:
        log.warning("report not refreshed: %s", err)
