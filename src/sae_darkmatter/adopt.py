"""Make a run follow the harvest settings its pretrained SAEs were trained with.

An SAE is measured fairly only on inputs like those it was trained on: the same model (and
dtype) and hook, the same BOS convention and context length, the positions it saw.
``adopt_sae_metadata`` takes each of these from the SAEs' metadata (``LoadedSAE.provenance``:
``model``, ``hook_name`` and ``trained_with``) wherever the run leaves the setting at its
default, and logs what it took:

- model, hook, ``prepend_bos``, context length, LM dtype, and (for SAELens SAEs, which SAELens
  packs with a separator, BOS by default) the document separator must match: SAEs that state
  different values for a setting the run leaves open are an error, and the run must choose;
- sequence positions (``seqpos_slice``) and special-token exclusion only narrow what the
  statistics use: the run keeps the positions every SAE saw;
- the training dataset is only reported: the corpus is never switched to a download.

A setting the run sets itself wins, and each SAE trained otherwise gets one warning naming
both values (so does a dataset other than the run's corpus).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from sae_darkmatter.config import RunConfig
from sae_darkmatter.contexts import tokenizer_adds_bos
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.models import AUTO_NAME, load_tokenizer
from sae_darkmatter.saes.formats import LoadedSAE
from sae_darkmatter.saes.transcoder_formats import LoadedTranscoder

log = logging.getLogger(__name__)

DEFAULT = RunConfig()
# TransformerLens processing that changes a model's activations (SAELens loads models without
# it unless these are asked for in model_from_pretrained_kwargs).
_TL_PROCESSING = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                  "refactor_factored_attn_matrices")
_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
           "half": "float16"}


def adopt_sae_metadata(cfg: RunConfig, loaded: Mapping[str, LoadedSAE], *,
                       tokenizer: Any = None) -> RunConfig:
    """``cfg`` with the harvest settings the SAEs were trained with (module doc).

    ``tokenizer`` (default: the resolved model's) tells whether the model has the BOS token an
    SAE's ``prepend_bos`` asks for: SAELens prepends nothing where there is none.
    """
    cfg = _model_and_hook(cfg, loaded)
    trained = {name: item.provenance.get("trained_with") or {} for name, item in loaded.items()}
    if any(trained.values()):
        tok = tokenizer or load_tokenizer(cfg.harvest.model)
        cfg = _packing(cfg, loaded, trained, tok)
        cfg = _exact(cfg, "harvest.corpus.context_length", "context_size",
                     {n: t.get("context_size") for n, t in trained.items()},
                     lambda c: c.harvest.corpus.context_length, _corpus("context_length"))
        cfg = _exact(cfg, "harvest.model.dtype", "model_from_pretrained_kwargs dtype",
                     {n: _dtype(n, t) for n, t in trained.items()},
                     lambda c: c.harvest.model.dtype, _model("dtype"))
        cfg = _positions(cfg, trained)
        _report_dataset(cfg, trained)
    return cfg


def _model_and_hook(cfg: RunConfig, loaded: Mapping[str, LoadedSAE]) -> RunConfig:
    """The model (if ``"auto"``) and the hook (if none is set) named by the SAEs."""
    h = cfg.harvest
    model, hooks = h.model, h.hooks
    if model.name == AUTO_NAME:
        models = (p.provenance.get("model") for p in loaded.values())
        named = {m for m in models if m is not None}
        if len(named) > 1:
            raise DarkMatterError(
                f"the SAEs name different models {sorted(named)}; set harvest.model.name (--model)"
            )
        if named:
            model = dataclasses.replace(model, name=named.pop())
            log.info("model %s, as named by the SAE metadata", model.name)
    if not hooks:
        hook_names = (p.provenance.get("hook_name") for p in loaded.values())
        named = {n for n in hook_names if n is not None}
        if len(named) > 1:
            raise DarkMatterError(
                f"the SAEs were trained on different hooks {sorted(named)}; analyse one hook "
                "per run, or set the hook (--hook)"
            )
        if named:
            hooks = (named.pop(),)
            log.info("hook %s, as named by the SAE metadata", hooks[0])
    return dataclasses.replace(cfg, harvest=dataclasses.replace(h, model=model, hooks=hooks))


def _corpus(name: str) -> Callable[[RunConfig, Any], RunConfig]:
    def put(c: RunConfig, value: Any) -> RunConfig:
        corpus = dataclasses.replace(c.harvest.corpus, **{name: value})
        return dataclasses.replace(c, harvest=dataclasses.replace(c.harvest, corpus=corpus))
    return put


def _model(name: str) -> Callable[[RunConfig, Any], RunConfig]:
    def put(c: RunConfig, value: Any) -> RunConfig:
        model = dataclasses.replace(c.harvest.model, **{name: value})
        return dataclasses.replace(c, harvest=dataclasses.replace(c.harvest, model=model))
    return put


def _filter(name: str) -> Callable[[RunConfig, Any], RunConfig]:
    def put(c: RunConfig, value: Any) -> RunConfig:
        filt = dataclasses.replace(c.split.filter, **{name: value})
        return dataclasses.replace(c, split=dataclasses.replace(c.split, filter=filt))
    return put


def _exact(cfg: RunConfig, key: str, label: str, stated: Mapping[str, Any],
           get: Callable[[RunConfig], Any], put: Callable[[RunConfig, Any], RunConfig], *,
           effective: Any = None) -> RunConfig:
    """Follow a setting every SAE must share; ``effective`` is what the run's default value
    amounts to (default: the value itself), so an SAE that agrees with it changes nothing."""
    stated = {n: v for n, v in stated.items() if v is not None}
    current = get(cfg)
    is_default = current == get(DEFAULT)
    now = effective if effective is not None and is_default else current
    if not stated:
        return cfg
    if is_default:
        values = set(stated.values())
        if len(values) > 1:
            listed = ", ".join(f"{n}: {v!r}" for n, v in stated.items())
            raise DarkMatterError(
                f"the SAEs were trained with different {label} ({listed}); set {key} to choose "
                "one, or analyse them in separate runs")
        value = values.pop()
        if value != now:
            log.info("%s = %r, as the SAEs were trained (%s)", key, value, label)
            cfg = put(cfg, value)
        return cfg
    for name, value in stated.items():
        if value != now:
            log.warning("SAE %s was trained with %s %r, but this run uses %s = %r: it is measured "
                        "on inputs unlike its training data", name, label, value, key, current)
    return cfg


def _packing(cfg: RunConfig, loaded: Mapping[str, LoadedSAE], trained: Mapping[str, dict[str, Any]],
             tok: Any) -> RunConfig:
    """``prepend_bos`` and, for SAELens SAEs, the separator: as SAELens would pack for them
    (no BOS where the tokenizer has none; BOS-separated documents unless stated otherwise)."""
    has = {"bos": tok.bos_token_id is not None, "eos": tok.eos_token_id is not None}
    bos = {
        n: bool(t["prepend_bos"]) and has["bos"] for n, t in trained.items() if "prepend_bos" in t
    }
    cfg = _exact(cfg, "harvest.corpus.prepend_bos", "prepend_bos", bos,
                 lambda c: c.harvest.corpus.prepend_bos, _corpus("prepend_bos"),
                 effective=tokenizer_adds_bos(tok))
    prepend = cfg.harvest.corpus.prepend_bos
    prepend = tokenizer_adds_bos(tok) if prepend == "auto" else prepend
    separators = {}
    for name, t in trained.items():
        if loaded[name].provenance.get("library") != "sae_lens":
            continue
        token = t.get("sequence_separator_token", "bos")
        if token in has or token is None:
            separators[name] = token if token and has[token] else "none"
        else:
            log.warning("SAE %s was trained with sequence_separator_token %r, which has no "
                        "counterpart here (bos, eos or none)", name, token)
    return _exact(cfg, "harvest.corpus.separator", "sequence_separator_token", separators,
                  lambda c: c.harvest.corpus.separator, _corpus("separator"),
                  effective="bos" if prepend else None)


def _dtype(name: str, trained: Mapping[str, Any]) -> str | None:
    """The LM dtype an SAE's ``model_from_pretrained_kwargs`` asks for; warns about the kwargs
    that cannot be followed."""
    kwargs = dict(trained.get("model_from_pretrained_kwargs") or {})
    processed = sorted(k for k in _TL_PROCESSING if kwargs.pop(k, False))
    if processed:
        log.warning("SAE %s was trained on a TransformerLens model loaded with %s, which changes "
                    "its activations; this run reads the unprocessed Hugging Face model",
                    name, ", ".join(f"{k}=True" for k in processed))
    raw = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    dtype = None if raw is None else _DTYPES.get(str(raw).removeprefix("torch."))
    if raw is not None and dtype is None:
        log.warning("SAE %s was trained on its model in dtype %r, which is not one of %s",
                    name, raw, sorted(set(_DTYPES.values())))
    kwargs = {k: v for k, v in kwargs.items() if v is not False}
    if kwargs:
        log.info("SAE %s: model_from_pretrained_kwargs %s do not apply to the Hugging Face model",
                 name, kwargs)
    return dtype


def _positions(cfg: RunConfig, trained: Mapping[str, dict[str, Any]]) -> RunConfig:
    """Keep only positions every SAE saw (``seqpos_slice``), and exclude special tokens when
    an SAE's training did; a run's own wider setting gets a warning per SAE."""
    length, filt = cfg.harvest.corpus.context_length, cfg.split.filter
    starts, stops = {}, {}
    for name, t in trained.items():
        start, stop, step = t.get("seqpos_slice") or (None, None, None)
        if step not in (None, 1):
            log.warning("SAE %s was trained on every %d-th position (seqpos_slice step); this run "
                        "uses every position in its range", name, step)
        starts[name] = start if start is None or start >= 0 else length + start
        stops[name] = stop if stop is None or stop >= 0 else length + stop
    cfg = _narrow(cfg, "split.filter.skip_positions", starts, filt.skip_positions,
                  DEFAULT.split.filter.skip_positions, max, lambda run, sae: run < sae,
                  _filter("skip_positions"))
    cfg = _narrow(cfg, "split.filter.stop_position", stops, filt.stop_position, None, min,
                  lambda run, sae: run is None or run > sae, _filter("stop_position"))
    excluded = [n for n, t in trained.items() if t.get("exclude_special_tokens")]
    if excluded and not cfg.split.filter.exclude_special:
        log.warning("SAE(s) %s were trained without special tokens, but this run keeps them "
                    "(split.filter.exclude_special = false)", ", ".join(excluded))
    return cfg


def _narrow(cfg: RunConfig, key: str, stated: Mapping[str, int | None], current: int | None,
            default: int | None, pick: Callable[..., int], wider: Callable[[Any, int], bool],
            put: Callable[[RunConfig, Any], RunConfig]) -> RunConfig:
    """Narrow a position bound to what every SAE saw (``pick`` of their bounds)."""
    stated = {n: v for n, v in stated.items() if v is not None}
    if not stated:
        return cfg
    if current == default:
        bound = pick(stated.values())
        if wider(current, bound):
            log.info("%s = %d: the positions the SAEs were trained on (seqpos_slice)", key, bound)
            return put(cfg, bound)
        return cfg
    for name, bound in stated.items():
        if wider(current, bound):
            log.warning("SAE %s was trained on positions from seqpos_slice bound %d, but this run "
                        "uses %s = %s: it is measured on positions it never saw", name, bound, key,
                        current)
    return cfg


def _report_dataset(cfg: RunConfig, trained: Mapping[str, dict[str, Any]]) -> None:
    """Warn once per training dataset that differs from the run's corpus."""
    source = cfg.harvest.corpus.source
    by_dataset: dict[str, list[str]] = {}
    for name, t in trained.items():
        dataset = t.get("dataset_path")
        if dataset and dataset not in source:
            by_dataset.setdefault(dataset, []).append(name)
    for dataset, names in by_dataset.items():
        log.warning("SAE(s) %s were trained on text from %s; this run reads %r "
                    "(harvest.corpus.source; --corpus hf:%s to match)", ", ".join(names), dataset,
                    source, dataset)


def warn_store_differences(meta: Mapping[str, Any], context_length: int,
                           loaded: Mapping[str, LoadedSAE | LoadedTranscoder]) -> None:
    """One warning per SAE trained with another BOS convention or context length than those
    of a store (metadata ``meta``) it is about to be measured on."""
    store = {"prepend_bos": bool(meta.get("prepend_bos", False)), "context_size": context_length}
    for name, item in loaded.items():
        trained = item.provenance.get("trained_with") or {}
        for key, value in store.items():
            if key in trained and trained[key] != value:
                log.warning("SAE %s was trained with %s %r, but the store was harvested with %r: "
                            "it is measured on inputs unlike its training data", name, key,
                            trained[key], value)
