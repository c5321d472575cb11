"""The downstream stopping rule: more contexts for x̂, x̂ + ê and x̂ + (e − ê) until the
gap-closed intervals are narrow enough, on constructed per-token data and on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import make_run
from sae_darkmatter.analyses.downstream import PER_TOKEN_FILE, _more_contexts, downstream_analysis
from sae_darkmatter.analyses.downstream_stats import TARGETED, summarize
from sae_darkmatter.analyses.splice import MAIN, PER_SAE, SHARED
from sae_darkmatter.config import DownstreamConfig, ModelConfig
from sae_darkmatter.errors import ConfigValueError
from sae_darkmatter.models import load_model

T = 6
GAP = {"sae": 1.0, "sae+linear": 0.3, "sae+nonlinear": 0.6}  # CE above clean: closes 0.7, 0.4


def _rows(rng: np.random.Generator, n: int, names: dict[str, float],
          everything: bool) -> dict[str, np.ndarray]:
    """Per-token CE/KL of ``n`` contexts: clean ~3; each SAE's interventions add ``GAP`` plus
    per-context noise of the SAE's scale (``names``), the controls a gap of 1.2."""
    clean = rng.normal(3, 0.3, (n, T))
    out = {"clean/ce": clean}
    if everything:
        out |= {f"shared/{i}/{q}": clean + (q == "ce") for i in SHARED for q in ("ce", "kl")}
    for name, noise in names.items():
        for i in PER_SAE if everything else MAIN:
            ce = clean + GAP.get(i, 1.2) + rng.normal(0, noise, (n, 1))
            out |= {f"{name}/{i}/ce": ce, f"{name}/{i}/kl": ce - clean}
        out |= {f"{name}/{p}": np.full((n, T), v) for p, v in
                (("err_sq", 1.0), ("linear_sq", 0.5), ("nonlinear_sq", 0.5))}
    return {k: v.astype(np.float32) for k, v in out.items()}


def _reference_half_width(pt: dict[str, np.ndarray], avg: np.ndarray, name: str, key: str,
                          m: int, n_boot: int, seed: int) -> float:
    """Numpy reference: the percentile interval of the gap closed over the first ``m`` rows
    with the same multinomial draws."""
    w = np.random.default_rng([seed, m]).multinomial(m, np.full(m, 1 / m), size=n_boot)
    s = {k: w @ np.where(avg[:m], pt[k][:m], 0).sum(1, dtype=np.float64)
         for k in ("clean/ce", f"{name}/sae/ce", f"{name}/{key}/ce")}
    gap = (s[f"{name}/sae/ce"] - s[f"{name}/{key}/ce"]) / (s[f"{name}/sae/ce"] - s["clean/ce"])
    lo, hi = np.percentile(gap, [2.5, 97.5])
    return (hi - lo) / 2


def test_stopping_rule_stops_each_sae_when_its_intervals_are_narrow_enough():
    noise = {"quiet": 0.08, "loud": 0.15, "hopeless": 1.0}  # per-context CE noise (gap: 1 nat)
    n_max, batch, first, target, n_boot = 96, 8, 8, 0.05, 400
    data = _rows(np.random.default_rng(0), n_max, noise, everything=False)
    start = _rows(np.random.default_rng(1), first, noise, everything=True)
    for k in data:  # the first round's rows are the same contexts
        data[k][:first] = start[k]
    calls = []

    def splice(lo, hi, chosen):
        calls.append((lo, hi, sorted(chosen)))
        return {k: v[lo:hi] for k, v in data.items() if k.split("/")[0] in {"clean", *chosen}}

    avg = np.ones((n_max, T), bool)
    avg[:, -1] = False
    cfg = DownstreamConfig(n_contexts=first, batch_size=batch, max_contexts=n_max, n_boot=n_boot,
                           target_half_width=target)
    pt, used = _more_contexts(start, cfg, avg, dict.fromkeys(noise), splice)
    # a quieter SAE needs fewer contexts; one that cannot reach the target stops at the cap
    assert first < used["quiet"] < used["loud"] < used["hopeless"] == n_max
    assert calls[0] == (first, first + batch, ["hopeless", "loud", "quiet"])
    assert all(c[2] == ["hopeless"] for c in calls if c[0] >= used["loud"])
    assert calls[-1][1] == n_max and all(m % batch == 0 for m in used.values())

    def widest(name: str, m: int) -> float:  # numpy reference
        return max(_reference_half_width(pt, avg, name, k, m, n_boot, 0) for k in TARGETED)

    summary = summarize(pt, avg, list(noise), first=first, contexts=used, n_boot=n_boot)["saes"]
    for name, m in used.items():
        assert summary[name]["contexts"] == m
        for key in TARGETED:
            assert summary[name]["half_width"][key] == pytest.approx(
                _reference_half_width(pt, avg, name, key, m, n_boot, 0), rel=1e-9)
        assert widest(name, m - batch) > target  # it went on while above the target...
        assert (widest(name, m) <= target) == (name != "hopeless")  # ...and stopped below it
    # the extra rows hold only the MAIN interventions; controls and ablations: the first round
    assert np.isnan(pt["loud/sae+random@error/ce"][first:]).all()
    assert np.isnan(pt["shared/zero/ce"][first:]).all()
    assert np.isfinite(pt["quiet/sae+linear/ce"][: used["quiet"]]).all()
    assert np.isnan(pt["quiet/sae+linear/ce"][used["quiet"] :]).all()


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # "a"'s controls on rows 8-16: none ran
def test_summary_on_leading_rows_equals_the_summary_of_those_rows_alone():
    rng = np.random.default_rng(2)
    pt = _rows(rng, 24, {"a": 0.5, "b": 0.5}, everything=True)
    controls = [f"{n}/{i}/{q}" for n in "ab" for i in PER_SAE[3:] for q in ("ce", "kl")]
    for k in pt:  # the first 8 rows ran everything; "a" ran MAIN on 16, "b" on 24
        if k.startswith("shared/") or k in controls:
            pt[k][8:] = np.nan
        elif k.startswith("a/"):
            pt[k][16:] = np.nan
    avg = np.ones((24, T), bool)
    got = summarize(pt, avg, ["a", "b"], first=8, contexts={"a": 16, "b": 24}, n_boot=300)
    head = summarize({k: v[:16] for k, v in pt.items()}, avg[:16], ["a"], n_boot=300)
    first = summarize({k: v[:8] for k, v in pt.items()}, avg[:8], ["b"], n_boot=300)
    assert got["saes"]["a"]["ce_gap_closed"]["sae+linear"] == head["saes"]["a"]["ce_gap_closed"][
        "sae+linear"]
    ctrl = "sae+nonlinear+random@linear"
    assert got["saes"]["b"]["ce_gap_closed"][ctrl] == first["saes"]["b"]["ce_gap_closed"][ctrl]
    assert got["shared"] == first["shared"]
    assert np.isfinite(got["saes"]["b"]["ce_gap_closed"]["sae+nonlinear"]["mean"])
    assert got["saes"]["a"]["contexts"] == 16 and got["saes"]["b"]["contexts"] == 24


def test_paired_difference_of_the_parts():
    """Linear minus nonlinear gap closed resamples both on the same contexts: its interval is
    the percentile interval of the paired draws, much narrower than the parts' when their
    noise is shared."""
    rng = np.random.default_rng(3)
    pt = _rows(rng, 40, {"s": 0.0}, everything=True)
    shared = rng.normal(0, 0.8, (40, 1)).astype(np.float32)  # the same noise in both parts
    for i in ("sae+linear", "sae+nonlinear"):
        pt[f"s/{i}/ce"] = pt[f"s/{i}/ce"] + shared
    avg = np.ones((40, T), bool)
    s = summarize(pt, avg, ["s"], n_boot=500)["saes"]["s"]
    diff, gap = s["ce_gap_closed_linear_minus_nonlinear"], s["ce_gap_closed"]
    assert diff["mean"] == pytest.approx(gap["sae+linear"]["mean"] - gap["sae+nonlinear"]["mean"])
    assert diff["mean"] == pytest.approx(0.3, abs=1e-5)  # 0.7 − 0.4: the shared noise cancels
    assert diff["ci"][1] - diff["ci"][0] < 1e-4 < gap["sae+linear"]["ci"][1] - gap["sae+linear"][
        "ci"][0]


@pytest.mark.parametrize(("field", "value", "match"), [
    ("target_half_width", 0.0, "a finite number > 0"),
    ("target_half_width", -0.1, "a finite number > 0"),
    ("target_half_width", float("inf"), "a finite number > 0"),
    ("target_half_width", float("nan"), "a finite number > 0"),
    ("max_contexts", 4, r">= n_contexts \(8\)"),
])
def test_bad_stopping_settings_are_named(field, value, match):
    with pytest.raises(ConfigValueError, match=rf"downstream.*{field}.*{match}"):
        DownstreamConfig(**{field: value})


def test_stopping_settings_defaults_and_unset_target():
    cfg = DownstreamConfig()
    assert (cfg.n_contexts, cfg.target_half_width, cfg.max_contexts) == (8, 0.05, 160)
    assert DownstreamConfig(target_half_width=None, n_contexts=500).max_contexts == 160


def test_more_contexts_on_a_tiny_model_equal_a_plain_splice_of_them(tiny_model_dir, tmp_path):
    """Rounds after the first splice x̂, x̂ + ê, x̂ + (e − ê) exactly as a splice of every
    intervention on all those contexts does; the result records what the rule did."""
    out = make_run(tiny_model_dir, tmp_path / "run", "resid_post.2", widths=(64,))
    lm = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    cfg = DownstreamConfig(n_contexts=4, batch_size=4, max_contexts=12, n_boot=50,
                           target_half_width=1e-6, select="all")
    result = downstream_analysis(out, lm=lm, cfg=cfg, progress=False)
    pt = load_file(out / PER_TOKEN_FILE)
    plain = downstream_analysis(out, lm=lm, progress=False, cfg=DownstreamConfig(
        n_contexts=12, batch_size=4, n_boot=50, target_half_width=None, select="all"))
    ref = load_file(out / PER_TOKEN_FILE)
    np.testing.assert_array_equal(pt["contexts"], ref["contexts"])
    assert result["contexts"] == plain["contexts"] and len(result["contexts"]) == 12
    for key in ("clean/ce", *(f"topk-w64-k8/{i}/ce" for i in MAIN)):
        np.testing.assert_allclose(pt[key], ref[key], rtol=0, atol=1e-5)
    for key in ("shared/zero/ce", "topk-w64-k8/sae+random@error/ce"):
        np.testing.assert_allclose(pt[key][:4], ref[key][:4], rtol=0, atol=1e-5)
        assert np.isnan(pt[key][4:]).all()
    assert np.isnan(pt["reference_loss"][4:]).all()
    assert np.isfinite(pt["reference_loss"][:4, :-1]).all()
    target = result["target"]
    assert target == {"half_width": 1e-6, "max_contexts": 12, "first_round": 4,
                      "contexts_allowed": 12, "met": False,
                      "widest_half_width": pytest.approx(max(
                          h for s in result["saes"] for h in s["half_width"].values()))}
    assert [s["contexts"] for s in result["saes"]] == [12]
    assert result["table"][0]["contexts"] == 12
    # a target every SAE meets at once: the first round only
    easy = downstream_analysis(out, lm=lm, progress=False, cfg=DownstreamConfig(
        n_contexts=4, batch_size=4, max_contexts=12, n_boot=50, target_half_width=1e9))
    assert easy["target"]["met"] is True and len(easy["contexts"]) == 4



def test_max_contexts_equal_to_n_contexts_splices_exactly_n_contexts():
    """What a TOML file (no null) writes for "no stopping rule"."""
    start = _rows(np.random.default_rng(4), 8, {"s": 5.0}, everything=True)  # far above ±0.05

    def splice(lo, hi, chosen):
        raise AssertionError(f"spliced rows {lo}:{hi}")

    cfg = DownstreamConfig(n_contexts=8, max_contexts=8)
    pt, used = _more_contexts(start, cfg, np.ones((8, T), bool), {"s": None}, splice)
    assert used == {"s": 8} and pt["s/sae/ce"].shape == (8, T)
