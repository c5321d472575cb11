"""Load a language model, name its hook points, and run it with activation capture.

Hook points are ``resid_post.L`` (output of decoder layer ``L``), ``attn_out.L`` and
``mlp_out.L`` (what the attention and MLP blocks of layer ``L`` add to the residual stream), and
``mlp_in.L``: the tensor layer ``L``'s MLP module receives, i.e. the output of the pre-MLP norm
(``post_attention_layernorm`` in Llama/Qwen/Mistral/NeoX, ``pre_feedforward_layernorm`` in
Gemma 2/3, ``ln_2`` in GPT-2), the input transcoders read (sparsify, Gemma Scope). It is read
from the MLP's input with a forward pre-hook, so no norm has to be recomputed or named; it is
d_model wide like the others, but not a residual-stream quantity (the norm's weight scales it).
Modules are found by structure, not by class name: the decoder layers are the ``ModuleList``
whose children all have an attention submodule (``self_attn``/``attn``/``attention``) and an
``mlp``. Layers with sandwich norms (Gemma 2/3, OLMo 2: a ``post_feedforward_layernorm``) add
the *normed* block outputs to the residual stream, so there ``attn_out``/``mlp_out`` are the
outputs of ``post_attention_layernorm``/``post_feedforward_layernorm`` (TransformerLens's
``hook_attn_out``/``hook_mlp_out``, as Gemma Scope uses them).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard, cast

import torch
import torch.nn.functional as F
import transformers
from huggingface_hub import is_offline_mode
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)

from sae_darkmatter._io import resolve_device
from sae_darkmatter.config import ModelConfig
from sae_darkmatter.embedded import embedded_gguf_path, ensure_gguf_cache
from sae_darkmatter.errors import DarkMatterError, HookError, ModelNotAvailableError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2"
AUTO_NAME = "auto"  # ModelConfig default: the SAEs' model when a run names one, else EMBEDDED_NAME
HOOK_KINDS = ("resid_post", "attn_out", "mlp_out", "mlp_in")
INPUT_KINDS = frozenset({"mlp_in"})  # read from the hook module's input, not its output
SUPPORTED = (
    "Llama 2/3, Mistral, Qwen2/3, Phi-3, SmolLM2 (model.layers[L].self_attn/.mlp), Gemma 2/3 "
    "(sandwich norms), GPT-2 (transformer.h[L].attn/.mlp), GPT-NeoX "
    "(gpt_neox.layers[L].attention/.mlp)"
)
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A causal LM ready for inference (eval mode, on ``device``, no gradients)."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str
    n_layers: int
    d_model: int
    device: torch.device


# ---------------------------------------------------------------------------- loading


def _resolve_source(name: str) -> tuple[Path | str, str | None]:
    """``(what from_pretrained loads, resolved local path or None)`` for a model name.

    GGUF files (and the embedded default) resolve to their dequantized cache folder.
    """
    if name in (EMBEDDED_NAME, AUTO_NAME):
        gguf = embedded_gguf_path()
        return ensure_gguf_cache(gguf), str(gguf)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ensure_gguf_cache(path), str(path.resolve())
    if path.is_dir():
        return path, str(path.resolve())
    if path.exists():
        raise ModelNotAvailableError(f"{name}: not a model folder or a .gguf file")
    if name.endswith(".gguf") or name.startswith(("/", "./", "../", "~")):
        raise ModelNotAvailableError(f"no such model file or folder: {name}")
    return name, None


def load_tokenizer(cfg: ModelConfig) -> transformers.PreTrainedTokenizerBase:
    """Only the tokenizer of ``cfg.name`` (same sources and errors as ``load_model``)."""
    source, resolved = _resolve_source(cfg.name)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _unavailable(cfg, exc, resolved, "the tokenizer of model") from exc


def _unavailable(
    cfg: ModelConfig, exc: Exception, resolved: str | None, what: str
) -> ModelNotAvailableError:
    """The error for a model (or its tokenizer or config) that cannot be loaded: says how to
    pass a local copy, and refuses plainly a model that needs its own code run."""
    _refuse_remote_code(cfg, exc)
    offline = resolved is None and is_offline_mode()
    where = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline else exc
    return ModelNotAvailableError(
        f"cannot load {what} {cfg.name!r}: {where}. Pass a local model folder "
        f"(config.json + weights + tokenizer) or the path of a .gguf file as the model "
        f"name, or use the embedded default {EMBEDDED_NAME!r}."
    )


def _refuse_remote_code(cfg: ModelConfig, exc: Exception) -> None:
    """Say plainly when a model needs its own code run, which stays off unless asked for."""
    if "trust_remote_code" in str(exc) and not cfg.trust_remote_code:
        raise ModelNotAvailableError(
            f"model {cfg.name!r} ships its own Python code (auto_map in its config), which is not "
            "run unless you ask: set trust_remote_code = true under [harvest.model] "
            "(ModelConfig(trust_remote_code=True)), only for code you have read"
        ) from exc


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load ``cfg.name`` (``"smollm2"``, a hub id, a local folder or a ``.gguf`` file)."""
    if cfg.dtype not in _DTYPES:
        raise DarkMatterError(f"dtype {cfg.dtype!r} not one of {sorted(_DTYPES)}")
    source, resolved = _resolve_source(cfg.name)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[cfg.dtype], **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _unavailable(cfg, exc, resolved, "model") from exc
    device = resolve_device(cfg.device)
    # transformers wraps PreTrainedModel.to in a decorator whose signature pyright misreads
    model = model.to(device).eval().requires_grad_(False)  # pyright: ignore[reportArgumentType]
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=resolved or cfg.name,
        n_layers=len(_decoder_layers(model)),
        d_model=_d_model(model),
        device=device,
    )


# ---------------------------------------------------------------------------- hook points

_LAYERS: weakref.WeakKeyDictionary[nn.Module, nn.ModuleList] = weakref.WeakKeyDictionary()


def _child(module: nn.Module, names: Sequence[str]) -> nn.Module | None:
    """The first of ``names`` that is a submodule of ``module``."""
    found = (getattr(module, n, None) for n in names)
    return next((m for m in found if isinstance(m, nn.Module)), None)


def _is_decoder_layer(module: nn.Module) -> bool:
    return _child(module, _ATTN_NAMES) is not None and _child(module, _MLP_NAMES) is not None


def _is_layer_list(module: nn.Module, n_layers: int | None) -> TypeGuard[nn.ModuleList]:
    return (
        isinstance(module, nn.ModuleList)
        and len(module) > 0
        and n_layers in (None, len(module))
        and all(map(_is_decoder_layer, module))
    )


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: the first ModuleList made only of attention+MLP blocks.

    When the model has a config, the list must also be ``num_hidden_layers`` long (this skips
    e.g. a vision tower's layers in a multimodal model).
    """
    if model not in _LAYERS:
        config = getattr(model, "config", None)
        n = config.get_text_config().num_hidden_layers if config is not None else None
        found = next((m for m in model.modules() if _is_layer_list(m, n)), None)
        if found is None:
            raise HookError(
                f"unsupported architecture {type(model).__name__}: no list of decoder layers "
                f"with attention and MLP submodules found. Supported: {SUPPORTED}"
            )
        _LAYERS[model] = found
    return _LAYERS[model]


def _unwrap(model: PreTrainedModel | LoadedModel) -> PreTrainedModel:
    return model.model if isinstance(model, LoadedModel) else model


LOGITS_BUDGET = 1 << 29  # logits held at once (2 GB in float32): Gemma's 262k-token vocabulary


def logits_batch(lm: LoadedModel, context_length: int, wanted: int) -> int:
    """Contexts per forward pass when all logits are kept: ``wanted``, fewer when their logits
    ``[batch, context_length, vocab]`` would pass ``LOGITS_BUDGET`` elements (2 contexts of
    1,024 tokens for Gemma 3; SmolLM2's 16 of 128 are far below it)."""
    vocab = int(lm.model.config.get_text_config().vocab_size)
    return max(1, min(wanted, LOGITS_BUDGET // (context_length * vocab)))


def _d_model(model: PreTrainedModel) -> int:
    config = model.config.get_text_config()
    return int(config.hidden_size)


def hook_names(model: PreTrainedModel | LoadedModel) -> list[str]:
    """All valid hook points, layer by layer."""
    n = len(_decoder_layers(_unwrap(model)))
    return [f"{kind}.{layer}" for layer in range(n) for kind in HOOK_KINDS]


def default_hook(model: PreTrainedModel | LoadedModel) -> str:
    """The residual stream after the middle layer."""
    return f"resid_post.{len(_decoder_layers(_unwrap(model))) // 2}"


def load_config(cfg: ModelConfig) -> transformers.PretrainedConfig:
    """The text config of model ``cfg.name`` alone (no weights are loaded)."""
    source, resolved = _resolve_source(cfg.name)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _unavailable(cfg, exc, resolved, "the config of model") from exc
    return config.get_text_config()


def default_hook_for(cfg: ModelConfig) -> str:
    """``default_hook`` from the model's config alone (no weights are loaded)."""
    return f"resid_post.{int(load_config(cfg).num_hidden_layers) // 2}"


def default_sources(target: str) -> tuple[str, ...]:
    """The paper's sources for ``resid_post.L``: ``resid_post.{L-1}``, ``attn_out.L``,
    ``mlp_out.L``.

    Other targets (and layer 0, which has no earlier residual) get none.
    """
    kind, _, layer = target.rpartition(".")
    if kind != "resid_post" or not layer.isdigit() or int(layer) == 0:
        return ()
    n = int(layer)
    return (f"resid_post.{n - 1}", f"attn_out.{n}", f"mlp_out.{n}")



def max_positions(config: transformers.PretrainedConfig) -> int | None:
    """The most positions a model's (text) config allows, or None when it states none."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def parse_hook(model: PreTrainedModel | LoadedModel, name: str) -> tuple[str, int]:
    """``"mlp_out.3"`` -> ``("mlp_out", 3)``; unknown kinds or layers raise HookError."""
    n = len(_decoder_layers(_unwrap(model)))
    kind, _, layer = name.rpartition(".")
    if kind in HOOK_KINDS and layer.isdigit() and int(layer) < n:
        return kind, int(layer)
    valid = ", ".join(f"{k}.L" for k in HOOK_KINDS)
    raise HookError(f"unknown hook {name!r}; valid: {valid} for L in 0..{n - 1}")


def hook_dim(model: PreTrainedModel | LoadedModel, name: str) -> int:
    """Width of the activations at hook ``name`` (all supported hooks are d_model wide)."""
    parse_hook(model, name)
    return _d_model(_unwrap(model))


def reads_input(name: str) -> bool:
    """Whether hook ``name`` is its module's input (``mlp_in``) rather than its output."""
    return name.rpartition(".")[0] in INPUT_KINDS


def hook_module(model: PreTrainedModel | LoadedModel, name: str) -> nn.Module:
    """The module whose output (first element if a tuple) is hook ``name``; for ``mlp_in``
    (``reads_input``), the MLP module whose first input it is."""
    kind, index = parse_hook(model, name)
    layer = _decoder_layers(_unwrap(model))[index]
    if kind == "resid_post":
        return layer
    if kind == "mlp_in":
        mlp = _child(layer, _MLP_NAMES)
        assert mlp is not None  # _decoder_layers keeps layers with both children
        return mlp
    sandwich = isinstance(getattr(layer, "post_feedforward_layernorm", None), nn.Module)
    if kind == "attn_out":
        child = layer.post_attention_layernorm if sandwich else _child(layer, _ATTN_NAMES)
    else:
        child = layer.post_feedforward_layernorm if sandwich else _child(layer, _MLP_NAMES)
    assert isinstance(child, nn.Module)  # _decoder_layers keeps layers with both children
    return child


# ---------------------------------------------------------------------------- forward


class _StopForward(Exception):
    """Raised from a forward hook once every requested activation has been captured."""


def forward_capture(
    lm: LoadedModel, input_ids: torch.Tensor, hooks: Sequence[str], with_loss: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Run ``input_ids`` [B, T] through the model, capturing ``hooks`` as float32 CPU [B, T, d].

    With ``with_loss`` also returns per-token next-token cross-entropy [B, T] (float32, last
    position NaN) from the model's own logits. Without it, the forward pass stops right after
    the last requested activation is produced, so later layers never run.
    """
    hooks = list(dict.fromkeys(hooks))
    modules = {name: hook_module(lm.model, name) for name in hooks}
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        captured[name] = value.detach().to(torch.float32, copy=True)
        if not with_loss and len(captured) == len(hooks):
            raise _StopForward

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            keep(name, cast(torch.Tensor, output[0] if isinstance(output, tuple) else output))

        return hook

    def make_pre_hook(name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            keep(name, module_input(module, args))

        return pre_hook

    if not hooks and not with_loss:
        return {}, None
    ids = input_ids.to(lm.device)
    handles = [
        m.register_forward_pre_hook(make_pre_hook(n)) if reads_input(n)
        else m.register_forward_hook(make_hook(n))
        for n, m in modules.items()
    ]
    loss = None
    try:
        with torch.inference_mode():
            try:
                out = lm.model(input_ids=ids, use_cache=False)
            except _StopForward:
                out = None
            if with_loss:
                assert out is not None  # the forward stops early only without the loss
                loss = _token_loss(out.logits, ids)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in hooks if n not in captured]
    if missing:
        raise HookError(f"hooks {missing} produced no output on {type(lm.model).__name__}")
    return {n: captured[n].cpu() for n in hooks}, loss


def module_input(module: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    """The tensor a module was called with, as a forward pre-hook sees it: its first positional
    argument (every supported family calls its MLP as ``mlp(hidden_states)``)."""
    if not args or not isinstance(args[0], torch.Tensor):
        raise HookError(
            f"{type(module).__name__} was not called with a tensor as its first positional "
            "argument, so its input cannot be read"
        )
    return args[0]


def _token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token next-token CE [B, T] in float32, one row at a time to bound memory."""
    loss = torch.full(ids.shape, float("nan"), dtype=torch.float32)
    for b in range(ids.shape[0]):
        ce = F.cross_entropy(logits[b, :-1].float(), ids[b, 1:], reduction="none")
        loss[b, :-1] = ce.cpu()
    return loss
