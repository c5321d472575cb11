"""The harvest loop: run an LM over packed contexts and append activations to a store.

Work is committed one shard (``contexts_per_shard`` contexts) at a time, so an interrupted
harvest loses at most the shard in flight; rerunning the same command resumes after the last
committed shard and yields exactly the store an uninterrupted run would (the shard and batch
boundaries do not depend on where the run stopped). A complete store whose settings match is
returned without loading the model; so is one that also holds the per-token loss when none was
asked for, while a store without it is never reused for a harvest that asks for it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from sae_darkmatter import distributed
from sae_darkmatter._io import require_folder
from sae_darkmatter.config import HarvestConfig, fingerprint, from_dict, to_dict
from sae_darkmatter.contexts import Packing, build_contexts, packing_for, special_token_ids
from sae_darkmatter.corpus import corpus_fingerprint
from sae_darkmatter.errors import ConfigError, DarkMatterError, NonFiniteError
from sae_darkmatter.models import (
    AUTO_NAME,
    EMBEDDED_NAME,
    LoadedModel,
    default_hook,
    forward_capture,
    hook_dim,
    load_config,
    load_model,
    load_tokenizer,
    logits_batch,
    max_positions,
    parse_hook,
)
from sae_darkmatter.store import ActivationStore, ShardProblem

log = logging.getLogger(__name__)


def harvest_fingerprint(cfg: HarvestConfig, packing: Packing) -> str:
    """Identifies a harvest's output: model, corpus (with file stamps), hooks, loss, batching
    and how contexts are packed (BOS, separator; nothing for the stream packing, so stores
    packed that way before BOS handling existed keep their keys)."""
    key = packing.cache_key()
    return fingerprint(cfg, corpus_fingerprint(cfg.corpus), *([key] if key else []))


def harvest_summary(store: ActivationStore) -> dict[str, Any]:
    """What a store's contexts are: the corpus, how many of what length, BOS first or not, the
    separator (stores from before BOS handling: no BOS, the stream packing)."""
    meta = store.meta
    return {
        "corpus": meta.get("config", {}).get("corpus", {}).get("source"),
        "contexts": meta.get("n_contexts"),
        "context_length": store.context_length,
        "prepend_bos": bool(meta.get("prepend_bos", False)),
        "bos_token_id": meta.get("bos_token_id"),
        "separator_token_id": meta.get("separator_token_id"),
        "packing": meta.get("packing", "stream"),
    }


def finished_store(
    path: str | Path, cfg: HarvestConfig, packing: Packing
) -> ActivationStore | None:
    """The store at ``path`` if it is complete and was made with the same settings.

    A complete store that also holds the per-token loss, asked for without it, is returned too
    (the loss is extra; its activations are the same harvest's). The reverse, and an unfinished
    store harvested with the other ``with_loss`` choice, raise a :class:`DarkMatterError` that
    says so: a store without loss is never passed off as one with it, and an unfinished store
    is never resumed with the other choice.
    """
    if not (Path(path) / "manifest.json").exists():
        return None
    store = ActivationStore.open(path)
    meta = store.meta
    complete = store.committed_contexts == meta.get("n_contexts")
    if meta.get("harvest_fingerprint") == harvest_fingerprint(cfg, packing):
        return store if complete else None
    other = dataclasses.replace(cfg, with_loss=not cfg.with_loss)
    if meta.get("harvest_fingerprint") != harvest_fingerprint(other, packing):
        return None  # other settings differ too: the store's writer names them
    if complete and not cfg.with_loss:
        log.info("harvest: %s also holds the per-token loss (not asked for); reusing it", path)
        return store
    held, flag = ("with", "--loss") if other.with_loss else ("without", "--no-loss")
    raise DarkMatterError(
        f"the activation store at {path} was harvested {held} the per-token loss "
        f"(harvest.with_loss = {str(other.with_loss).lower()}) and this run asks "
        f"{'for it' if cfg.with_loss else 'for none'}: rerun with {flag} to "
        f"{'use' if complete else 'finish'} it, or delete {path} to harvest again"
        + (" (downstream recomputes the loss of the contexts it splices)" if cfg.with_loss else "")
    )


def prepare(cfg: HarvestConfig, lm: LoadedModel | None = None) -> tuple[HarvestConfig, Packing]:
    """Check a harvest's settings against its model before any work; resolve its packing.

    Reads only the model's config and tokenizer (unless ``lm`` is given): the context length
    must fit the positions the model allows, and the BOS / separator tokens asked for must exist.
    Returns ``cfg`` with the model name resolved (``"auto"``: the embedded model) and the packing.
    """
    if cfg.model.name == AUTO_NAME:  # no SAE named a model: the embedded default
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=EMBEDDED_NAME))
    config = lm.model.config.get_text_config() if lm else load_config(cfg.model)
    limit, length = max_positions(config), cfg.corpus.context_length
    if limit is not None and length > limit:
        raise ConfigError(
            f"harvest.corpus.context_length ({length:,}) exceeds the {limit:,} positions model "
            f"{cfg.model.name!r} allows (its config's position limit); use at most {limit:,}")
    tokenizer = lm.tokenizer if lm else load_tokenizer(cfg.model)
    return cfg, packing_for(cfg.corpus, tokenizer, model=repr(cfg.model.name))


def harvest(
    cfg: HarvestConfig,
    path: str | Path,
    *,
    lm: LoadedModel | None = None,
    progress: bool = True,
) -> ActivationStore:
    """Harvest activations at ``cfg.hooks`` (default: the middle residual stream) into ``path``.

    Contexts are packed as ``cfg.corpus`` says (``contexts``: a BOS first when the model's
    tokenizer adds one); the store's metadata records the packing (``prepend_bos``, token ids).
    """
    if cfg.contexts_per_shard % cfg.batch_size:
        raise DarkMatterError(
            f"contexts_per_shard ({cfg.contexts_per_shard}) must be a multiple of "
            f"batch_size ({cfg.batch_size})"
        )
    require_folder(path, "the activation store")
    distributed.check_initialized()
    with distributed.main_first():  # rank 0 fills the model cache, the others read it
        cfg, packing = prepare(cfg, lm)
    done = finished_store(path, cfg, packing)
    if done is not None:
        log.info("harvest: %s is complete (%d tokens); reusing it", path, done.n_rows)
        return done

    with distributed.main_first():
        lm = lm or load_model(cfg.model)
    hooks = list(cfg.hooks) or [default_hook(lm.model)]
    for hook in hooks:
        parse_hook(lm.model, hook)
    contexts = build_contexts(cfg.corpus, lm.tokenizer, packing)
    if packing.prepend_bos:
        log.info("harvest: every context starts with BOS token %d (position 0)", packing.bos)
    meta = {
        "harvest_fingerprint": harvest_fingerprint(cfg, packing),
        "config": to_dict(cfg),
        "model_name": lm.name,
        "n_layers": lm.n_layers,
        "n_contexts": int(contexts.shape[0]),
        "special_token_ids": special_token_ids(lm.tokenizer),
        "with_loss": cfg.with_loss,
        **packing.summary(),
    }
    settings: dict[str, Any] = dict(hooks={h: hook_dim(lm.model, h) for h in hooks},
                    context_length=int(contexts.shape[1]), meta=meta)
    with distributed.main_first():  # rank 0 creates or resumes (and holds the writer lock)
        store = (ActivationStore.create_or_resume(path, **settings) if distributed.is_main()
                 else ActivationStore.open(path))
    try:
        _harvest_shards(lm, store, contexts, hooks, cfg, progress)
    finally:
        store.finish()  # release the writer lock, also on Ctrl-C
    if distributed.world_size() > 1:
        store = ActivationStore.open(path)
    log.info("harvest: %d tokens in %s", store.n_rows, path)
    return store


def _harvest_shards(lm: LoadedModel, store: ActivationStore, contexts: np.ndarray, hooks: list[str],
                    cfg: HarvestConfig, progress: bool) -> None:
    """Compute and store the shards after the committed ones.

    One process appends them in order. Under torchrun shard ``i`` is rank ``i % world_size``'s:
    each rank stages its shards (``ActivationStore.stage``) and rank 0 commits the staged ones
    that continue the store as they arrive, and all of them after a final barrier.
    """
    n, cps, tpc = contexts.shape[0], cfg.contexts_per_shard, contexts.shape[1]
    start = store.committed_contexts
    if start and distributed.is_main():
        log.info("harvest: resuming at context %d of %d", start, n)
    alone = distributed.world_size() == 1
    todo = [i for i in range(start // cps, -(-n // cps))
            if distributed.owns(i) and (alone or not store.is_staged(i))]
    with Progress(
        TextColumn("[bold]harvest[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        disable=not progress or not distributed.is_main(),
        transient=True,
    ) as bar:
        label = (
            ", ".join(hooks)
            if alone
            else f"{', '.join(hooks)} (rank 0 of {distributed.world_size()})"
        )
        task = bar.add_task(label, total=(len(todo) * cps + (start if alone else 0)) * tpc,
                            completed=start * tpc if alone else 0, rate="")
        for i in todo:
            shard_start = i * cps
            shard = contexts[shard_start : shard_start + cps]
            acts, loss = _run_shard(lm, shard, hooks, cfg, bar, task)
            check_finite_shard(acts, loss, shard_start, cfg.model.dtype)
            if alone:
                store.append(context_start=shard_start, acts=acts, tokens=shard, loss=loss)
                continue
            store.stage(i, context_start=shard_start, acts=acts, tokens=shard, loss=loss)
            if distributed.is_main():
                store.commit_staged()
    distributed.barrier()
    if not alone and distributed.is_main():
        store.commit_staged()
    distributed.barrier()


def repair(
    path: str | Path, *, lm: LoadedModel | None = None, progress: bool = True
) -> list[ShardProblem]:
    """Re-harvest the bad shards (missing, truncated, sha256 mismatch) of the store at ``path``.

    The harvest settings come from the store's own metadata, and the corpus must be unchanged
    (same harvest fingerprint), so each shard's contexts are rebuilt exactly; each bad shard is
    replaced atomically under its name. Returns the problems that were repaired (``[]`` when the
    store was sound). An unfinished store can then be completed by rerunning the harvest.
    """
    store = ActivationStore.open(path)
    problems = store.check()
    if not problems:
        return []
    meta = store.meta
    cfg, packing = prepare(from_dict(HarvestConfig, meta["config"]), lm)
    if meta.get("harvest_fingerprint") != harvest_fingerprint(cfg, packing):
        raise DarkMatterError(
            f"cannot repair {path}: its corpus or settings changed since it was harvested "
            "(different harvest fingerprint), so the bad shards' contexts cannot be rebuilt; "
            "harvest into a new store"
        )
    lm = lm or load_model(cfg.model)
    contexts = build_contexts(cfg.corpus, lm.tokenizer, packing)
    store = ActivationStore.create_or_resume(
        path, hooks=store.hooks, context_length=store.context_length, meta=meta, dtype=store.dtype)
    try:
        with Progress(TextColumn("[bold]repair[/] {task.description}"), BarColumn(),
                      TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"),
                      disable=not progress, transient=True) as bar:
            total = sum(p.contexts[1] - p.contexts[0] for p in problems) * contexts.shape[1]
            task = bar.add_task(f"{len(problems)} shards", total=total)
            for problem in problems:
                start, stop = problem.contexts
                shard = contexts[start:stop]
                acts, loss = _run_shard(lm, shard, list(store.hooks), cfg, bar, task)
                check_finite_shard(acts, loss, start, cfg.model.dtype)
                same = store.rewrite_shard(problem.index, acts=acts, tokens=shard, loss=loss)
                log.warning(
                    "repaired %s (contexts %d..%d): %s",
                    problem.file,
                    start,
                    stop - 1,
                    "bit-identical to the original"
                    if same
                    else "re-harvested; differs from the original bytes (a nondeterministic model)",
                )
    finally:
        store.finish()
    return problems


def _run_shard(
    lm: LoadedModel,
    shard: np.ndarray,
    hooks: list[str],
    cfg: HarvestConfig,
    bar: Progress,
    task: object,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Forward one shard in batches; returns {hook: [B, T, d]} and loss [B, T] (or None)."""
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    losses: list[torch.Tensor] = []
    batch = logits_batch(lm, shard.shape[1], cfg.batch_size) if cfg.with_loss else cfg.batch_size
    for i in range(0, shard.shape[0], batch):
        ids = torch.from_numpy(shard[i : i + batch]).to(lm.device)
        acts, loss = forward_capture(lm, ids, hooks, with_loss=cfg.with_loss)
        for h in hooks:
            parts[h].append(acts[h])
        if loss is not None:
            losses.append(loss)
        bar.update(task, advance=ids.numel())  # type: ignore[arg-type]
        speed = bar.tasks[0].speed
        if speed:
            bar.update(task, rate=f"{speed:,.0f} tok/s")  # type: ignore[arg-type]
    return (
        {h: torch.cat(v) for h, v in parts.items()},
        torch.cat(losses) if losses else None,
    )


def check_finite_shard(
    acts: dict[str, torch.Tensor], loss: torch.Tensor | None, first_context: int, dtype: str
) -> None:
    """Refuse a shard whose activations [B, T, d] or losses [B, T] hold NaN or inf.

    Called before the shard is committed, so nothing of it lands in the store (earlier shards
    stay). The error names the hook, the first bad (context, position) pairs and a count. The
    check is one ``isfinite`` reduction per hook, well under 1 % of the forward pass.
    """
    parts = dict(acts)
    if loss is not None:
        parts["loss"] = loss[:, :-1]  # the last position has no next token: NaN by design
    for name, t in parts.items():
        finite = torch.isfinite(t) if name == "loss" else torch.isfinite(t).all(dim=-1)
        if bool(finite.all()):
            continue
        ctx, pos = (~finite).nonzero(as_tuple=True)
        ctx, pos = ctx[: NonFiniteError.SHOWN], pos[: NonFiniteError.SHOWN]
        nan = torch.isnan(t[ctx, pos]) if name == "loss" else torch.isnan(t[ctx, pos]).any(dim=-1)
        places = [(first_context + int(c), int(p), "nan" if n else "inf")
                  for c, p, n in zip(ctx.tolist(), pos.tolist(), nan.tolist())]
        overflow = (
            'float16 overflows above 65504: use harvest.model.dtype = "bfloat16" or "float32"'
            if dtype == "float16"
            else 'check the model\'s weights for NaN/inf, or use harvest.model.dtype = "float32"'
        )
        what = ("harvest: the per-token loss (from non-finite logits)" if name == "loss"
                else f"harvest: the model's activations at hook {name!r}")
        raise NonFiniteError(
            what, places, int((~finite).sum()), finite.numel(),
            f"nothing from contexts {first_context}..{first_context + t.shape[0] - 1} was stored "
            f"(the store keeps the {first_context} contexts committed before); {overflow}",
        )
