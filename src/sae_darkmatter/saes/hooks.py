"""Other libraries' hook names in ours: TransformerLens names and Hugging Face module paths.

``translate_hook`` reads a name as the activation it labels (an SAE's input, a transcoder's
input or output); ``translate_module_input`` reads a module path as that module's *input*
(sparsify's transcoders map a module's input to its output). Each returns our hook (or None
when none fits) and a note when the fit is not exact on every model, or when there is none.

TransformerLens's ``blocks.L.hook_mlp_in`` names two tensors: in ``HookedTransformer`` the
residual stream before ``ln2`` (only with ``use_hook_mlp_in``), in ``TransformerBridge`` the
MLP module's input, after the norm, which is what SAELens labels transcoder inputs with; we
read it as the latter. ``ln2.hook_normalized`` is the norm's output *before* its elementwise
weight, which no module of a Hugging Face model outputs, so it gets no hook.
"""

from __future__ import annotations

import re

_OURS = re.compile(r"^(resid_post|mlp_out|attn_out|mlp_in)\.\d+$")
_TL = re.compile(r"^blocks\.(\d+)\.([\w.]+)$")
# Hugging Face module paths (SAELens's HookedProxyLM, sparsify): "model.layers.12", "layers.10",
# "h.3.mlp", "gpt_neox.layers.2.attention"
_HF_MODULE = re.compile(
    r"^(?:\w+\.)*(?:layers|h|blocks)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$"
)
_SANDWICH = ("on models with sandwich norms (Gemma 2/3, OLMo 2) {hook} is read after the "
             "post-norm instead")
# TransformerLens name after "blocks.L." -> (our kind, note); {name}, {hook} filled in
_TL_NAMES: dict[str, tuple[str | None, str | None]] = {
    "hook_resid_post": ("resid_post", None),
    "hook_mlp_out": ("mlp_out", None),
    "hook_attn_out": ("attn_out", None),
    "mlp.hook_in": ("mlp_in", None),
    "hook_mlp_in": ("mlp_in", (
        "{name} is read as TransformerBridge's MLP input (after the pre-MLP norm), as SAELens "
        "labels transcoder inputs; in HookedTransformer it is the residual before ln2 instead")),
    "mlp.hook_out": ("mlp_out", "{name} is the MLP's raw output; " + _SANDWICH),
    "ln2.hook_normalized": (None, (
        "{name} is the pre-MLP norm's output before its elementwise weight, which no module "
        "outputs; mlp_in.L is after the weight, so no hook here matches")),
    "attn.hook_z": (None, ("{name} is the per-head attention output before W_O; attn_out.L is "
                           "after W_O, so no hook here matches")),
}


def translate_hook(name: str | None) -> tuple[str | None, str | None]:
    """Our hook for a TransformerLens hook name or a Hugging Face module path (ours pass
    through), and a note when none fits exactly.

    ``blocks.L.hook_resid_post`` -> ``resid_post.L``; ``hook_mlp_out`` -> ``mlp_out.L``;
    ``hook_attn_out`` -> ``attn_out.L``; ``mlp.hook_in`` and ``hook_mlp_in`` -> ``mlp_in.L``;
    ``blocks.L.hook_resid_pre`` is the residual stream before layer ``L``, i.e.
    ``resid_post.{L-1}`` (nothing for ``L = 0``: the embeddings). A module path reads that
    module's output: ``model.layers.L`` -> ``resid_post.L``, ``model.layers.L.mlp`` ->
    ``mlp_out.L``, ``...self_attn`` -> ``attn_out.L``.
    """
    if name is None:
        return None, None
    if _OURS.match(name):
        return name, None
    if module := _HF_MODULE.match(name):
        return _module_output(name, int(module.group(1)), module.group(2))
    match = _TL.match(name)
    if match is None:
        return None, _none_fits(name)
    layer, suffix = int(match.group(1)), match.group(2)
    if suffix == "hook_resid_pre":
        return _residual_before(name, layer)
    if suffix not in _TL_NAMES:
        return None, _none_fits(name)
    kind, note = _TL_NAMES[suffix]
    hook = f"{kind}.{layer}" if kind else None
    return hook, note.format(name=name, hook=hook) if note else None


def translate_module_input(path: str) -> tuple[str | None, str | None]:
    """Our hook for the *input* of the Hugging Face module at ``path``, and a note when none
    fits exactly: ``layers.L.mlp`` -> ``mlp_in.L``; ``layers.L`` -> ``resid_post.{L-1}``."""
    module = _HF_MODULE.match(path)
    if module is None:
        return None, f"the input of module {path!r} has no counterpart among our hooks"
    layer, block = int(module.group(1)), module.group(2)
    if block == "mlp":
        return f"mlp_in.{layer}", None
    if block is None:
        return _residual_before(f"the input of {path}", layer)
    return None, (f"the input of {path} is the attention block's input (after the "
                  "pre-attention norm); no hook here reads it")


def _none_fits(name: str) -> str:
    return f"hook {name!r} has no counterpart among resid_post/mlp_out/attn_out/mlp_in"


def _residual_before(what: str, layer: int) -> tuple[str | None, str | None]:
    """The residual stream entering decoder layer ``layer`` (none before layer 0)."""
    if layer == 0:
        return None, f"{what} is the embedding output; no resid_post/mlp_out/attn_out hook matches"
    return f"resid_post.{layer - 1}", f"{what} equals resid_post.{layer - 1}"


def _module_output(name: str, layer: int, block: str | None) -> tuple[str, str | None]:
    if block is None:
        return f"resid_post.{layer}", None
    kind = "mlp_out" if block == "mlp" else "attn_out"
    hook = f"{kind}.{layer}"
    return hook, f"{name} is the block's raw output; " + _SANDWICH.format(hook=hook)
