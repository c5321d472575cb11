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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from sae_darkmatter._io import read_json, resolve_device
from sae_darkmatter.analyses.cross_layer_figures import TARGETS, cross_layer_figure, section
from sae_darkmatter.analyses.registry import Analysis, Results
from sae_darkmatter.config import CrossLayerConfig, RunConfig, SplitConfig
from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.linalg import LinearProbe, R2Accumulator, StreamingLstsq
from sae_darkmatter.linalg.blocks import compose, sub_lstsq
from sae_darkmatter.linalg.scores import SharedTargetR2
from sae_darkmatter.run_dir import RunDir
from sae_darkmatter.saes import SAE
from sae_darkmatter.splits import Splits
from sae_darkmatter.store import ActivationStore

JACKKNIFE_GROUPS = 16  # token groups for the jackknife intervals of the mean per-dim R²
VERSION = 2  # part of the cache key: 2 added the R² intervals

FIGURE = RunDir.figure_key("cross_layer")
BASE = ""  # scores of the target SAE's x̂ and x̂ + ê as reconstructions of x (not a set's)
Tensors = dict[str, torch.Tensor]  # hook -> [rows, d]


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

    One pass over the probe-train tokens accumulates the float64 least-squares sums of the
    union U of all sets' features (x included) against e; every fit is a slice of them
    (``sub_lstsq``): the probe is x -> e, set F's map to e is F -> e, and its map to ê is its
    map to x composed with the probe (least squares is linear in the targets). A second pass
    scores on the probe-test tokens. Each SAE runs once per chunk and pass.
    """
    if target not in saes:
        raise DarkMatterError(f"no SAE for the target hook {target!r} (SAEs for {sorted(saes)})")
    sets = {
        name: tuple(feats)
        for name, feats in (predictors or default_predictors(target, list(saes))).items()
    }
    x_feat = f"act:{target}"
    union = list(dict.fromkeys([f for feats in sets.values() for f in feats] + [x_feat]))
    hooks = list(dict.fromkeys([target, *(_parse(f)[1] for f in union)]))
    for kind, hook in map(_parse, union):
        if hook not in store.hooks:
            raise DarkMatterError(f"hook {hook!r} is not in the store (it has {list(store.hooks)})")
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
    recon_hooks = list(dict.fromkeys([target, *(h for k, h in map(_parse, union) if k == "recon")]))
    starts = np.cumsum([0] + [store.d(_parse(f)[1]) for f in union]).tolist()
    cols = {f: range(starts[i], starts[i + 1]) for i, f in enumerate(union)}

    def chunks(rows: np.ndarray) -> Iterator[tuple[Tensors, Tensors]]:
        """Aligned chunks of every needed hook (same rows and boundaries), with their SAE
        reconstructions (one forward per hook and chunk)."""
        readers = [store.iter_chunks(h, rows, cfg.chunk_rows) for h in hooks]
        for parts in zip(*readers):
            acts = {h: x.to(device) for h, (_, x) in zip(hooks, parts)}
            with torch.inference_mode():
                recon = {h: saes[h](acts[h]).to(acts[h].dtype) for h in recon_hooks}
            yield acts, recon

    def features(feats: Sequence[str], acts: Tensors, recon: Tensors) -> torch.Tensor:
        return torch.cat([recon[h] if k == "recon" else acts[h] for k, h in map(_parse, feats)], 1)

    n_train, n_test = splits.probe_train.size, splits.probe_test.size
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(
            f"cross-layer {target} ({len(sets)} predictor sets)", total=n_train + n_test
        )
        # Pass 1: the sums of U -> e (one Gram matrix for every fit).
        gram = StreamingLstsq(starts[-1], d, device=device)
        for acts, recon in chunks(splits.probe_train):
            gram.update(features(union, acts, recon), acts[target] - recon[target])
            bar.update(task, advance=acts[target].shape[0])
        n_fit, state = gram.n, gram.state_dict()
        del gram  # its sums and scratch buffers (~0.3 GB at 3,456 columns): the state suffices
        e_cols = range(starts[-1], starts[-1] + d)
        probe = sub_lstsq(state, cols[x_feat], e_cols).solve(cfg.ridge)
        maps = {
            name: _error_maps(
                sub_lstsq(state, [c for f in feats for c in cols[f]], [*e_cols, *cols[x_feat]])
                .solve(cfg.ridge), probe)
            for name, feats in sets.items()
        }
        # Pass 2: held-out scores (jackknife groups: a seeded random partition of the tokens).
        scores = SharedTargetR2(d, device, JACKKNIFE_GROUPS)
        groups = torch.from_numpy(np.random.default_rng(0).permutation(n_test) % JACKKNIFE_GROUPS)
        offset = 0
        for acts, recon in chunks(splits.probe_test):
            x, x_hat = acts[target], recon[target]
            e = x - x_hat
            e_hat = probe.predict(x)
            scores.targets(groups[offset : offset + x.shape[0]], error=e, linear=e_hat,
                           nonlinear=e - e_hat, after=x)
            offset += x.shape[0]
            scores.add((BASE, "x̂"), "after", x_hat)
            scores.add((BASE, "x̂ + ê"), "after", x_hat + e_hat)
            for name, feats in sets.items():
                pred = maps[name].predict(features(feats, acts, recon))
                p_err, p_lin = pred[:, :d], pred[:, d:]
                p_nl = p_err - p_lin
                scores.add((name, "error"), "error", p_err)
                scores.add((name, "linear"), "linear", p_lin)
                scores.add((name, "nonlinear"), "nonlinear", p_nl)
                scores.add((name, "after"), "after", x_hat + e_hat + p_nl)
            bar.update(task, advance=x.shape[0])
    n_features = {name: sum(len(cols[f]) for f in feats) for name, feats in sets.items()}
    base = [scores.accumulator((BASE, p)) for p in ("x̂", "x̂ + ê")]
    accs = {name: {t: scores.accumulator((name, t)) for t in (*TARGETS, "after")} for name in sets}
    cis = {name: {t: scores.r2_mean_dim_interval((name, t)) for t in TARGETS} for name in sets}
    return _summary(target, list(saes), sets, base, accs, cis, n_features, n_fit, cfg, d)


def _error_maps(fit: LinearProbe, probe: LinearProbe) -> LinearProbe:
    """A set's map to [e, ê] from its map to [e, x]: the x part composed with the probe."""
    d = probe.d_out
    to_x = LinearProbe(fit.weight[:, d:], fit.bias[d:], fit.rank, fit.cond, fit.regularized)
    lin = compose(to_x, probe)
    return replace(
        lin,
        weight=torch.cat([fit.weight[:, :d], lin.weight], 1),
        bias=torch.cat([fit.bias[:d], lin.bias]),
    )


def _summary(
    target: str,
    sources: list[str],
    sets: Mapping[str, tuple[str, ...]],
    base: list[R2Accumulator],
    accs: Mapping[str, Mapping[str, R2Accumulator]],
    cis: Mapping[str, Mapping[str, tuple[float, float] | None]],
    n_features: Mapping[str, int],
    n_train: int,
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
            "n_features": n_features[name],
            **{
                t: {"r2_pooled": acc[t].r2_pooled(), "r2_mean_dim": acc[t].r2_mean_dim(),
                    "ci": _listed(cis[name][t])}
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
        "n_probe_train": n_train,
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


def _listed(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else list(ci)


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


def _run(run: RunDir, cfg: RunConfig, results: Results, progress: bool) -> dict[str, Any]:
    return cross_layer_analysis(run, cfg=cfg.cross_layer, split=cfg.split, progress=progress)


ANALYSIS = Analysis(
    name="cross_layer",
    title="Predicting the error from other hooks' SAEs",
    run=_run,
    section=section,
    settings=lambda cfg, results: (cfg.cross_layer, VERSION),
    enabled=lambda cfg: cfg.cross_layer.enabled,
)
