"""Error decomposition of SAEs on one hook: linear vs nonlinear dark matter.

With ``e = x − x̂`` the SAE error, a least-squares probe ``ê = [x, 1]·W`` is fit on the
probe-train tokens, and everything reported is scored on the disjoint probe-test tokens:

- ``fvu``            Σ‖e‖² / Σ‖x − x̄‖²           (the SAE's fraction of variance unexplained)
- ``fvu_nonlinear``  Σ‖e − ê‖² / Σ‖x − x̄‖²       (what no linear function of x predicts)
- ``fvu_linear``     fvu − fvu_nonlinear
- ``linear_share``   1 − Σ‖e − ê‖² / Σ‖e‖²        (share of the error that is linearly predictable)
- ``r2_error_mean_dim`` mean over dimensions of per-dimension R² of ê (the paper's headline)
- ``r2_error_pooled`` 1 − Σ‖e − ê‖² / Σ‖e − ē‖²
- ``r2_error_norm``  R² of predicting ‖e‖² from [x, 1] (its own probe)

Hostile inputs are refused before any fitting: an SAE whose ``d_in`` or parameter dtypes do not
fit the stored hook (``check_sae``), and NaN/inf in the stored activations or in an SAE's
reconstructions (``require_finite``, ``SAEErrors``; the error lists the first contexts and
positions and a count). A degenerate probe system (constant or collinear x dimensions) is solved
with a pseudo-inverse; the metrics then carry ``probe_regularized``, ``probe_rank`` and
``probe_cond``.

Many SAEs of one hook are decomposed together: one pass fits all their probes (one least-squares
system with the error targets of every SAE side by side, so XᵀX is accumulated and factored
once), a second pass scores them. Both passes stream over the store in chunks; memory grows only
with the per-token scalars kept for the held-out tokens (for bootstraps and per-token analyses).

Transcoders (``x`` at one hook, ``y`` at another, ``ŷ = decode(encode(x)) + skip(x)``) are
decomposed the same way with ``e = y − ŷ``: the probe reads ``x``, FVU is relative to ``y``'s
variance, and a skip transcoder's metrics also say how much linear dark matter its skip term
absorbs (``transcoders``, ``SkipAccount``).

The nested prefixes of one SAE (its first ``m`` latents of a latent order, for several ``m``:
a Matryoshka SAE's groups, or an ordinary SAE's most frequent latents) are decomposed together
in the same way, one result per width (``prefixes``, ``decompose_prefixes``), so a scaling law
in width can be fit from a single SAE.

One core, two drivers:

- ``core``: the per-chunk arithmetic (``SAEErrors``, ``probe_system``, ``HeldOutScores``,
  intervals); ``checks``: the refusals; ``results``: the result types and their files.
- ``from_store``: ``decompose`` / ``decompose_many`` on a harvested store; ``transcoders``:
  ``decompose_transcoders`` on a store holding both of their hooks; ``prefixes``:
  ``decompose_prefixes`` of one SAE on a store.
- ``stream``: ``stream_decompose``, activations straight from the LM, nothing stored (imported
  on its own: ``sae_darkmatter.stream`` re-exports it).
"""

from sae_darkmatter.decompose.checks import (
    Locate,
    check_sae,
    check_width,
    require_finite,
    require_finite_at,
    sae_compute_dtype,
)
from sae_darkmatter.decompose.core import (
    JACKKNIFE_GROUPS,
    N_BOOT,
    HeldOutScores,
    SAEErrors,
    bootstrap_intervals,
    chunk_size,
    probe_system,
    split_probes,
)
from sae_darkmatter.decompose.from_store import decompose, decompose_many, decompose_rows
from sae_darkmatter.decompose.prefixes import (
    ORDERS,
    LatentOrder,
    PrefixErrors,
    check_order,
    check_prefix_widths,
    decompose_prefixes,
    default_prefix_widths,
    firing_order,
    plan_prefixes,
    prefix_name,
)
from sae_darkmatter.decompose.results import (
    TOKEN_ARRAYS,
    Decomposition,
    DecompositionOutput,
    SavedDecomposition,
    SkipAccount,
    load_decompositions,
)
from sae_darkmatter.decompose.transcoders import (
    TranscoderErrors,
    check_transcoder,
    decompose_transcoders,
)

__all__ = [
    "JACKKNIFE_GROUPS",
    "N_BOOT",
    "ORDERS",
    "TOKEN_ARRAYS",
    "Decomposition",
    "DecompositionOutput",
    "HeldOutScores",
    "LatentOrder",
    "Locate",
    "PrefixErrors",
    "SAEErrors",
    "SavedDecomposition",
    "SkipAccount",
    "TranscoderErrors",
    "bootstrap_intervals",
    "check_order",
    "check_prefix_widths",
    "check_sae",
    "check_transcoder",
    "check_width",
    "chunk_size",
    "decompose",
    "decompose_many",
    "decompose_prefixes",
    "decompose_rows",
    "decompose_transcoders",
    "default_prefix_widths",
    "firing_order",
    "load_decompositions",
    "plan_prefixes",
    "prefix_name",
    "probe_system",
    "require_finite",
    "require_finite_at",
    "sae_compute_dtype",
    "split_probes",
]
