"""Downstream cross-entropy of SAE error parts (paper Fig. 9), spliced in by ``analyses.splice``.

For chosen evaluation contexts of a run (never SAE-training contexts), the real model runs
clean once per batch and then once per intervention with the hook's output replaced at the
spliced positions (by default exactly the tokens the run's ``TokenFilter`` keeps; earlier
positions, special tokens and norm outliers keep their clean activation). Interventions:

- shared: ``x`` (identity: must reproduce the clean loss), ``zero`` and ``mean`` ablation
  (mean over the run's SAE-training tokens);
- per SAE: ``sae`` (x̂), ``sae+linear`` (x̂ + ê), ``sae+nonlinear`` (x̂ + e − ê) and the
  random-direction controls ``sae+random@error`` (x̂ + ‖e‖·u), ``sae+linear+random@nonlinear``
  (x̂ + ê + ‖e − ê‖·u) and ``sae+nonlinear+random@linear`` (x̂ + e − ê + ‖ê‖·u), with ``u`` a
  seeded isotropic unit vector per token (one per (context, position), shared by all SAEs).

Per token: next-token CE and KL(clean ‖ spliced) over the vocabulary. Averages cover the kept
tokens of the chosen contexts except the last position (no next token). "Gap closed" by an
intervention is (CE(x̂) − CE(i)) / (CE(x̂) − CE(x)); it is reported next to each error part's
share of Σ‖e‖² and its "FVU gap closed" (1 − Σ‖other part‖²/Σ‖e‖², the paper's "R² recovered"),
with percentile bootstrap CIs over contexts (``downstream_stats``). Every intervention runs on
the first ``n_contexts`` contexts; SAEs whose gap-closed intervals are still wider than the
target then get more contexts for x̂, x̂ + ê and x̂ + (e − ê) only (``DownstreamConfig``).

The splice is exact, not an approximation: the decoder layers before the hook replay their
clean outputs (so only the layers from the hook on run again) and the hook module returns the
replacement; the identity splice reproduces the clean logits bit for bit, and the clean loss is
checked against a reference: the loss the harvest stored, or, for a store harvested without it
(the default), the loss of the model's plain forward pass on the chosen contexts, whose
activations at the hook must then equal the stored ones (so the model is the one harvested).

``of="transcoders"`` splices the run's transcoders instead: ŷ, ŷ + ê and ŷ + (e − ê) (and the
controls) replace the MLP's output (``mlp_out.L``), computed from its input (``mlp_in.L``) of
the same clean forward; the probe ê reads that input, as in their decomposition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.numpy import save_file

from sae_darkmatter import layout
from sae_darkmatter._io import atomic_path
from sae_darkmatter.analyses.downstream_checks import check_losses, reference_loss
from sae_darkmatter.analyses.downstream_figures import (
    ce_figure,
    kind_slices,
    panels,
    section,
    shares_figure,
)
from sae_darkmatter.analyses.downstream_stats import summarize, unfinished
from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.analyses.splice import PER_SAE, SHARED, Replacer, splice_contexts
from sae_darkmatter.analyses.transcoders import trained_k
from sae_darkmatter.config import DownstreamConfig, ModelConfig, RunConfig, SplitConfig, from_dict
from sae_darkmatter.decompose import SavedDecomposition
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.models import LoadedModel, load_model, logits_batch
from sae_darkmatter.run_dir import RunDir, error_probe
from sae_darkmatter.splits import Splits
from sae_darkmatter.store import ActivationStore

log = logging.getLogger(__name__)

PER_TOKEN_FILE = f"{layout.DOWNSTREAM}/per_token.safetensors"
SHARES_FIGURE = RunDir.figure_key("downstream_shares")
CE_FIGURE = RunDir.figure_key("downstream_ce")
TRANSCODER_PER_TOKEN_FILE = f"{layout.DOWNSTREAM}/transcoders_per_token.safetensors"
OF = ("saes", "transcoders")
VERSION = 2  # part of the cache key: 2 added the stopping rule, contexts in splice order


@dataclass(frozen=True)
class _Target:
    """What one downstream analysis splices where: decompositions of SAEs (``source`` None) or
    of transcoders reading ``source``, replacing the activations at ``hook``."""

    of: str
    decs: list[SavedDecomposition]
    hook: str
    source: str | None
    per_token_file: str
    figures: tuple[str, str]  # shares, CE

    @classmethod
    def of_run(cls, run: RunDir, cfg: DownstreamConfig, of: str) -> _Target:
        if of == "saes":
            decs = select_saes(run.decompositions, cfg)
            return cls(of, decs, decs[0].info["metrics"]["hook"], None, PER_TOKEN_FILE,
                       (SHARES_FIGURE, CE_FIGURE))
        if of != "transcoders":
            raise DarkMatterError(f"downstream splices one of {list(OF)}, got {of!r}")
        decs = run.transcoder_decompositions
        if not decs:
            raise DarkMatterError(f"{run.path} has no transcoder decompositions (run with "
                                  "--transcoders or [transcoders] enabled = true)")
        pairs = sorted({(d.info["transcoder"]["hook_in"], d.info["transcoder"]["hook_out"])
                        for d in decs})
        if len(pairs) > 1:
            raise DarkMatterError(f"the run's transcoders map different hooks {pairs}; the "
                                  "downstream splice takes one pair of hooks")
        (source, hook), = pairs
        return cls(of, decs, hook, source, TRANSCODER_PER_TOKEN_FILE,
                   (RunDir.figure_key("downstream_transcoders_shares"),
                    RunDir.figure_key("downstream_transcoders_ce")))

    def open(self, run: RunDir, d: SavedDecomposition, device: torch.device) -> Replacer:
        return run.open_sae(d, device) if self.source is None else run.open_transcoder(d, device)

    def describe(self, d: SavedDecomposition) -> dict[str, Any]:
        """A result row's identity: name, width, k (a transcoder's: as trained), L0, skip."""
        if self.source is None:
            return {"name": d.name, "width": d.width, "k": d.k, "l0": d.info["metrics"]["l0"]}
        return {"name": d.name, "width": d.width, "k": trained_k(d),
                "l0": d.info["metrics"]["l0"], "skip": bool(d.info["transcoder"]["skip"])}


def select_saes(decs: list[SavedDecomposition], cfg: DownstreamConfig) -> list[SavedDecomposition]:
    """The decompositions ``cfg`` asks for (see ``DownstreamConfig``), in sweep order."""
    names = [d.name for d in decs]
    if cfg.saes:
        missing = sorted(set(cfg.saes) - set(names))
        if missing:
            raise DarkMatterError(f"no decomposition for {missing}; available: {names}")
        return [d for d in decs if d.name in cfg.saes]
    if cfg.select not in ("all", "cross"):
        raise DarkMatterError(f"downstream select must be 'all' or 'cross', got {cfg.select!r}")
    if cfg.select == "all":
        return decs
    items = [
        {"name": d.name, "width": d.width, "k": d.k, "l0": d.info["metrics"]["l0"]} for d in decs
    ]
    chosen = {s["name"] for _, group in panels(items) for s in group}
    return [d for d in decs if d.name in chosen]


def store_contexts(store: ActivationStore) -> np.ndarray:
    """Token ids ``[n_contexts, T]`` of every stored context (row ``c·T + t`` is
    position t of c)."""
    t = store.context_length
    tokens, context, position = (store.column(c) for c in ("tokens", "context", "position"))
    n = tokens.size // t
    if (tokens.size % t or not np.array_equal(context, np.repeat(np.arange(n), t))
            or not np.array_equal(position, np.tile(np.arange(t), n))):
        raise DarkMatterError(
            f"{store.path}: rows are not whole contexts in order; cannot rebuild them"
        )
    return tokens.reshape(n, t)


def downstream_analysis(
    run_dir: RunDir | str | Path,
    *,
    lm: LoadedModel | None = None,
    cfg: DownstreamConfig | None = None,
    split: SplitConfig | None = None,
    device: str | None = None,
    progress: bool = True,
    of: str = "saes",
) -> dict[str, Any]:
    """Splice every chosen SAE (``of="transcoders"``: every transcoder) of ``run_dir`` into the
    LM; write per-token values and figures.

    ``lm`` defaults to the harvest's model (from the store's metadata), loaded on ``device``
    (default: the harvest's; a run harvested on a GPU can be analysed elsewhere); ``split`` must
    be the run's split config (checked against the decompositions' test rows). The clean CE of
    the first round is checked against ``reference_loss`` (the stored loss, or the plain
    forward's for a store without it); ``cfg``'s stopping rule may add contexts after it.
    Writes ``downstream/per_token.safetensors`` (``reference_loss`` beside the CE/KL arrays, its
    source in the file's metadata) and ``figures/downstream_{shares,ce}.png``; for transcoders
    ``downstream/transcoders_per_token.safetensors`` and ``downstream_transcoders_*.png``, and
    the result's ``saes`` lists the transcoders (``cfg.saes``/``select`` choose SAEs only).
    """
    run, cfg, split = RunDir.of(run_dir), cfg or DownstreamConfig(), split or SplitConfig()
    t0 = time.perf_counter()
    target = _Target.of_run(run, cfg, of)
    decs, hook, store = target.decs, target.hook, run.store
    # transcoders were decomposed on the SAEs' tokens: the run's splits of its first hook
    splits = run.splits(split, hook=hook if target.source is None else None)
    if not np.array_equal(splits.probe_test, decs[0].tokens["rows"]):
        raise DarkMatterError(
            "the split settings differ from the run's (probe-test rows do not match "
            "the decompositions); pass the run's SplitConfig"
        )
    tokens = store_contexts(store)
    order, spliced, averaged = _choose(splits, tokens.shape, split, cfg)
    first = order[: cfg.n_contexts]
    if lm is None:
        harvested = from_dict(ModelConfig, store.meta["config"]["model"])
        lm = load_model(replace(harvested, device=device or harvested.device))
    t1 = time.perf_counter()
    reference, check = reference_loss(store, lm, hook, tokens, first, cfg.batch_size)
    seconds_reference = time.perf_counter() - t1
    mean_rows = (
        splits.sae_train if splits.sae_train.size else splits.probe_train
    )  # pretrained SAEs: no SAE split
    total = sum(x.double().sum(0) for _, x in store.iter_chunks(hook, mean_rows))
    mean = cast("torch.Tensor", total) / mean_rows.size
    saes = {d.name: (target.open(run, d, lm.device), error_probe(d)) for d in decs}
    log.info(
        "splicing %d %s at %s into %d contexts: %d forwards per batch of %d",
        len(saes),
        target.of,
        hook,
        first.size,
        len(SHARED) + len(PER_SAE) * len(saes),
        logits_batch(lm, tokens.shape[1], cfg.batch_size),
    )
    t1 = time.perf_counter()
    per_token = splice_contexts(lm, hook, tokens[first], first, spliced[: first.size], saes, mean,
                                source=target.source, batch_size=cfg.batch_size, seed=cfg.seed,
                                progress=progress)
    seconds = time.perf_counter() - t1
    check |= check_losses(per_token, reference, cfg.loss_tolerance, check["reference"])
    per_token, used = _more_contexts(per_token, cfg, averaged, saes, lambda lo, hi, chosen: (
        splice_contexts(lm, hook, tokens[order[lo:hi]], order[lo:hi], spliced[lo:hi], chosen,
                        mean, source=target.source, batch_size=cfg.batch_size, seed=cfg.seed,
                        everything=False, progress=progress)))
    seconds_more = time.perf_counter() - t1 - seconds
    chosen = order[: max(used.values())]
    spliced, averaged = spliced[: chosen.size], averaged[: chosen.size]
    per_token |= {
        # what the clean CE was checked against (see "reference"): the first round's contexts
        "reference_loss": np.vstack([reference, np.full((chosen.size - first.size, tokens.shape[1]),
                                                        np.nan, np.float32)]),
        "contexts": chosen,
        "spliced": spliced,
        "averaged": averaged,
    }
    with atomic_path(run.path / target.per_token_file) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in per_token.items()}, str(tmp),
                  metadata={"reference": check["reference"]})
    summary = summarize(per_token, averaged, list(saes), first=first.size, contexts=used,
                        n_boot=cfg.n_boot, seed=cfg.seed)
    rows = chosen[:, None] * tokens.shape[1] + np.arange(tokens.shape[1])
    result = {
        "hook": hook,
        "replaces": "SAE" if target.source is None else "transcoder",
        **({} if target.source is None else {"source": target.source}),
        "model": lm.name,
        "contexts": chosen.tolist(),
        "tokens": {
            "contexts": int(chosen.size),
            "positions": int(rows.size),
            "spliced": int(spliced.sum()),
            "averaged": int(averaged.sum()),
            "averaged_probe_train": int(np.isin(rows[averaged], splits.probe_train).sum()),
            "averaged_probe_test": int(np.isin(rows[averaged], splits.probe_test).sum()),
            "note": "CE/KL are averaged over the kept tokens (TokenFilter) of evaluation contexts, "
            "last position excluded; the error probes were fit on the probe-train tokens "
            "among them",
        },
        "check": check,
        "config": asdict(cfg),
        "mean_ablation_tokens": int(mean_rows.size),
        "shared": summary["shared"],
        "saes": [target.describe(d) | summary["saes"][d.name] for d in decs],
        "target": _target(summary, cfg, first.size, order.size),
        "per_token_file": target.per_token_file,
        "seconds_splice": round(seconds + seconds_more, 2),
        "seconds_first_round": round(seconds, 2),
        "seconds_reference": round(seconds_reference, 2),
        "seconds_per_context": round(seconds / max(first.size, 1), 3),  # every intervention
    }
    result["table"] = table(result)
    slices = None if target.source is None else kind_slices(result["saes"])
    shares, ce = (run.path / key for key in target.figures)
    result["figures"] = {
        "shares": str(shares_figure(result, shares, slices).relative_to(run.path)),
        "ce": str(ce_figure(result, ce).relative_to(run.path)),
    }
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per SAE: its contexts, CE increase of x̂, the paired difference of the CE gap
    closed by the two parts, then per part the CE gap closed (with CI) next to its FVU gap
    closed and share of Σ‖e‖², and the CE gap closed by the random controls."""
    rows = []
    for s in result["saes"]:
        diff = s["ce_gap_closed_linear_minus_nonlinear"]
        row = {"sae": s["name"], "width": s["width"], "k": s["k"], "l0": s["l0"],
               "contexts": s["contexts"], "ce_increase_sae": s["ce_increase"]["sae"]["mean"],
               "kl_sae": s["kl"]["sae"]["mean"],
               "ce_gap_closed_linear_minus_nonlinear": diff["mean"],
               "ce_gap_closed_linear_minus_nonlinear_ci": diff["ci"]}
        for part in ("linear", "nonlinear"):
            gap = s["ce_gap_closed"][f"sae+{part}"]
            row |= {f"ce_gap_closed_{part}": gap["mean"], f"ce_gap_closed_{part}_ci": gap["ci"],
                    f"fvu_gap_closed_{part}": s["fvu_gap_closed"][part]["mean"],
                    f"sq_norm_share_{part}": s["sq_norm_share"][part]["mean"]}
        rows.append(
            row | {f"ce_gap_closed_{k}": s["ce_gap_closed"][k]["mean"] for k in PER_SAE[3:]}
        )
    return rows


def _choose(splits: Splits, shape: tuple[int, int], split: SplitConfig,
            cfg: DownstreamConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The evaluation contexts in their seeded splice order (as many as ``cfg`` may use) and
    their ``[n, T]`` spliced and averaged masks."""
    n_ctx, t = shape
    evaluation = np.union1d(splits.probe_train, splits.probe_test)
    pool = np.unique(evaluation // t)
    limit = cfg.n_contexts if cfg.target_half_width is None else cfg.max_contexts
    order = np.random.default_rng(cfg.seed).permutation(pool)[:limit]
    kept = np.zeros(n_ctx * t, bool)
    kept[evaluation] = True
    kept = kept.reshape(n_ctx, t)[order]
    spliced = kept.copy()
    if cfg.splice_all_after_skip:
        spliced[:, split.filter.kept_positions(t)] = True
    averaged = kept.copy()
    averaged[:, -1] = False
    return order.astype(np.int64), spliced, averaged


Splice = Callable[[int, int, Mapping[str, Any]], dict[str, np.ndarray]]


def _more_contexts(per_token: dict[str, np.ndarray], cfg: DownstreamConfig, averaged: np.ndarray,
                   saes: Mapping[str, Any],
                   splice: Splice) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The stopping rule: after the first round (``per_token``, every intervention), rounds of
    ``cfg.batch_size`` more contexts run ``MAIN`` for each SAE whose ``TARGETED`` half-widths
    are not yet all at most ``cfg.target_half_width``, while contexts remain (``averaged`` has
    a row per context allowed). ``splice(lo, hi, saes)`` splices rows ``lo:hi``. Returns the
    per-token arrays (NaN where not spliced) and how many leading rows each SAE covers."""
    first = next(iter(per_token.values())).shape[0]
    used = {s: first for s in saes}
    if cfg.target_half_width is None:
        return per_token, used
    n, lo = averaged.shape[0], first
    out = {k: np.vstack([v, np.full((n - first, v.shape[1]), np.nan, v.dtype)])
           for k, v in per_token.items()}
    while lo < n:
        summary = summarize(out, averaged, [s for s, m in used.items() if m == lo], first=first,
                            contexts=used, n_boot=cfg.n_boot, seed=cfg.seed)
        todo = unfinished(summary, cfg.target_half_width)
        if not todo:
            break
        hi = min(lo + cfg.batch_size, n)
        log.info("downstream: %d more contexts for %d SAE(s) above the target half-width",
                 hi - lo, len(todo))
        for key, v in splice(lo, hi, {s: saes[s] for s in todo}).items():
            out[key][lo:hi] = v
        used |= {s: hi for s in todo}
        lo = hi
    return {k: v[: max(used.values())] for k, v in out.items()}, used


def _target(summary: Mapping[str, Any], cfg: DownstreamConfig, first: int,
            allowed: int) -> dict[str, Any]:
    """What the stopping rule did: its settings, the contexts it could use (``max_contexts`` or
    fewer in the run), the widest half-width and whether every SAE met the target."""
    widths = [h for s in summary["saes"].values() for h in s["half_width"].values()]
    widest = float(np.max(widths)) if widths else float("nan")  # NaN (undefined gap) wins
    met = None if cfg.target_half_width is None else bool(widest <= cfg.target_half_width)
    return {"half_width": cfg.target_half_width, "max_contexts": cfg.max_contexts,
            "first_round": first, "contexts_allowed": allowed, "widest_half_width": widest,
            "met": met}


def _run(run: RunDir, cfg: RunConfig, results: Results, progress: bool) -> dict[str, Any]:
    return downstream_analysis(run, cfg=cfg.downstream, split=cfg.split,
                               device=cfg.harvest.model.device, progress=progress)


ANALYSIS = Analysis(
    name="downstream",
    title="Downstream loss of each part of the error",
    run=_run,
    section=section,
    settings=lambda cfg, results: (cfg.downstream, VERSION),
    enabled=lambda cfg: cfg.downstream.enabled,
)
