"""Auto-interpretability examples collected from a tiny run: quantiles, negatives and
highlights, independence of chunking, the seed, dead latents, and error SAEs' inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import AUTOINTERP_HOOK as HOOK
from helpers import collect_examples_of
from sae_darkmatter.autointerp import (
    AutoInterpConfig,
    collect_examples,
    default_saes,
    resolve_sae,
)
from sae_darkmatter.autointerp.choose import RunData
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.run_dir import RunDir
from sae_darkmatter.saes import load_sae
from sae_darkmatter.store import ActivationStore


def test_examples_by_quantile_negatives_and_highlights(run_dir, tokenizer):
    cfg = AutoInterpConfig(
        n_latents=4, n_quantiles=3, n_per_quantile=2, n_negatives=3, n_explain=3, window=8
    )
    ex, windows, sae = collect_examples_of(HOOK, run_dir, cfg, tokenizer)
    assert len(ex.latents) == 4 and ex.n_eligible == 4
    store = ActivationStore.open(run_dir / "store")
    context = store.column("context")
    checked = 0
    for le in ex.latents:
        for e in le.explain + le.scored:
            # the window's activations, recomputed from the stored x of its kept rows
            kept = windows.rows[slice(*windows.bounds(e.window))]
            with torch.inference_mode():
                acts = sae.encode(store.gather(HOOK, kept))[:, le.latent].numpy()
            assert float(acts.max()) == pytest.approx(e.activation, abs=1e-5)
            all_rows, _ = windows.token_ids(e.window)
            active = np.isin(all_rows, kept[acts > 0]).astype(int)
            runs = int(np.count_nonzero(np.diff(np.concatenate([[0], active])) == 1))
            if "<" not in e.text and ">" not in e.text:  # markers are unambiguous in this text
                assert e.highlighted.count("<<") == e.highlighted.count(">>") == runs
                assert e.text == e.highlighted.replace("<<", "").replace(">>", "")
                checked += 1
        neg = [e for e in le.scored if e.quantile == 0]
        pos = [e for e in le.scored if e.quantile > 0]
        assert all(e.activation == 0 and "<<" not in e.highlighted for e in neg)
        assert len(neg) == min(3, cfg.n_negatives) and len(pos) == 6
        by_q = {q: [e.activation for e in pos if e.quantile == q] for q in (1, 2, 3)}
        assert max(by_q[1]) <= min(by_q[2]) and max(by_q[2]) <= min(
            by_q[3]
        )  # equal-count quantiles
        acts = [e.activation for e in le.explain]
        assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
        # explanation and scoring windows come from disjoint contexts
        assert not _contexts(windows, context, le.explain) & _contexts(windows, context, le.scored)
        assert all(windows.explain[e.window] for e in le.explain)
        assert not any(windows.explain[e.window] for e in le.scored)
    assert checked > 10


def _contexts(windows, context: np.ndarray, examples) -> set[int]:
    return set(context[windows.rows[[windows.bounds(e.window)[0] for e in examples]]].tolist())


def test_examples_do_not_depend_on_chunking_and_follow_the_seed(run_dir, tokenizer):
    cfg = AutoInterpConfig(
        n_latents=3, n_quantiles=2, n_per_quantile=2, n_negatives=2, n_explain=2, window=8
    )
    a = collect_examples_of(HOOK, run_dir, cfg, tokenizer)[0]
    b = collect_examples_of(HOOK, run_dir, dataclasses.replace(cfg, chunk_rows=40), tokenizer)[0]
    assert a == b
    c = collect_examples_of(HOOK, run_dir, dataclasses.replace(cfg, seed=5), tokenizer)[0]
    assert [le.latent for le in c.latents] != [le.latent for le in a.latents]


def test_dead_latents_are_skipped(run_dir, tokenizer):
    sae = load_sae(run_dir / "saes" / "topk-w64-k8").eval()
    dead = torch.arange(0, 64, 2)
    with torch.no_grad():
        sae.b_enc[dead] = -1e6  # never among the top k
    cfg = AutoInterpConfig(
        n_latents=64, n_quantiles=2, n_per_quantile=1, n_negatives=1, n_explain=1, window=8
    )
    ex = collect_examples_of(HOOK, run_dir, cfg, tokenizer, sae=sae)[0]
    assert ex.n_dead >= dead.numel()
    assert ex.n_dead + ex.n_rare + ex.n_eligible == 64
    assert len(ex.latents) == ex.n_eligible and not {le.latent for le in ex.latents} & set(
        dead.tolist()
    )


def test_error_saes_see_the_error_parts(run_dir, tokenizer):
    specs = default_saes(run_dir)
    choices = [resolve_sae(run_dir, s) for s in specs]
    assert [c.input for c in choices] == ["x", "error", "linear", "nonlinear"]
    assert {c.base for c in choices[1:]} == {"topk-w64-k8"}
    assert len({Path(c.spec).name for c in choices[1:]}) == 1  # one width and k
    with pytest.raises(DarkMatterError, match="no SAE"):
        resolve_sae(run_dir, "no-such-sae")
    cfg = AutoInterpConfig(
        n_latents=2, n_quantiles=2, n_per_quantile=1, n_negatives=1, n_explain=2, window=8
    )
    data = RunData(RunDir(run_dir), cfg, tokenizer)
    base = load_sae(run_dir / "saes" / "topk-w64-k8").eval()
    store = ActivationStore.open(run_dir / "store")
    rows = data.windows(HOOK).rows[:50]
    x = store.gather(HOOK, rows)
    parts = data.parts(HOOK, "topk-w64-k8")(rows)
    torch.testing.assert_close(data.parts(HOOK, None)(rows)["x"], x)
    with torch.inference_mode():
        torch.testing.assert_close(parts["error"], x - base(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        parts["linear"] + parts["nonlinear"], parts["error"], rtol=1e-5, atol=1e-5
    )
    # the three error SAEs collected together (inputs computed once) = each collected alone
    members = [(load_sae(c.spec).eval(), c.input) for c in choices[1:]]
    together = collect_examples(
        members, data.parts(HOOK, "topk-w64-k8"), data.windows(HOOK), cfg, tokenizer
    )
    alone = [
        collect_examples_of(HOOK, run_dir, cfg, tokenizer, spec=c.spec)[0] for c in choices[1:]
    ]
    assert together == alone and all(len(ex.latents) == 2 for ex in alone)
