"""Splice replacements into a causal LM at a hook, exactly: the machinery of ``downstream``.

The decoder layers before the hook replay their clean outputs (so only the layers from the hook
on run again) and the hook module returns the replacement at the spliced positions; the
identity splice reproduces the clean logits bit for bit. ``splice_contexts`` runs the clean
forward and every intervention (``SHARED`` and, per SAE, ``PER_SAE``) per batch of contexts and
returns per-token next-token CE and KL(clean ‖ spliced). A transcoder replaces the activations
at its output hook (``mlp_out.L``) with what it computes from those at its ``source`` hook
(``mlp_in.L``), captured in the same clean forward; its probe reads the source too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from sae_darkmatter.errors import DarkMatterError, HookError
from sae_darkmatter.linalg import LinearProbe
from sae_darkmatter.models import (
    LoadedModel,
    hook_module,
    logits_batch,
    module_input,
    parse_hook,
    reads_input,
)
from sae_darkmatter.saes import SAE
from sae_darkmatter.saes.transcoder import Transcoder

SHARED = ("x", "zero", "mean")
PER_SAE = ("sae", "sae+linear", "sae+nonlinear", "sae+random@error",
           "sae+linear+random@nonlinear", "sae+nonlinear+random@linear")
Replacer = SAE | Transcoder  # an SAE reconstructs its hook; a transcoder predicts it from a source
MAIN = PER_SAE[:3]  # x̂, x̂ + ê, x̂ + (e − ê): what the gap closed by each error part needs


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextmanager
def _constant_forwards(outputs: Mapping[nn.Module, Any]) -> Iterator[None]:
    """Make each module's forward return a fixed output (skipping its computation)."""
    saved = {m: m.__dict__.get("forward") for m in outputs}
    try:
        for m, out in outputs.items():
            m.forward = lambda *_a, _out=out, **_k: _out
        yield
    finally:
        for m, fwd in saved.items():
            if fwd is None:
                del m.forward
            else:
                m.forward = fwd


def _capture(module: nn.Module, read_input: bool, into: dict[str, Any],
             key: str) -> torch.utils.hooks.RemovableHandle:
    """Keep ``module``'s output (its first input when ``read_input``) in ``into[key]``."""
    if read_input:
        return module.register_forward_pre_hook(
            lambda m, args: into.update({key: module_input(m, args)}))
    return module.register_forward_hook(lambda _m, _a, out: into.update({key: out}))


class HookSplicer:
    """Run an LM clean, then with the activations at hook ``hook`` replaced, on the same batch.

    ``clean(ids)`` runs the whole model and remembers the outputs of the hook module and of the
    decoder layer before it; ``splice(ids, new)`` then runs the model with the earlier layers
    replaying that output and the hook module returning ``new``, so only the rest is computed.
    At an input hook (``mlp_in``) the hook module is called with ``new`` instead (the rest of
    its layer runs again). Works for every hook kind ``models`` supports. With a ``source``
    hook, ``clean`` also keeps its activations in ``source_acts`` (what a transcoder reads).
    """

    def __init__(self, lm: LoadedModel, hook: str, source: str | None = None) -> None:
        _, layer = parse_hook(lm.model, hook)
        self.lm = lm
        self.module = hook_module(lm.model, hook)
        self.reads_input = reads_input(hook)
        self.source = source
        self.skipped = [hook_module(lm.model, f"resid_post.{i}") for i in range(layer)]
        self._hook_out: Any = None
        self._prev_out: Any = None
        self.source_acts: torch.Tensor | None = None

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.lm.model(input_ids=ids.to(self.lm.device), use_cache=False).logits

    def clean(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hook activations [B, T, d] float32, logits [B, T, V])`` of the clean forward (and
        ``source_acts``, float32, with a source hook)."""
        captured: dict[str, Any] = {}
        handles = [_capture(self.module, self.reads_input, captured, "hook")]
        if self.source is not None:
            handles.append(_capture(hook_module(self.lm.model, self.source),
                                    reads_input(self.source), captured, "source"))
        if self.skipped:
            handles.append(self.skipped[-1].register_forward_hook(
                lambda _m, _a, out: captured.update(prev=out)))
        try:
            logits = self._logits(ids)
        finally:
            for h in handles:
                h.remove()
        if "hook" not in captured:
            raise HookError(f"the hook module produced no output on {type(self.lm.model).__name__}")
        if self.source is not None and "source" not in captured:
            raise HookError(f"the source hook {self.source!r} produced no output")
        self._hook_out, self._prev_out = captured["hook"], captured.get("prev")
        self.source_acts = _first(captured["source"]).float() if self.source else None
        return _first(self._hook_out).float(), logits

    def splice(self, ids: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` with the hook output replaced by ``new`` ([B, T, d]) for ``ids``."""
        if self._hook_out is None:
            raise DarkMatterError(
                "HookSplicer.splice needs a clean() forward on the same batch first"
            )
        new = new.to(_first(self._hook_out).dtype)
        replay = {m: self._prev_out for m in self.skipped}
        if not self.reads_input:
            with _constant_forwards({self.module: _with_first(self._hook_out, new)} | replay):
                return self._logits(ids)
        handle = self.module.register_forward_pre_hook(lambda _m, args: (new.to(args[0]),
                                                                         *args[1:]))
        try:
            with _constant_forwards(replay):
                return self._logits(ids)
        finally:
            handle.remove()


def ce_kl(logits: torch.Tensor, ids: torch.Tensor,
          clean_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token CE and KL(clean ‖ this) ``[B, T]`` (last position NaN), float32 CPU.

    ``clean_logp`` holds the clean next-token log-probabilities ``[B, T−1, V]``.
    """
    ce, kl = torch.full(ids.shape, float("nan")), torch.full(ids.shape, float("nan"))
    ids = ids.to(logits.device)
    for i in range(ids.shape[0]):  # one row at a time bounds the [T, V] temporaries
        logq = logits[i, :-1].float().log_softmax(-1)
        ce[i, :-1] = -logq.gather(1, ids[i, 1:, None])[:, 0].cpu()
        kl[i, :-1] = F.kl_div(logq, clean_logp[i], log_target=True, reduction="none").sum(-1).cpu()
    return ce, kl


def random_directions(contexts: np.ndarray, length: int, d: int, seed: int) -> torch.Tensor:
    """Isotropic unit vectors ``[n, length, d]``, a pure function of (seed, context, position)."""
    out = np.stack(
        [np.random.default_rng([seed, int(c)]).standard_normal((length, d)) for c in contexts]
    )
    return torch.from_numpy(out / np.linalg.norm(out, axis=-1, keepdims=True)).float()


def interventions(x: torch.Tensor, sae: Replacer, probe: LinearProbe, u: torch.Tensor,
                  source: torch.Tensor | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The per-SAE replacements of activations ``x [m, d]`` and per-token ‖e‖², ‖ê‖², ‖e − ê‖².

    ``u [m, d]`` are unit directions for the random controls. A transcoder (``source``: its
    input activations ``[m, d_in]``) predicts ``x`` from ``source``, and its probe reads
    ``source``; an SAE reconstructs ``x`` from ``x``.
    """
    read = x if source is None else source
    with torch.inference_mode():
        x_hat = sae.forward(read)
        e = x - x_hat
        lin = probe.predict(read)
    nl = e - lin
    n_err, n_lin, n_nl = (v.norm(dim=1, keepdim=True) for v in (e, lin, nl))
    new = {
        "sae": x_hat,
        "sae+linear": x_hat + lin,
        "sae+nonlinear": x_hat + nl,
        "sae+random@error": x_hat + n_err * u,
        "sae+linear+random@nonlinear": x_hat + lin + n_nl * u,
        "sae+nonlinear+random@linear": x_hat + nl + n_lin * u,
    }
    sq = {
        "err_sq": n_err[:, 0] ** 2,
        "linear_sq": n_lin[:, 0] ** 2,
        "nonlinear_sq": n_nl[:, 0] ** 2,
    }
    return new, sq


def _replacements(xm: torch.Tensor, sm: torch.Tensor | None, mean: torch.Tensor,
                  saes: Mapping[str, tuple[Replacer, LinearProbe]], u: torch.Tensor,
                  everything: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Replacement values ``[m, d]`` of the interventions (``everything``: all, else ``MAIN``),
    and per-token squared norms ``[m]``; ``sm``: the source activations of transcoders."""
    if everything:
        yield from (("shared/x", xm), ("shared/zero", torch.zeros_like(xm)),
                    ("shared/mean", mean.to(xm).expand_as(xm)))
    for name, (sae, probe) in saes.items():
        new, sq = interventions(xm, sae, probe, u, sm)
        yield from ((f"{name}/{key}", value) for key, value in (sq | new).items()
                    if everything or key in sq or key in MAIN)


def splice_contexts(
    lm: LoadedModel,
    hook: str,
    tokens: np.ndarray,
    contexts: np.ndarray,
    spliced: np.ndarray,
    saes: Mapping[str, tuple[Replacer, LinearProbe]],
    mean: torch.Tensor,
    *,
    source: str | None = None,
    batch_size: int = 8,
    seed: int = 0,
    everything: bool = True,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """CE/KL of every intervention on ``tokens [n, T]`` (global ids ``contexts``), per token.

    ``spliced [n, T]`` marks the positions replaced. Returns ``[n, T]`` float32 arrays keyed
    ``"clean/ce"``, ``"shared/<i>/ce|kl"``, ``"<sae>/<i>/ce|kl"`` and ``"<sae>/<part>"`` (parts
    NaN where not spliced). ``everything=False`` runs only the ``MAIN`` interventions. With
    ``source``, ``saes`` are transcoders reading the activations at that hook.
    """
    n, t = tokens.shape
    splicer = HookSplicer(lm, hook, source)
    out: dict[str, np.ndarray] = {}

    def put(key: str, lo: int, value: torch.Tensor) -> None:
        out.setdefault(key, np.full((n, t), np.nan, np.float32))[lo : lo + value.shape[0]] = (
            value.numpy()
        )

    n_forwards = len(SHARED) + len(PER_SAE) * len(saes) if everything else len(MAIN) * len(saes)
    batch_size = logits_batch(lm, t, batch_size)  # clean and spliced logits are held together
    with Progress(disable=not progress, transient=True) as bar, torch.inference_mode():
        task = bar.add_task(f"splice {hook}: {len(saes)} SAE(s)", total=n * n_forwards)
        for lo in range(0, n, batch_size):
            ids = torch.from_numpy(tokens[lo : lo + batch_size].astype(np.int64))
            mask = torch.from_numpy(spliced[lo : lo + batch_size]).to(lm.device)
            x, logits = splicer.clean(ids)
            clean_logp = logits[:, :-1].float().log_softmax(-1)
            del logits
            clean_ce = torch.full(ids.shape, float("nan"))
            clean_ce[:, :-1] = -clean_logp.gather(2, ids[:, 1:, None].to(lm.device))[..., 0].cpu()
            put("clean/ce", lo, clean_ce)
            u = random_directions(contexts[lo : lo + batch_size], t, x.shape[-1], seed).to(x.device)
            sm = None if splicer.source_acts is None else splicer.source_acts[mask]
            for key, values in _replacements(x[mask], sm, mean, saes, u[mask], everything):
                if values.ndim == 1:  # a per-token squared norm, NaN where not spliced
                    full = torch.full(mask.shape, float("nan"), device=x.device)
                    full[mask] = values.float()
                    put(key, lo, full.cpu())
                    continue
                new = x.clone()
                new[mask] = values.to(new.dtype)
                ce, kl = ce_kl(splicer.splice(ids, new), ids, clean_logp)
                put(f"{key}/ce", lo, ce)
                put(f"{key}/kl", lo, kl)
                bar.advance(task, ids.shape[0])
    return out
