"""Named presets of a run's settings: ``quick`` (the same pipeline on less data) and ``paper``
(the protocol of Engels et al., *Decomposing The Dark Matter of Sparse Autoencoders*).

A preset returns a changed ``RunConfig``; the CLI applies ``--protocol`` before its own flags
(which win) and ``--quick`` after them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from sae_darkmatter.config import RunConfig
from sae_darkmatter.errors import ConfigError

PAPER_EVAL_CONTEXTS = 300
PAPER_CONTEXT_LENGTH = 1024
PAPER_FIRST_POSITION = 200  # Lieberum et al.: earlier tokens are easier for SAEs to reconstruct
PAPER_PROBE_TRAIN_TOKENS = 150_000


def quick(cfg: RunConfig) -> RunConfig:
    """The ``--quick`` preset: the same pipeline on ~5x less data and smaller SAEs (~3 min on a
    CPU)."""
    h = cfg.harvest
    corpus = dataclasses.replace(h.corpus, n_contexts=320)
    return dataclasses.replace(
        cfg,
        harvest=dataclasses.replace(h, corpus=corpus),
        train=dataclasses.replace(cfg.train, widths=(128, 256, 512, 1024), train_tokens=100_000),
        pursuit=dataclasses.replace(cfg.pursuit, max_tokens=8_000),
        # every intervention on 4 contexts, x̂, x̂ + ê, x̂ + (e − ê) on up to 8 more (one round)
        downstream=dataclasses.replace(cfg.downstream, n_contexts=4, max_contexts=12),
        error_saes=dataclasses.replace(
            cfg.error_saes, train=dataclasses.replace(cfg.error_saes.train, train_tokens=24_000)),
        transcoders=dataclasses.replace(cfg.transcoders, train=dataclasses.replace(
            cfg.transcoders.train, widths=(128, 256, 512, 1024), train_tokens=100_000)),
    )


def paper_protocol(cfg: RunConfig) -> RunConfig:
    """The paper's protocol: 300 evaluation contexts of 1,024 tokens; statistics on positions
    200..1022 only (823 per context, 246,900 tokens when none is a special token); 150,000 of
    them train the probes (with bias) and the rest (~96,900) are held out; no norm-outlier
    filter; the downstream splice replaces every position from 200 on.

    With pretrained SAEs (``cfg.saes``) every context evaluates; otherwise enough contexts are
    harvested that 300 remain after ``split.sae_train_fraction`` of them train the SAEs. What
    still differs from the authors' scripts is listed in the README ("The paper's protocol").
    """
    fraction = 0.0 if cfg.saes else cfg.split.sae_train_fraction
    corpus = dataclasses.replace(cfg.harvest.corpus, context_length=PAPER_CONTEXT_LENGTH,
                                 n_contexts=math.ceil(PAPER_EVAL_CONTEXTS / (1 - fraction)))
    filt = dataclasses.replace(cfg.split.filter, skip_positions=PAPER_FIRST_POSITION,
                               stop_position=PAPER_CONTEXT_LENGTH - 1, max_norm_ratio=None)
    return dataclasses.replace(
        cfg,
        harvest=dataclasses.replace(cfg.harvest, corpus=corpus),
        split=dataclasses.replace(
            cfg.split, filter=filt, probe_train_tokens=PAPER_PROBE_TRAIN_TOKENS
        ),
        decompose=dataclasses.replace(cfg.decompose, bias=True),
        downstream=dataclasses.replace(cfg.downstream, splice_all_after_skip=True),
    )


PROTOCOLS: dict[str, Callable[[RunConfig], RunConfig]] = {
    "default": lambda cfg: cfg,
    "paper": paper_protocol,
}


def protocol(name: str, cfg: RunConfig) -> RunConfig:
    """``cfg`` with the named protocol's settings (``PROTOCOLS``)."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name](cfg)
