"""Per-token scaling analysis: known-structure norms, independent OLS references, planted contexts,
HTML escaping, mismatched test rows and figure files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import PNG_MAGIC
from sae_darkmatter._io import write_json
from sae_darkmatter.analyses.per_token import (
    darkest_contexts,
    darkest_html,
    matrix_figure,
    per_token_analysis,
    per_token_norms,
    predictability_matrix,
    token_strip_figure,
)
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.store import ActivationStore

T, N_CTX = 16, 256
# (name, width, k); written in an order that differs from the sorted one on purpose.
SAES = [("wide", 256, 8), ("narrow", 32, 8), ("mid_k4", 64, 4), ("mid_k8", 64, 8)]
SORTED = ["narrow", "mid_k4", "mid_k8", "wide"]
SCALE = {"narrow": 3.0, "mid_k4": 2.5, "mid_k8": 2.0, "wide": 1.5}
MIX = {"narrow": 0.0, "mid_k4": 1.0, "mid_k8": 2.0, "wide": 3.0}  # weight of the hidden h in ‖e‖
DARK_NL, DARK_LIN, SPARSE_CTX = 7, 12, 3


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    rng = np.random.default_rng(0)
    st = ActivationStore.create_or_resume(tmp_path_factory.mktemp("run") / "store", hooks={"h": 4},
                                          context_length=T, meta={})
    for start in range(0, N_CTX, 16):
        st.append(
            context_start=start,
            acts={"h": rng.standard_normal((16, T, 4), dtype=np.float32)},
            tokens=rng.integers(0, 1000, (16, T)),
            loss=None,
        )
    return st


@pytest.fixture(scope="module")
def test_rows(store) -> np.ndarray:
    """A seeded random 75 % of the rows; the sparse context keeps only 2 test tokens."""
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(store.n_rows, int(0.75 * store.n_rows), replace=False))
    ctx = rows // T
    sparse = rows[ctx == SPARSE_CTX]
    return np.sort(np.concatenate([rows[ctx != SPARSE_CTX], sparse[:2]]))


def make_norms(
    rows: np.ndarray, informative: bool, seed: int = 2
) -> dict[str, dict[str, np.ndarray]]:
    """‖e_j‖ = s_j·g + m_j·h + 0.3·ε_j with a shared per-token g and h.

    informative: ‖nonlinear_i‖ = h + small noise, so it tells SAE i's regression what ‖e_i‖
    cannot separate (the h part of the targets). Otherwise ‖nonlinear_i‖ is independent noise.
    """
    rng = np.random.default_rng(seed)
    n = rows.size
    g = rng.lognormal(1.0, 0.4, n)
    h = rng.gamma(4.0, 0.5, n)
    out = {}
    for name, *_ in SAES:
        e = SCALE[name] * g + MIX[name] * h + 0.3 * rng.standard_normal(n)
        nl = h + 0.05 * rng.standard_normal(n) if informative else np.abs(rng.normal(2.0, 0.5, n))
        lin = np.abs(rng.normal(1.0, 0.2, n))
        ctx = rows // T
        if (
            name == "wide"
        ):  # plant the darkest contexts, and a loud context with too few test tokens
            nl = np.where(ctx == DARK_NL, nl * 20, nl)
            lin = np.where(ctx == DARK_LIN, lin * 20, lin)
            nl = np.where(ctx == SPARSE_CTX, nl * 1000, nl)
            lin = np.where(ctx == SPARSE_CTX, lin * 1000, lin)
        out[name] = {"err": np.abs(e), "nl": np.abs(nl), "lin": lin}
    return out


def write_decompose(
    folder: Path, rows: np.ndarray, norms: dict, bad_rows_for: str | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, width, k in SAES:
        r = rows.copy()
        if name == bad_rows_for:
            r[5] += 1 if r[5] + 1 != r[6] else -1
        n = norms[name]
        write_json(
            folder / f"{name}.json",
            {
                "name": name,
                "sae": {"path": f"saes/{name}", "architecture": "topk", "k": k},
                "model": "tiny",
                "data": {},
                "metrics": {"hook": "h", "d_in": 4, "d_sae": width},
                "probe_file": f"{name}.safetensors",
            },
        )
        save_file({
            "test.rows": r.astype(np.int64),
            "test.err_sq": (n["err"] ** 2).astype(np.float32),
            "test.linear_sq": (n["lin"] ** 2).astype(np.float32),
            "test.nonlinear_sq": (n["nl"] ** 2).astype(np.float32),
            # the rest of the decompose format, unused by this analysis
            "test.err_sq_pred": (n["err"] ** 2).astype(np.float32),
            "test.x_centered_sq": np.ones(r.size, np.float32),
            "test.l0": np.full(r.size, k, np.int32),
        }, str(folder / f"{name}.safetensors"))
    write_json(folder / "summary.json", {"not": "a decomposition"})  # ignored: no probe_file
    return folder


@pytest.fixture(scope="module")
def informative(tmp_path_factory, test_rows) -> tuple[Path, dict]:
    norms = make_norms(test_rows, informative=True)
    return write_decompose(tmp_path_factory.mktemp("inf") / "decompose", test_rows, norms), norms


@pytest.fixture(scope="module")
def uninformative(tmp_path_factory, test_rows) -> tuple[Path, dict]:
    norms = make_norms(test_rows, informative=False)
    return write_decompose(tmp_path_factory.mktemp("uninf") / "decompose", test_rows, norms), norms


def test_norms_are_sorted_unsquared_and_aligned(informative, test_rows):
    folder, truth = informative
    norms = per_token_norms(folder)
    assert norms.names == SORTED
    assert norms.widths == [32, 64, 64, 256] and norms.ks == [8, 4, 8, 8]
    np.testing.assert_array_equal(norms.rows, test_rows)
    for i, name in enumerate(SORTED):
        np.testing.assert_allclose(norms.err[i], truth[name]["err"], rtol=1e-6)
        np.testing.assert_allclose(norms.nonlinear[i], truth[name]["nl"], rtol=1e-6)
        np.testing.assert_allclose(norms.linear[i], truth[name]["lin"], rtol=1e-6)
    assert per_token_norms(folder.parent).names == SORTED  # a run folder works too


def test_mismatched_rows_name_the_sae(tmp_path, test_rows):
    folder = write_decompose(
        tmp_path / "decompose", test_rows, make_norms(test_rows, True), bad_rows_for="mid_k8"
    )
    with pytest.raises(DarkMatterError, match="mid_k8"):
        per_token_norms(folder)


def _reference_r2(x: list[np.ndarray], y: np.ndarray, fit: np.ndarray, score: np.ndarray) -> float:
    """Independent held-out R² via the normal equations (np.linalg.solve), not lstsq."""
    a = np.column_stack([np.ones_like(y), *x])
    coef = np.linalg.solve(a[fit].T @ a[fit], a[fit].T @ y[fit])
    pred = a[score] @ coef
    return 1 - np.sum((y[score] - pred) ** 2) / np.sum((y[score] - y[score].mean()) ** 2)


def test_predictability_matches_independent_ols(informative):
    norms = per_token_norms(informative[0])
    res = predictability_matrix(norms, seed=3)
    json.dumps(res, allow_nan=False)  # strict JSON: NaN became None
    n = norms.rows.size
    perm = np.random.default_rng(3).permutation(n)  # the documented seeded split
    fit, score = perm[: res["n_fit"]], perm[res["n_fit"] :]
    assert res["n_fit"] + res["n_score"] == n and res["n_fit"] == round(n / 2)
    r2, r2_nl = np.array(res["r2"], dtype=float), np.array(res["r2_nl"], dtype=float)
    for i in range(4):
        for j in range(4):
            if j < i:
                assert res["r2"][i][j] is None and res["improvement"][i][j] is None
                continue
            e_i, e_j = norms.err[i], norms.err[j]
            assert r2[i, j] == pytest.approx(_reference_r2([e_i], e_j, fit, score), abs=1e-10)
            assert r2_nl[i, j] == pytest.approx(
                _reference_r2([e_i, norms.nonlinear[i]], e_j, fit, score), abs=1e-10
            )
            # Held-out R² of one regressor = squared correlation on the scored tokens, less the
            # cost of coefficients fit on the other half: ~(1 − R²)·χ²₂/n_fit ≈ 0.001 here.
            corr = np.corrcoef(e_i[score], e_j[score])[0, 1]
            assert corr**2 - 0.01 < r2[i, j] <= corr**2 + 1e-12
    assert np.allclose(np.diag(r2), 1.0) and all(res["improvement"][i][i] is None for i in range(4))


def test_r2_intervals_resample_the_scored_tokens(informative):
    """Each interval holds its R²; one pair's equals an explicit resampling with the documented
    draws; more resamples of the same tokens move it little, and a perfect fit has no width."""
    norms = per_token_norms(informative[0])
    res = predictability_matrix(norms, seed=3, n_boot=300)
    perm = np.random.default_rng(3).permutation(norms.rows.size)
    fit, score = perm[: res["n_fit"]], perm[res["n_fit"] :]
    rng = np.random.default_rng([3, 1])
    draws = []
    for _ in range(300):
        pick = score[rng.integers(0, score.size, score.size)]
        coef = np.polyfit(norms.err[0][fit], norms.err[1][fit], 1)  # the fit stays fixed
        resid = norms.err[1][pick] - np.polyval(coef, norms.err[0][pick])
        y = norms.err[1][pick]
        draws.append(1 - resid @ resid / ((y - y.mean()) @ (y - y.mean())))
    assert res["r2_ci"][0][1] == pytest.approx(np.percentile(draws, [2.5, 97.5]), abs=1e-9)
    for i in range(4):
        assert res["r2_ci"][i][i] == pytest.approx([1.0, 1.0])
        for j in range(4):
            if j < i:
                assert res["r2_ci"][i][j] is None
                continue
            low, high = res["r2_ci"][i][j]
            assert low <= res["r2"][i][j] <= high and high - low < 0.1


def test_informative_nonlinear_error_removes_unexplained_variance(informative):
    res = predictability_matrix(per_token_norms(informative[0]))
    imp = res["improvement"]
    r2 = np.array(res["r2"], dtype=float)
    # ‖e_i‖ mixes g and h in a ratio unlike ‖e_j‖'s; knowing h (≈ ‖nonlinear_i‖) separates them,
    # leaving only the 0.3·ε noise: most of the unexplained variance goes away.
    for i in range(4):
        for j in range(i + 1, 4):
            assert r2[i, j] < 0.97
            assert imp[i][j] > 50, (i, j, imp[i][j])


def test_uninformative_nonlinear_error_changes_nothing(uninformative):
    res = predictability_matrix(per_token_norms(uninformative[0]))
    # An irrelevant regressor changes held-out unexplained variance by ~χ²₁/n_fit ≈ 0.07 %
    # (n_fit ≈ 1540) plus a score-half term of similar size; 1 % is over 10 times that.
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(res["improvement"][i][j]) < 1.0, (i, j, res["improvement"][i][j])


def test_darkest_contexts_find_planted_context(informative, store, test_rows):
    folder, truth = informative
    tokens, position = store.column("tokens"), store.column("position")
    for by, planted, key in [("nonlinear", DARK_NL, "nl"), ("linear", DARK_LIN, "lin")]:
        ctxs = darkest_contexts(folder, store, by=by, n=3)
        assert len(ctxs) == 3 and ctxs[0]["context"] == planted  # never the 2-token SPARSE_CTX
        assert SPARSE_CTX not in [c["context"] for c in ctxs]
        assert ctxs[0]["score"] > ctxs[1]["score"] >= ctxs[2]["score"]
        c = ctxs[0]
        in_test = test_rows[test_rows // T == planted]
        assert c["n_test"] == in_test.size and c["sae"] == "wide"
        assert [t["position"] for t in c["tokens"]] == list(range(T))  # the whole context
        rows = planted * T + np.arange(T)
        assert [t["text"] for t in c["tokens"]] == [f"<{tokens[r]}>" for r in rows]
        values = dict(zip(test_rows.tolist(), truth["wide"][key].tolist()))
        for r, t in zip(rows, c["tokens"]):
            assert (t["value"] is None) == (r not in values)
            if t["value"] is not None:
                assert t["value"] == pytest.approx(values[r], rel=1e-6)
        assert c["score"] == pytest.approx(np.mean([values[r] for r in in_test]), rel=1e-6)
        assert (position[rows] == np.arange(T)).all()
    narrow = darkest_contexts(folder, store, sae="narrow", n=1, by="total")
    assert narrow[0]["sae"] == "narrow"
    with pytest.raises(DarkMatterError, match="no decomposition for SAE"):
        darkest_contexts(folder, store, sae="nope")
    assert darkest_contexts(folder, store, min_tokens=T + 1) == []


class _CharTokenizer:
    """A real (if tiny) tokenizer: id -> one fixed string; other ids decode to a broken math string,
    which matplotlib would fail to parse if token labels were not escaped."""

    vocab = {1: "<script>", 2: "alert(1)", 3: "</script>", 4: "\n", 5: " a&b"}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab.get(i, "$x^$") for i in ids)


def test_darkest_html_escapes_and_shades():
    tok = _CharTokenizer()
    ctx = {"context": 9, "score": 2.0, "n_test": 3, "tokens": [
        {"text": tok.decode([i]), "position": p, "value": v}
        for p, (i, v) in enumerate([(1, 4.0), (2, None), (3, 2.0), (4, 0.0), (5, 1.0)])
    ]}
    out = darkest_html([ctx], title="<b>title</b>")
    assert "<script>" not in out and "</script>" not in out and "<b>" not in out
    assert "&lt;script&gt;" in out and "&lt;/script&gt;" in out and "&lt;b&gt;title" in out
    assert "↵" in out and "\n</span>" not in out and " a&amp;b" in out
    assert out.count("<span") == 5
    assert "rgb(255,0,0)" in out  # the maximum is full red
    assert "rgb(255,128,128)" in out  # half the maximum
    assert "rgb(255,255,255)" in out  # zero is white
    assert "background:#eee" in out and "not a test token" in out  # the token without a value
    assert 'title="position 0: 4"' in out
    assert "No context" in darkest_html([], title="x")


def test_figures_and_full_analysis(informative, store, tmp_path):
    folder, _ = informative
    norms = per_token_norms(folder)
    res = predictability_matrix(norms)
    p = matrix_figure(res, tmp_path / "m.png")
    assert p.read_bytes()[:8] == PNG_MAGIC
    p = token_strip_figure(
        norms, store, tmp_path / "s.png", start=10, length=20, tokenizer=_CharTokenizer()
    )
    assert p.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(DarkMatterError, match="start"):
        token_strip_figure(norms, store, tmp_path / "x.png", start=norms.rows.size)

    summary = per_token_analysis(folder, store.path, tmp_path / "out", seed=0)
    json.dumps(summary, allow_nan=False)
    for name in ("per_token_matrix.png", "per_token_strip.png"):
        assert (tmp_path / "out" / "figures" / name).read_bytes()[:8] == PNG_MAGIC
    assert summary["names"] == SORTED and summary["n_test"] == norms.rows.size
    assert summary["predictability"]["r2"] == res["r2"]
    assert summary["darkest"]["nonlinear"]["contexts"][0]["context"] == DARK_NL
    assert summary["darkest"]["linear"]["contexts"][0]["context"] == DARK_LIN
    assert "<span" in summary["darkest"]["nonlinear"]["html"]
    assert summary["mean_norm"]["total"][0] == pytest.approx(norms.err[0].mean())
