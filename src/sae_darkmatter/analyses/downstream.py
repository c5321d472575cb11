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
with percentile bootstrap CIs over contexts.

The splice is exact, not an approximation: the decoder layers before the hook replay their
clean outputs (so only the layers from the hook on run again) and the hook module returns the
replacement; the identity splice reproduces the clean logits bit for bit, and the clean loss is
checked against the loss the harvest stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from safetensors.numpy import save_file

from sae_darkmatter import layout
from sae_darkmatter._io import atomic_path
from sae_darkmatter.analyses.downstream_figures import ce_figure, panels, shares_figure
from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.analyses.splice import PER_SAE, SHARED, splice_contexts
from sae_darkmatter.config import DownstreamConfig, ModelConfig, RunConfig, SplitConfig, from_dict
from sae_darkmatter.decompose import SavedDecomposition
from sae_darkmatter.errors import DarkMatterError, HookError
from sae_darkmatter.markup import esc, figures_html
from sae_darkmatter.models import LoadedModel, load_model, logits_batch
from sae_darkmatter.run_dir import RunDir, error_probe
from sae_darkmatter.splits import Splits
from sae_darkmatter.store import ActivationStore

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PARTS = ("err_sq", "linear_sq", "nonlinear_sq")
PER_TOKEN_FILE = f"{layout.DOWNSTREAM}/per_token.safetensors"
SHARES_FIGURE = RunDir.figure_key("downstream_shares")
CE_FIGURE = RunDir.figure_key("downstream_ce")


# ---------------------------------------------------------------------------- statistics


def _stat(v: np.ndarray) -> dict[str, Any]:
    """Row 0 is the point estimate, the rest bootstrap draws: mean and 95 % percentile interval."""
    return {
        "mean": float(v[0]),
        "ci": [float(np.nanpercentile(v[1:], 2.5)), float(np.nanpercentile(v[1:], 97.5))],
    }


def summarize(per_token: Mapping[str, np.ndarray], averaged: np.ndarray, names: list[str], *,
              n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Means with bootstrap CIs over contexts (rows of the ``[n, T]`` arrays).

    CE/KL are averaged over ``averaged`` tokens; squared norms are summed over spliced tokens.
    """
    n = averaged.shape[0]
    w = (
        np.random.default_rng(seed)
        .multinomial(n, np.full(n, 1.0 / n), size=n_boot)
        .astype(np.float64)
    )
    w = np.vstack([np.ones(n), w])  # row 0: the sample itself

    def sums(key: str, mask: np.ndarray = averaged) -> np.ndarray:
        return w @ np.where(mask, per_token[key].astype(np.float64), 0.0).sum(axis=1)

    count, clean = w @ averaged.sum(axis=1), sums("clean/ce")

    def loss_stats(ce: np.ndarray, kl: np.ndarray) -> dict[str, Any]:
        return {
            "ce": _stat(ce / count),
            "ce_increase": _stat((ce - clean) / count),
            "kl": _stat(kl / count),
        }

    out: dict[str, Any] = {"shared": {"clean": {"ce": _stat(clean / count)}}, "saes": {}}
    out["shared"] |= {i: loss_stats(sums(f"shared/{i}/ce"), sums(f"shared/{i}/kl")) for i in SHARED}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name in names:
            ce = {i: sums(f"{name}/{i}/ce") for i in PER_SAE}
            kl = {i: sums(f"{name}/{i}/kl") for i in PER_SAE}
            stats = {i: loss_stats(ce[i], kl[i]) for i in PER_SAE}
            sq = {p: sums(f"{name}/{p}", np.isfinite(per_token[f"{name}/{p}"])) for p in PARTS}
            share = {
                "linear": sq["linear_sq"] / sq["err_sq"],
                "nonlinear": sq["nonlinear_sq"] / sq["err_sq"],
            }
            out["saes"][name] = {
                **{key: {i: stats[i][key] for i in PER_SAE} for key in ("ce", "ce_increase", "kl")},
                "ce_gap_closed": {
                    i: _stat((ce["sae"] - ce[i]) / (ce["sae"] - clean)) for i in PER_SAE
                },
                "kl_gap_closed": {i: _stat((kl["sae"] - kl[i]) / kl["sae"]) for i in PER_SAE},
                "sq_norm_share": {p: _stat(v) for p, v in share.items()},
                "fvu_gap_closed": {
                    "linear": _stat(1 - share["nonlinear"]),
                    "nonlinear": _stat(1 - share["linear"]),
                },
            }
    return out


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
    progress: bool = True,
) -> dict[str, Any]:
    """Splice every chosen SAE of ``run_dir`` into the LM; write per-token values and figures.

    ``lm`` defaults to the harvest's model (from the store's metadata); ``split`` must be the
    run's split config (checked against the decompositions' test rows). Writes
    ``downstream/per_token.safetensors`` and ``figures/downstream_{shares,ce}.png``.
    """
    run, cfg, split = RunDir.of(run_dir), cfg or DownstreamConfig(), split or SplitConfig()
    t0 = time.perf_counter()
    store = run.store
    decs = select_saes(run.decompositions, cfg)
    hook = decs[0].info["metrics"]["hook"]
    splits = run.splits(split, hook=hook)
    if not np.array_equal(splits.probe_test, decs[0].tokens["rows"]):
        raise DarkMatterError(
            "the split settings differ from the run's (probe-test rows do not match "
            "the decompositions); pass the run's SplitConfig"
        )
    tokens = store_contexts(store)
    chosen, spliced, averaged = _choose(splits, tokens.shape, split, cfg)
    lm = lm or load_model(from_dict(ModelConfig, store.meta["config"]["model"]))
    mean_rows = (
        splits.sae_train if splits.sae_train.size else splits.probe_train
    )  # pretrained SAEs: no SAE split
    total = sum(x.double().sum(0) for _, x in store.iter_chunks(hook, mean_rows))
    mean = cast("torch.Tensor", total) / mean_rows.size
    saes = {d.name: (run.open_sae(d, lm.device), error_probe(d)) for d in decs}
    log.info(
        "splicing %d SAE(s) at %s into %d contexts: %d forwards per batch of %d",
        len(saes),
        hook,
        chosen.size,
        len(SHARED) + len(PER_SAE) * len(saes),
        logits_batch(lm, tokens.shape[1], cfg.batch_size),
    )
    t1 = time.perf_counter()
    per_token = splice_contexts(lm, hook, tokens[chosen], chosen, spliced, saes, mean,
                                batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    seconds = time.perf_counter() - t1
    stored = store.column("loss").reshape(tokens.shape)[chosen]
    check = _check(per_token, stored, cfg.loss_tolerance)
    per_token |= {
        "stored_loss": stored,
        "contexts": chosen,
        "spliced": spliced,
        "averaged": averaged,
    }
    with atomic_path(run.path / PER_TOKEN_FILE) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in per_token.items()}, str(tmp))
    summary = summarize(per_token, averaged, list(saes), n_boot=cfg.n_boot, seed=cfg.seed)
    rows = chosen[:, None] * tokens.shape[1] + np.arange(tokens.shape[1])
    result = {
        "hook": hook,
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
        "saes": [
            {
                "name": d.name,
                "width": d.width,
                "k": d.k,
                "l0": d.info["metrics"]["l0"],
                **summary["saes"][d.name],
            }
            for d in decs
        ],
        "per_token_file": PER_TOKEN_FILE,
        "seconds_splice": round(seconds, 2),
        "seconds_per_context": round(seconds / max(chosen.size, 1), 3),
    }
    result["table"] = table(result)
    result["figures"] = {
        "shares": str(shares_figure(result, run.path / SHARES_FIGURE).relative_to(run.path)),
        "ce": str(ce_figure(result, run.path / CE_FIGURE).relative_to(run.path)),
    }
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per SAE: CE increase of x̂, then per part the CE gap closed (with CI) next to
    its FVU gap closed and share of Σ‖e‖², and the CE gap closed by the random controls."""
    rows = []
    for s in result["saes"]:
        row = {"sae": s["name"], "width": s["width"], "k": s["k"], "l0": s["l0"],
               "ce_increase_sae": s["ce_increase"]["sae"]["mean"], "kl_sae": s["kl"]["sae"]["mean"]}
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
    """Seeded evaluation contexts (sorted) and their ``[n, T]`` spliced and averaged masks."""
    n_ctx, t = shape
    evaluation = np.union1d(splits.probe_train, splits.probe_test)
    pool = np.unique(evaluation // t)
    if cfg.n_contexts < 1 or cfg.batch_size < 1:
        raise DarkMatterError("downstream n_contexts and batch_size must be >= 1")
    chosen = np.sort(np.random.default_rng(cfg.seed).permutation(pool)[: cfg.n_contexts])
    kept = np.zeros(n_ctx * t, bool)
    kept[evaluation] = True
    kept = kept.reshape(n_ctx, t)[chosen]
    spliced = kept.copy()
    if cfg.splice_all_after_skip:
        spliced[:, split.filter.kept_positions(t)] = True
    averaged = kept.copy()
    averaged[:, -1] = False
    return chosen.astype(np.int64), spliced, averaged


def _check(
    per_token: Mapping[str, np.ndarray], stored: np.ndarray, tolerance: float
) -> dict[str, Any]:
    """Clean CE vs the stored harvest loss, and the identity splice vs clean (must agree)."""
    clean, ident = per_token["clean/ce"], per_token["shared/x/ce"]
    valid = np.isfinite(stored)
    out = {
        "clean_vs_stored_max_abs": float(np.abs(clean - stored)[valid].max())
        if valid.any()
        else None,
        "identity_vs_clean_max_abs": float(np.nanmax(np.abs(ident - clean))),
        "identity_max_kl": float(np.nanmax(np.abs(per_token["shared/x/kl"]))),
        "tolerance": tolerance,
    }
    if out["clean_vs_stored_max_abs"] is not None and out["clean_vs_stored_max_abs"] > tolerance:
        raise DarkMatterError(
            f"clean CE differs from the harvest's stored loss by up to "
            f"{out['clean_vs_stored_max_abs']:.3g} nats: the model or contexts are not "
            "the ones harvested (load the model with the harvest's ModelConfig)"
        )
    if out["identity_vs_clean_max_abs"] > tolerance:
        raise HookError(
            "the identity splice does not reproduce the clean loss on this architecture"
        )
    return out


# ---------------------------------------------------------------------------- figures


def section(r: dict[str, Any], out_dir: Path) -> str:
    def ci(v: float, c: Any) -> str:
        return f"{v:.2f} <small>[{c[0]:.2f}, {c[1]:.2f}]</small>"

    rows = "".join(
        f"<tr><td>{esc(t['sae'])}</td><td>{t['width']:,}</td><td>{t['l0']:.1f}</td>"
        f"<td>{t['ce_increase_sae']:+.3f}</td>"
        + "".join(
            f"<td>{ci(t[f'ce_gap_closed_{p}'], t[f'ce_gap_closed_{p}_ci'])}</td>"
            f"<td>{t[f'fvu_gap_closed_{p}']:.2f}</td>"
            for p in ("linear", "nonlinear")
        )
        + f"<td>{t['ce_gap_closed_sae+random@error']:.2f}</td></tr>"
        for t in r["table"]
    )
    tok, sh = r["tokens"], r["shared"]
    clean = sh["clean"]["ce"]["mean"]
    ablations = ", ".join(
        f"{name} ablation {sh[key]['ce']['mean']:.3f}"
        for key, name in (("zero", "zero"), ("mean", "mean"))
        if key in sh
    )
    return (
        f"<p>The SAE reconstruction and its parts spliced into the model at {esc(r['hook'])} "
        f"(real forward passes) on {tok['contexts']} evaluation contexts; CE averaged over "
        f"{tok['averaged']:,} tokens. Clean CE {clean:.3f} (equal to the harvest's stored loss: "
        f"max difference {r['check'].get('clean_vs_stored_max_abs') or 0:.1e}); "
        f"{esc(ablations)}. Share of the CE gap of x̂ closed by adding each error part (95 % "
        f"bootstrap over contexts) next to the share of the FVU it closes; the last column adds "
        f"a random vector of ‖e‖ instead.</p>"
        f"<table><tr><th>SAE</th><th>width</th><th>L0</th><th>ΔCE x̂</th><th>CE gap closed "
        f"by ê</th><th>FVU closed by ê</th><th>CE gap closed by e − ê</th><th>FVU closed by "
        f"e − ê</th><th>random ‖e‖</th></tr>{rows}</table>" + figures_html(r["figures"], out_dir)
    )


def _run(run: RunDir, cfg: RunConfig, results: Results, progress: bool) -> dict[str, Any]:
    return downstream_analysis(run, cfg=cfg.downstream, split=cfg.split, progress=progress)


ANALYSIS = Analysis(
    name="downstream",
    title="Downstream loss of each part of the error",
    run=_run,
    section=section,
    settings=lambda cfg, results: (cfg.downstream,),
    enabled=lambda cfg: cfg.downstream.enabled,
)
