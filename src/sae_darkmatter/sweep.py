"""Sweeps: one setting over several values, one run per value, one comparative report.

``darkmatter sweep --over layer=5,10,15`` (or a ``[sweep]`` table in the run's TOML) runs the
ordinary pipeline once per value into ``out/<axis>=<value>/``, so every stage is cached per
value and a rerun recomputes nothing; then ``report.sweep`` writes ``out/sweep.json`` and
``out/report.html`` across the values. The values share no stage: each run keeps its store in
its own folder (the pipeline has no shared store), so a sweep of a training setting harvests
once per value.

The axis is one scalar setting: ``layer`` (the hook's layer; the cross-layer sources follow),
``protocol`` (a name from ``presets.PROTOCOLS``), an alias from ``ALIASES``, or any dotted path
of a ``RunConfig`` field (``train.lr``, ``split.filter.skip_positions``). Every value's config
is built and checked (types, ranges, the model's layers and positions) before any run starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_darkmatter import distributed, pipeline
from sae_darkmatter._io import require_folder
from sae_darkmatter.config import HarvestConfig, RunConfig, to_dict
from sae_darkmatter.config_base import _Checked, _has_type, _type_error, read_toml
from sae_darkmatter.errors import ConfigError, ConfigValueError
from sae_darkmatter.harvest import prepare
from sae_darkmatter.models import load_config
from sae_darkmatter.presets import PROTOCOLS, protocol
from sae_darkmatter.report.sweep import write_sweep_report

log = logging.getLogger(__name__)

Value = int | float | str | bool
LAYER, PROTOCOL = "layer", "protocol"
ALIASES = {
    "train_tokens": "train.train_tokens",
    "context_length": "harvest.corpus.context_length",
    "n_contexts": "harvest.corpus.n_contexts",
}
AXES = (LAYER, PROTOCOL, *ALIASES)
_SCALARS = ("int", "float", "bool", "str")  # the order a command-line word is tried in


@dataclass(frozen=True)
class SweepConfig(_Checked):
    """Which setting to sweep (``over``: an axis of ``AXES`` or a dotted config path) and its
    ``values`` (distinct, of the setting's type). ``SweepConfig()`` sweeps nothing."""

    over: str = ""
    values: tuple[int | float | str | bool, ...] = ()

    PATH = "sweep"

    def _check(self) -> None:
        if not self.over:
            self._need("values", not self.values, "empty while no axis is set (over)")
            return
        try:
            annotation = axis_type(self.over)
        except ConfigError as err:
            raise ConfigValueError(self.PATH, "over", str(err)) from None
        self._need("values", bool(self.values), "a non-empty list")
        for v in self.values:
            if not _has_type(v, annotation):
                raise ConfigValueError(self.PATH, "values",
                                       f"of {self.over}: {_type_error(v, annotation)}")
        if self.over == LAYER:
            self._need("values", all(isinstance(v, int) and v >= 0 for v in self.values),
                       "layers >= 0")
        if self.over == PROTOCOL:
            self._need("values", all(v in PROTOCOLS for v in self.values),
                       f"protocols from {sorted(PROTOCOLS)}")
        folders = self.folders()
        dupes = sorted({f for f in folders if folders.count(f) > 1})
        self._need("values", not dupes and len(set(self.values)) == len(self.values),
                   f"distinct (repeated: {', '.join(dupes) or 'equal numbers'})")

    def folders(self) -> list[str]:
        """Each value's run folder name, ``<over>=<value>`` (file-name-safe)."""
        return [f"{self.over}={_safe(_text(v))}" for v in self.values]


def _text(value: Value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)


def axis_type(over: str) -> str:
    """The annotation of the values ``over`` takes (``int``, ``float | str``, ...)."""
    if over == LAYER:
        return "int"
    if over == PROTOCOL:
        return "str"
    path = ALIASES.get(over, over)
    obj: Any = RunConfig()
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            valid = list(AXES) if i == 0 else list(fields)
            close = difflib.get_close_matches(part, valid, n=1)
            where = ".".join(parts[:i]) or "the run config"
            raise ConfigError(
                f"unknown sweep axis {over!r}: {part!r} is not a setting of {where}; axes: "
                f"{', '.join(AXES)}, or a dotted config path such as train.lr"
                + (f" (did you mean {close[0]!r}?)" if close else ""))
        obj = getattr(obj, part)
        if i < len(parts) - 1 and not dataclasses.is_dataclass(obj):
            raise ConfigError(f"unknown sweep axis {over!r}: {'.'.join(parts[:i + 1])} is a "
                              "setting, not a table")
    annotation = str(fields[parts[-1]].type)
    kinds = [k for k in annotation.split(" | ") if k != "None"]
    if not kinds or any(k not in _SCALARS for k in kinds):
        what = "a table" if dataclasses.is_dataclass(obj) else "a list"
        raise ConfigError(f"sweep axis {over!r} is {what}; a sweep sets one number, string or "
                          "boolean per run" + (" (sweep 'layer' for the hook)"
                                               if path == "harvest.hooks" else ""))
    return " | ".join(kinds)


def parse_over(text: str) -> SweepConfig:
    """``--over axis=v1,v2,...`` as a ``SweepConfig``, each word read as the axis's type."""
    over, sep, rest = (part.strip() for part in text.partition("="))
    if not sep or not over:
        raise ConfigError(f"--over must be axis=value,value,... (e.g. layer=5,10,15), got {text!r}")
    annotation = axis_type(over)
    words = [w.strip() for w in rest.split(",")] if rest else []
    if "" in words:
        raise ConfigError(f"--over {text!r} has an empty value")
    return SweepConfig(over=over, values=tuple(_read(w, annotation, text) for w in words))


def _read(word: str, annotation: str, text: str) -> Value:
    kinds = annotation.split(" | ")
    for kind in (k for k in _SCALARS if k in kinds):
        if kind == "str":
            return word
        if kind == "bool" and word.lower() in ("true", "false"):
            return word.lower() == "true"
        if kind in ("int", "float"):
            try:
                return int(word) if kind == "int" else float(word)
            except ValueError:
                continue
    raise ConfigError(f"--over {text}: {_type_error(word, annotation)}")


@dataclass(frozen=True)
class SweepFile(RunConfig):
    """A run config TOML file with a ``[sweep]`` table (``over``, ``values``)."""

    sweep: SweepConfig = field(default_factory=SweepConfig)


def load_sweep_toml(path: str | Path) -> tuple[RunConfig, SweepConfig]:
    """The run config and the ``[sweep]`` table (``SweepConfig()`` if none) of a TOML file."""
    file = read_toml(path, SweepFile)
    base = RunConfig(**{f.name: getattr(file, f.name) for f in dataclasses.fields(RunConfig)})
    return base, file.sweep


@dataclass(frozen=True)
class SweepPoint:
    """One value of a sweep: its run folder name and its run config."""

    value: Value
    folder: str
    cfg: RunConfig


def sweep_points(sweep: SweepConfig, base: RunConfig, *,
                 protocol_base: Callable[[str], RunConfig] | None = None) -> list[SweepPoint]:
    """Every value's run config, all built and checked before any work.

    ``protocol_base(name)`` is the base config under protocol ``name`` (the CLI rebuilds it so
    that its flags still win); by default the protocol is applied to ``base``. A layer or
    context length the model does not have is refused here (only the model's config and
    tokenizer are read); so is an axis that cannot change pretrained SAEs' runs.
    """
    if not sweep.over:
        raise ConfigError("nothing to sweep: give --over axis=v1,v2,... or a [sweep] table "
                          "with over and values")
    path = ALIASES.get(sweep.over, sweep.over)
    if base.saes and (sweep.over == LAYER or path.startswith("train.")):
        raise ConfigError(f"a sweep of {sweep.over} changes nothing for pretrained SAEs (--sae): "
                          "their metadata fixes the hook and nothing is trained")
    if sweep.over == LAYER and len(base.harvest.hooks) > 1:
        raise ConfigError(f"a layer sweep sets one hook; harvest.hooks names "
                          f"{len(base.harvest.hooks)} ({', '.join(base.harvest.hooks)})")
    points = []
    for value, folder in zip(sweep.values, sweep.folders(), strict=True):
        try:
            cfg = _with_value(sweep.over, value, base, protocol_base)
        except ConfigError as err:
            raise ConfigError(f"sweep {sweep.over}={_text(value)}: {err}") from None
        points.append(SweepPoint(value, folder, cfg))
    if not base.saes:  # pretrained SAEs choose the model at run time, from their metadata
        _check_model(points, layers=sweep.over == LAYER)
    return points


def _with_value(over: str, value: Value, base: RunConfig,
                protocol_base: Callable[[str], RunConfig] | None) -> RunConfig:
    if over == PROTOCOL:
        return protocol_base(str(value)) if protocol_base else protocol(str(value), base)
    if over == LAYER:
        hooks = base.harvest.hooks
        kind = hooks[0].rpartition(".")[0] if hooks else "resid_post"
        return dataclasses.replace(base, harvest=dataclasses.replace(
            base.harvest, hooks=(f"{kind}.{value}",)))
    return _replace_path(base, ALIASES.get(over, over).split("."), value)


def _replace_path(obj: Any, parts: list[str], value: Value) -> Any:
    """``obj`` with the field at ``parts`` set to ``value``; every table on the way is rebuilt,
    so each one's checks run."""
    inner = value if len(parts) == 1 else _replace_path(getattr(obj, parts[0]), parts[1:], value)
    return dataclasses.replace(obj, **{parts[0]: inner})


def _check_model(points: list[SweepPoint], *, layers: bool) -> None:
    """The model's checks of each distinct harvest (positions, BOS), and each layer's range."""
    prepared: dict[str, HarvestConfig] = {}
    for p in points:
        harvest = dataclasses.replace(p.cfg.harvest, hooks=())
        key = json.dumps(to_dict(harvest), sort_keys=True)
        if key not in prepared:
            with distributed.main_first():  # as the harvest does: rank 0 fills the caches
                prepared[key] = prepare(harvest)[0]
        resolved = prepared[key]
        if layers and isinstance(p.value, int):
            n = int(load_config(resolved.model).num_hidden_layers)
            if p.value >= n:
                raise ConfigError(f"sweep layer={p.value}: model {resolved.model.name!r} has "
                                  f"{n} layers (0..{n - 1})")


def run_sweep(sweep: SweepConfig, base: RunConfig, out: str | Path, *,
              protocol_base: Callable[[str], RunConfig] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run the pipeline for every value into ``out/<over>=<value>/`` (each cached and resumable
    as ``pipeline.run``), then write ``out/sweep.json`` and ``out/report.html``.

    Returns the sweep's summary (as in ``sweep.json``); ``{}`` on ranks other than 0 under
    torchrun.
    """
    points = sweep_points(sweep, base, protocol_base=protocol_base)
    out = Path(out)
    require_folder(out, "the sweep")
    runs = []
    for i, p in enumerate(points, 1):
        log.info("sweep %s: value %d of %d -> %s", sweep.over, i, len(points), out / p.folder)
        runs.append((p.value, p.folder, pipeline.run(p.cfg, out / p.folder, progress=progress)))
    if not distributed.is_main():
        return {}
    return write_sweep_report(sweep.over, runs, out)
