"""Is one hook's SAE error predictable from other components' SAE outputs? (paper §8, Fig. 10b)

A store holds several hooks of the same tokens (e.g. ``resid_post.L-1``, ``attn_out.L``,
``mlp_out.L``, ``resid_post.L``), with one SAE per hook. At the target hook the SAE error
``e = x − x̂`` is split as in ``decompose``: ``ê = [x, 1]·W`` fit on the probe-train tokens (its
linear part) and ``e − ê`` (its nonlinear part). Each *predictor set* is a list of features,
``"recon:<hook>"`` (that hook's SAE reconstruction) or ``"act:<hook>"`` (its activations). By
default: every source's reconstruction alone, all of them together, each other source's
reconstruction with the target's x, all others with x, and x alone. Each set is mapped linearly
(with bias; float64 streaming least squares on probe-train tokens) to e, ê and e − ê, and scored
on the probe-test tokens (R² pooled and mean over dimensions, centred on the test mean).

"How much nonlinear error remains": FVU_nonlinear of the target SAE (Σ‖e − ê‖² / Σ‖x − x̄‖²)
before and after adding a set's prediction of e − ê to the reconstruction. The best set is
picked on the same held-out tokens, so its remaining share is slightly optimistic.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from sae_darkmatter._io import read_json, resolve_device
from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.config import CrossLayerConfig, RunConfig, SplitConfig
from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.linalg import R2Accumulator, StreamingLstsq
from sae_darkmatter.markup import esc, figures_html
from sae_darkmatter.plotting import plt, save_figure
from sae_darkmatter.run_dir import RunDir
from sae_darkmatter.saes import SAE
from sae_darkmatter.splits import Splits
from sae_darkmatter.store import ActivationStore

FIGURE = RunDir.figure_key("cross_layer")
TARGETS = ("error", "linear", "nonlinear")  # e, ê, e − ê


def default_predictors(target: str, sources: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Predictor sets: each source alone, all together, each other source + x, all others + x, x.

    A set with both the target's reconstruction and x is left out: it predicts e exactly.
    """
    x = f"act:{target}"
    sets: dict[str, tuple[str, ...]] = {h: (f"recon:{h}",) for h in sources}
    if len(sources) > 1:
        sets["all SAE outputs"] = tuple(f"recon:{h}" for h in sources)
    others = [h for h in sources if h != target]
    sets |= {f"{h} + x": (f"recon:{h}", x) for h in others}
    if len(others) > 1:
        sets["all others + x"] = (*(f"recon:{h}" for h in others), x)
    sets["x"] = (x,)
    return sets


def _parse(feature: str) -> tuple[str, str]:
    kind, _, hook = feature.partition(":")
    if kind not in ("recon", "act") or not hook:
        raise DarkMatterError(f"feature {feature!r} must be 'recon:<hook>' or 'act:<hook>'")
    return kind, hook


def cross_layer(
    store: ActivationStore,
    saes: Mapping[str, SAE],
    target: str,
    splits: Splits,
    cfg: CrossLayerConfig = CrossLayerConfig(),
    *,
    predictors: Mapping[str, Sequence[str]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Held-out R² of predicting the target SAE's e, ê, e − ê from each predictor set (JSON-able).

    ``saes`` maps hook -> SAE and must include ``target``; ``predictors`` defaults to
    ``default_predictors(target, list(saes))``. Rows of all hooks are the same tokens.
    """
    if target not in saes:
        raise DarkMatterError(f"no SAE for the target hook {target!r} (SAEs for {sorted(saes)})")
    sets = {
        name: tuple(feats)
        for name, feats in (predictors or default_predictors(target, list(saes))).items()
    }
    hooks = list(dict.fromkeys([target, *(_parse(f)[1] for feats in sets.values() for f in feats)]))
    for feats in sets.values():
        for kind, hook in map(_parse, feats):
            if hook not in store.hooks:
                raise DarkMatterError(
                    f"hook {hook!r} is not in the store (it has {list(store.hooks)})"
                )
            if kind == "recon" and hook not in saes:
                raise DarkMatterError(f"no SAE for hook {hook!r}, needed by 'recon:{hook}'")
    for hook, sae in saes.items():
        if hook in hooks and sae.d_in != store.d(hook):
            raise ShapeMismatchError(
                f"the SAE for {hook!r} has d_in {sae.d_in}, the store {store.d(hook)}"
            )
    device = resolve_device(cfg.device)
    saes = {h: s.to(device) if isinstance(s, torch.nn.Module) else s for h, s in saes.items()}
    d = store.d(target)

    def chunks(rows: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        """Aligned chunks of every needed hook (same rows, same chunk boundaries)."""
        readers = [store.iter_chunks(h, rows, cfg.chunk_rows) for h in hooks]
        for parts in zip(*readers):
            yield {h: x.to(device) for h, (_, x) in zip(hooks, parts)}

    def features(acts: dict[str, torch.Tensor], x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        recon = {target: x_hat}
        with torch.inference_mode():
            for feats in sets.values():
                for kind, hook in map(_parse, feats):
                    if kind == "recon" and hook not in recon:
                        recon[hook] = saes[hook](acts[hook]).to(acts[hook].dtype)
        return {
            name: torch.cat(
                [recon[h] if k == "recon" else acts[h] for k, h in map(_parse, feats)], 1
            )
            for name, feats in sets.items()
        }

    def split_error(acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = acts[target]
        with torch.inference_mode():
            x_hat = saes[target](x).to(x.dtype)
        return x_hat, x - x_hat

    n_train, n_test = splits.probe_train.size, splits.probe_test.size
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(
            f"cross-layer {target} ({len(sets)} predictor sets)", total=2 * n_train + n_test
        )
        # Pass 1: the linear error probe ê = [x, 1]·W of the target SAE.
        fit = StreamingLstsq(d, d, device=device)
        for acts in chunks(splits.probe_train):
            fit.update(acts[target], split_error(acts)[1])
            bar.update(task, advance=acts[target].shape[0])
        probe = fit.solve(cfg.ridge)
        # Pass 2: one least-squares system per predictor set, targets [e, ê]; e − ê's map is
        # their difference (least squares is linear in the targets).
        fits: dict[str, StreamingLstsq] = {}
        for acts in chunks(splits.probe_train):
            x_hat, e = split_error(acts)
            e_hat = probe.predict(acts[target])
            for name, feats in features(acts, x_hat).items():
                fits.setdefault(name, StreamingLstsq(feats.shape[1], 2 * d, device=device))
                fits[name].update(feats, torch.cat([e, e_hat], 1))
            bar.update(task, advance=acts[target].shape[0])
        maps = {name: f.solve(cfg.ridge) for name, f in fits.items()}
        # Pass 3: held-out scores.
        base = [R2Accumulator(d, device=device) for _ in range(2)]  # x ← x̂, x ← x̂ + ê
        accs = {
            name: {t: R2Accumulator(d, device=device) for t in (*TARGETS, "after")} for name in sets
        }
        for acts in chunks(splits.probe_test):
            x = acts[target]
            x_hat, e = split_error(acts)
            e_hat = probe.predict(x)
            base[0].update(x, x_hat)
            base[1].update(x, x_hat + e_hat)
            for name, feats in features(acts, x_hat).items():
                pred = maps[name].predict(feats)
                p_err, p_lin = pred[:, :d], pred[:, d:]
                p_nl = p_err - p_lin
                accs[name]["error"].update(e, p_err)
                accs[name]["linear"].update(e_hat, p_lin)
                accs[name]["nonlinear"].update(e - e_hat, p_nl)
                accs[name]["after"].update(x, x_hat + e_hat + p_nl)
            bar.update(task, advance=x.shape[0])
    return _summary(target, list(saes), sets, base, accs, fits, cfg, d)


def _summary(
    target: str,
    sources: list[str],
    sets: Mapping[str, tuple[str, ...]],
    base: list[R2Accumulator],
    accs: Mapping[str, Mapping[str, R2Accumulator]],
    fits: Mapping[str, StreamingLstsq],
    cfg: CrossLayerConfig,
    d: int,
) -> dict[str, Any]:
    fvu, before = base[0].fvu(), base[1].fvu()
    rows = {}
    for name, feats in sets.items():
        acc = accs[name]
        after = acc["after"].fvu()
        rows[name] = {
            "features": list(feats),
            "n_features": fits[name].d_in,
            **{
                t: {"r2_pooled": acc[t].r2_pooled(), "r2_mean_dim": acc[t].r2_mean_dim()}
                for t in TARGETS
            },
            "fvu_nonlinear_after": after,
            "nonlinear_remaining": after / before if before > 0 else float("nan"),
        }
    best = min(rows, key=lambda n: rows[n]["fvu_nonlinear_after"])
    return {
        "target": target,
        "sources": sources,
        "d": d,
        "n_probe_train": fits[best].n,
        "n_probe_test": base[0].n,
        "ridge": cfg.ridge,
        "target_sae": {
            "fvu": fvu,
            "fvu_nonlinear": before,
            "linear_share": 1 - base[1].sse() / base[0].sse()
            if base[0].sse() > 0
            else float("nan"),
        },
        "predictors": rows,
        "best": {
            "predictor": best,
            "fvu_nonlinear_before": before,
            "fvu_nonlinear_after": rows[best]["fvu_nonlinear_after"],
            "nonlinear_remaining": rows[best]["nonlinear_remaining"],
        },
    }


def cross_layer_figure(result: Mapping[str, Any], path: str | Path) -> Path:
    """Four panels of horizontal bars per predictor set: held-out R² of e, ê and e − ê (mean
    over dimensions; pooled as dots), and the share of FVU_nonlinear left after adding the
    prediction of e − ê."""
    names = list(result["predictors"])
    rows = [result["predictors"][n] for n in names]
    y = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(15, 0.45 * len(names) + 1.8), sharey=True)
    titles = {
        "error": "SAE error e",
        "linear": "linear part ê",
        "nonlinear": "nonlinear part e − ê",
    }
    for ax, t in zip(axes, TARGETS):
        mean = np.array([r[t]["r2_mean_dim"] for r in rows], dtype=float)
        pooled = np.array([r[t]["r2_pooled"] for r in rows], dtype=float)
        ax.barh(
            y,
            mean,
            color="#5fa55a" if t == "linear" else "#4c4c8c",
            alpha=0.75,
            label="mean over dims",
        )
        ax.plot(pooled, y, "o", color="black", ms=4, label="pooled")
        for yi, v, p in zip(y, mean, pooled):
            ax.annotate(f"{v:.2f}", (np.nanmax([v, p, 0.0]), yi), textcoords="offset points",
                        xytext=(6, -3), fontsize=7)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(f"R² of {titles[t]}", fontsize=9)
        ax.set_xlim(min(0.0, float(np.nanmin([mean, pooled])) - 0.05), 1.05)
        ax.grid(axis="x", alpha=0.3)
    remaining = np.array([r["nonlinear_remaining"] for r in rows], dtype=float)
    axes[3].barh(y, remaining, color="#b05fa5", alpha=0.75)
    for yi, v in zip(y, remaining):
        axes[3].annotate(
            f"{v:.2f}", (v, yi), textcoords="offset points", xytext=(3, -3), fontsize=7
        )
    axes[3].axvline(1.0, color="grey", lw=0.8, ls="--")
    axes[3].set_title("FVU_nonlinear left after adding the prediction", fontsize=9)
    axes[3].grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(
        f"Predicting the {result['target']} SAE error from SAE outputs (held-out)", fontsize=10
    )
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, frameon=False, fontsize=7, loc="upper left")
    return save_figure(fig, Path(path))


def find_hook_saes(saes_dir: str | Path, hooks: Sequence[str], target: str) -> dict[str, Path]:
    """One SAE folder per hook, by the ``hook_name`` in its cfg.json (metadata or top level).

    The target hook gets its widest SAE (ties: smallest k, then name); other hooks the SAE with
    the same (width, k) when there is one, else by the same rule. Hooks without SAEs are left out.
    """
    found: dict[str, list[tuple[int, int, str, Path]]] = {}
    for folder in sorted(p.parent for p in Path(saes_dir).glob("**/cfg.json")):
        cfg = read_json(folder / "cfg.json")
        hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
        if hook in hooks:
            found.setdefault(hook, []).append(
                (-int(cfg["d_sae"]), int(cfg.get("k") or 0), folder.name, folder)
            )
    if target not in found:
        raise DarkMatterError(f"no SAE in {saes_dir} was trained on the target hook {target!r}")
    first = min(found[target])
    out = {}
    for hook, cands in found.items():
        same = [c for c in cands if c[:2] == first[:2]]
        out[hook] = min(same or cands)[3]
    return {h: out[h] for h in hooks if h in out}


def cross_layer_analysis(
    run_dir: RunDir | str | Path,
    *,
    target: str | None = None,
    sae_dirs: Mapping[str, str | Path] | None = None,
    cfg: CrossLayerConfig = CrossLayerConfig(),
    split: SplitConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``cross_layer`` on a run folder whose store has several hooks; draws ``FIGURE``.

    ``target`` defaults to the store's first hook (the one ``decompose`` uses); ``sae_dirs``
    (hook -> SAE folder) to ``find_hook_saes(run_dir/"saes", ...)``. The figure goes under
    ``out_dir`` (default ``run_dir``); the result names the SAEs and the figure path.
    """
    from sae_darkmatter.saes import load_sae

    run = RunDir.of(run_dir)
    store = run.store
    if len(store.hooks) < 2:
        raise DarkMatterError(
            f"the store has one hook ({list(store.hooks)}); harvest several hooks "
            "(e.g. resid_post.L-1, attn_out.L, mlp_out.L, resid_post.L) for this analysis"
        )
    target = target or next(iter(store.hooks))
    dirs = ({h: Path(p) for h, p in sae_dirs.items()} if sae_dirs is not None
            else find_hook_saes(run.saes_path, list(store.hooks), target))
    if len(dirs) < 2:
        raise DarkMatterError(
            f"cross-layer prediction needs SAEs on at least 2 hooks, found {sorted(dirs)}"
        )
    saes = {h: load_sae(p) for h, p in dirs.items()}
    splits = run.splits(split or SplitConfig(), hook=target)
    result = cross_layer(store, saes, target, splits, cfg, progress=progress)
    out = Path(out_dir) if out_dir is not None else run.path
    cross_layer_figure(result, out / FIGURE)
    return {
        **result,
        "saes": {h: str(p) for h, p in dirs.items()},
        "figures": {"cross_layer": FIGURE},
    }


def section(r: dict[str, Any], out_dir: Path) -> str:
    rows = "".join(
        f"<tr><td>{esc(name)}</td>"
        + "".join(f"<td>{p[t]['r2_pooled']:.3f}</td>" for t in ("error", "linear", "nonlinear"))
        + f"<td>{p['nonlinear_remaining']:.3f}</td></tr>"
        for name, p in r["predictors"].items()
    )
    best = r["best"]
    return (
        f"<p>Held-out R² (pooled) of predicting the {esc(r['target'])} SAE error e, its linear "
        f"part ê and its nonlinear part e − ê linearly from other hooks' SAE reconstructions (and "
        f"x); {r['n_probe_train']:,} fit / {r['n_probe_test']:,} scored tokens. Best set: "
        f"<code>{esc(best['predictor'])}</code> leaves {100 * best['nonlinear_remaining']:.1f} % "
        f"of FVU nonlinear ({best['fvu_nonlinear_before']:.4f} → "
        f"{best['fvu_nonlinear_after']:.4f}; chosen on the scored tokens, so slightly "
        f"optimistic).</p>"
        f"<table><tr><th>predictors</th><th>R² e</th><th>R² ê</th><th>R² e − ê</th>"
        f"<th>nonlinear left</th></tr>{rows}</table>" + figures_html(r["figures"], out_dir)
    )


def _run(run: RunDir, cfg: RunConfig, results: Results, progress: bool) -> dict[str, Any]:
    return cross_layer_analysis(run, cfg=cfg.cross_layer, split=cfg.split, progress=progress)


ANALYSIS = Analysis(
    name="cross_layer",
    title="Predicting the error from other hooks' SAEs",
    run=_run,
    section=section,
    settings=lambda cfg, results: (cfg.cross_layer,),
    enabled=lambda cfg: cfg.cross_layer.enabled,
)
