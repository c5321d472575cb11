"""Token filtering and the three disjoint splits."""

from __future__ import annotations

import numpy as np
import pytest

from sae_darkmatter.config import SplitConfig, TokenFilter
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.splits import kept_window, make_splits, rule_mask, select_rows
from sae_darkmatter.store import ActivationStore


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(0)
    st = ActivationStore.create_or_resume(
        tmp_path / "s", hooks={"resid_post.0": 4}, context_length=8,
        meta={"special_token_ids": [0, 2]},
    )
    for start in (0, 5, 10):
        tokens = rng.integers(3, 50, size=(5, 8))
        tokens[:, 3] = 2  # a special token in every context
        st.append(
            context_start=start,
            acts={"resid_post.0": rng.normal(size=(5, 8, 4)).astype(np.float32)},
            tokens=tokens,
            loss=None,
        )
    return st


def test_filter_counts_and_rows(store):
    sel = select_rows(store, TokenFilter(skip_positions=2), special_ids=[0, 2])
    pos, tok = store.column("position"), store.column("tokens")
    expected = np.flatnonzero((pos >= 2) & ~np.isin(tok, [0, 2]))
    np.testing.assert_array_equal(sel.rows, expected)
    assert sel.n_excluded_position == 15 * 2
    assert sel.n_excluded_special == 15  # position 3 of each of 15 contexts
    assert sel.summary()["tokens_kept"] == 15 * 5



def test_rules_of_a_batch_equal_those_of_the_store(store):
    """The stream applies ``rule_mask`` to a [B, T] batch of ids; the store to its columns."""
    filt = TokenFilter(skip_positions=2, stop_position=7)
    sel = select_rows(store, filt, special_ids=[0, 2])
    ids = store.column("tokens").reshape(-1, store.context_length)
    b, t = ids.shape
    keep, n_position, n_special = rule_mask(np.tile(np.arange(t), b), ids.ravel, t, filt, [0, 2])
    np.testing.assert_array_equal(np.flatnonzero(keep), sel.rows)
    assert (n_position, n_special) == (sel.n_excluded_position, sel.n_excluded_special) == (45, 15)
    assert sel.positions == kept_window(filt, t) == (2, 7)
    unused = rule_mask(np.arange(t), lambda: pytest.fail("tokens read"), t, filt, [])
    assert unused[2] == 0  # no special ids: the tokens are not read

def test_splits_disjoint_cover_and_context_level(store):
    sp = make_splits(store, SplitConfig(filter=TokenFilter(skip_positions=1), seed=3))
    parts = [sp.sae_train, sp.probe_train, sp.probe_test]
    allrows = np.concatenate(parts)
    assert len(np.unique(allrows)) == allrows.size  # disjoint
    np.testing.assert_array_equal(np.sort(allrows), sp.selection.rows)  # cover the kept rows
    ctx = store.column("context")
    # SAE-train contexts never appear in the evaluation splits
    assert not set(ctx[sp.sae_train]) & set(ctx[np.concatenate(parts[1:])])
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted for streaming reads
    again = make_splits(store, SplitConfig(filter=TokenFilter(skip_positions=1), seed=3))
    np.testing.assert_array_equal(again.probe_test, sp.probe_test)  # seeded
    other = make_splits(store, SplitConfig(filter=TokenFilter(skip_positions=1), seed=4))
    assert not np.array_equal(other.probe_test, sp.probe_test)


def test_bad_fractions_rejected(store):
    with pytest.raises(DarkMatterError, match="sae_train_fraction"):
        make_splits(store, SplitConfig(sae_train_fraction=1.0))
    with pytest.raises(DarkMatterError, match="probe_train_fraction"):
        make_splits(store, SplitConfig(probe_train_fraction=0.0))


def test_no_sae_training_split_for_pretrained_saes(store):
    sp = make_splits(store, SplitConfig(sae_train_fraction=0.0))
    assert sp.sae_train.size == 0
    kept = sp.selection.rows
    np.testing.assert_array_equal(np.sort(np.concatenate([sp.probe_train, sp.probe_test])), kept)


def test_norm_outliers_excluded_relative_to_median(tmp_path):
    rng = np.random.default_rng(1)
    st = ActivationStore.create_or_resume(
        tmp_path / "s", hooks={"h": 4}, context_length=10, meta={}
    )
    x = rng.normal(size=(6, 10, 4)).astype(np.float32)
    x[2, 4] *= 1000  # a sink in the middle of a context
    x[5, 7] *= 1000
    st.append(context_start=0, acts={"h": x}, tokens=np.full((6, 10), 7), loss=None)
    sel = select_rows(st, TokenFilter(skip_positions=1, max_norm_ratio=5.0))
    assert sel.n_excluded_norm == 2
    assert 2 * 10 + 4 not in sel.rows and 5 * 10 + 7 not in sel.rows
    norms = np.linalg.norm(x.reshape(60, 4), axis=1)
    assert sel.median_norm == pytest.approx(np.median(norms[np.arange(60) % 10 >= 1]), rel=1e-6)
    keep_all = select_rows(st, TokenFilter(skip_positions=1, max_norm_ratio=None))
    assert keep_all.rows.size == 54 and keep_all.n_excluded_norm == 0
