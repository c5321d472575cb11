"""Splicing interventions into a tiny random Llama: exactness against plain-transformers
references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, GPTNeoXConfig

from helpers import PNG_MAGIC, make_run
from sae_darkmatter import (
    ModelConfig,
    SplitConfig,
)
from sae_darkmatter.analyses.downstream import PER_TOKEN_FILE, downstream_analysis
from sae_darkmatter.analyses.downstream_stats import summarize
from sae_darkmatter.analyses.splice import (
    PER_SAE,
    HookSplicer,
    interventions,
    random_directions,
)
from sae_darkmatter.config import DownstreamConfig
from sae_darkmatter.decompose import load_decompositions
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.linalg import LinearProbe
from sae_darkmatter.models import LoadedModel, load_model
from sae_darkmatter.saes import TopKSAE, load_sae
from sae_darkmatter.store import ActivationStore

HOOKS = ("resid_post.2", "mlp_out.1", "attn_out.3", "mlp_in.1")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))


@pytest.fixture(scope="module", params=HOOKS)
def spliced_run(request, tiny_model_dir, tmp_path_factory, lm):
    """A run harvested the default way, without the per-token loss, and its downstream result."""
    out = make_run(tiny_model_dir, tmp_path_factory.mktemp("run"), request.param)
    cfg = DownstreamConfig(n_contexts=6, batch_size=4, n_boot=200, select="all",
                           target_half_width=None)  # every intervention on every context
    result = downstream_analysis(out, lm=lm, cfg=cfg, progress=False)
    return request.param, out, result, load_file(out / PER_TOKEN_FILE)


def _module(model, hook: str):
    """The hooked module, found by hand (not through sae_darkmatter.models)."""
    kind, layer = hook.split(".")
    block = model.model.layers[int(layer)]
    return {"resid_post": block, "mlp_out": block.mlp, "attn_out": block.self_attn,
            "mlp_in": block.mlp}[kind]


def _manual_ce(lm, hook: str, ids: np.ndarray, replace) -> np.ndarray:
    """Per-token CE [B, T-1] with a plain forward hook that rewrites the module's output (a
    forward pre-hook that rewrites its input for mlp_in)."""

    def hook_fn(_m, _a, out):
        first = out[0] if isinstance(out, tuple) else out
        new = replace(first)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    module = _module(lm.model, hook)
    if hook.startswith("mlp_in"):
        handle = module.register_forward_pre_hook(lambda _m, args: (replace(args[0]), *args[1:]))
    else:
        handle = module.register_forward_hook(hook_fn)
    try:
        with torch.no_grad():
            ids_t = torch.from_numpy(ids.astype(np.int64))
            logits = lm.model(input_ids=ids_t).logits
    finally:
        handle.remove()
    return np.stack([F.cross_entropy(logits[b, :-1], ids_t[b, 1:], reduction="none").numpy()
                     for b in range(ids.shape[0])])


def _tokens(out: Path, contexts: np.ndarray) -> np.ndarray:
    st = ActivationStore.open(out / "store")
    return st.column("tokens").reshape(-1, st.context_length)[contexts]


def test_identity_splice_reproduces_recomputed_loss_exactly(spliced_run):
    _, out, result, pt = spliced_run
    assert np.isnan(ActivationStore.open(out / "store").column("loss")).all()  # no loss stored
    check = result["check"]
    assert check["reference"] == "recomputed"
    with safe_open(out / PER_TOKEN_FILE, "np") as f:
        assert f.metadata() == {"reference": "recomputed"}
    valid = np.isfinite(pt["reference_loss"])
    assert valid[:, :-1].all() and not valid[:, -1].any()
    # The plain forward and the splice's clean pass run the same float32 model on the same
    # batches; only the CE arithmetic differs (cross_entropy vs log_softmax + gather): ~1e-6.
    np.testing.assert_allclose(pt["clean/ce"][valid], pt["reference_loss"][valid], rtol=0,
                               atol=2e-5)
    assert check["clean_vs_reference_max_abs"] <= 2e-5
    # the plain forward's activations at the hook are the stored ones (another batch
    # composition than the harvest's 16 contexts: float32 rounding only)
    assert check["activations_vs_stored_max_rel"] < 1e-5
    # The identity splice replays the clean tensors: bit-identical logits.
    np.testing.assert_array_equal(pt["shared/x/ce"], pt["clean/ce"])
    assert np.nanmax(np.abs(pt["shared/x/kl"])) < 1e-6
    assert result["check"]["identity_vs_clean_max_abs"] == 0.0
    assert result["shared"]["x"]["ce_increase"]["mean"] == pytest.approx(0.0, abs=1e-7)


def test_zero_ablation_matches_manual_reference(spliced_run, lm):
    hook, out, _, pt = spliced_run
    mask = torch.from_numpy(pt["spliced"])
    ids = _tokens(out, pt["contexts"])
    ref = _manual_ce(lm, hook, ids, lambda x: torch.where(mask[..., None], torch.zeros_like(x), x))
    np.testing.assert_allclose(pt["shared/zero/ce"][:, :-1], ref, rtol=0, atol=2e-5)
    # positions before the first spliced one are causally untouched: KL exactly 0
    first = int(np.argmax(pt["spliced"].any(axis=0)))
    assert first >= 1 and np.all(pt["shared/zero/kl"][:, :first] == 0)
    assert np.nanmean(pt["shared/zero/kl"]) > 1e-4  # and the ablation does change the output


def test_sae_splices_match_manual_reference(spliced_run, lm):
    hook, out, result, pt = spliced_run
    name = result["saes"][0]["name"]
    sae = load_sae(out / "saes" / name)
    dec = next(d for d in load_decompositions(out / "decompose") if d.name == name)
    w = torch.from_numpy(load_file(dec.probe_path)["error_probe.weight"])
    b = torch.from_numpy(load_file(dec.probe_path)["error_probe.bias"])
    mask = torch.from_numpy(pt["spliced"])[..., None]
    ids = _tokens(out, pt["contexts"])

    def with_sae(linear: bool):
        def replace(x):
            with torch.no_grad():
                x_hat = sae(x)
            new = x_hat + ((x.double() @ w + b).float() if linear else 0)
            return torch.where(mask, new, x)
        return replace

    for key, linear in (("sae", False), ("sae+linear", True)):
        ref = _manual_ce(lm, hook, ids, with_sae(linear))
        np.testing.assert_allclose(pt[f"{name}/{key}/ce"][:, :-1], ref, rtol=0, atol=1e-4)
    # x̂ + ê + (e − ê) = x: the two parts sum to the clean activation
    e = pt[f"{name}/err_sq"]
    assert np.isnan(e[~pt["spliced"]]).all() and np.isfinite(e[pt["spliced"]]).all()


def test_shares_and_intervals_are_consistent(spliced_run):
    _, _, result, pt = spliced_run
    avg = pt["averaged"]
    assert result["tokens"]["averaged"] == int(avg.sum())
    assert result["tokens"]["averaged_probe_train"] + result["tokens"][
        "averaged_probe_test"
    ] == int(avg.sum())
    assert not avg[:, -1].any() and not avg[:, 0].any()  # last position, and skip_positions=1
    for s in result["saes"]:
        name = s["name"]
        # recompute the linear part's CE gap closed from the per-token file
        sums = {
            k: np.where(avg, pt[f"{name}/{k}/ce"], 0).sum(dtype=np.float64)
            for k in ("sae", "sae+linear")
        }
        clean = np.where(avg, pt["clean/ce"], 0).sum(dtype=np.float64)
        closed = (sums["sae"] - sums["sae+linear"]) / (sums["sae"] - clean)
        assert s["ce_gap_closed"]["sae+linear"]["mean"] == pytest.approx(closed, rel=1e-9)
        assert s["ce_gap_closed"]["sae"]["mean"] == 0.0
        share, fvu = s["sq_norm_share"], s["fvu_gap_closed"]
        assert fvu["linear"]["mean"] == pytest.approx(1 - share["nonlinear"]["mean"])
        assert fvu["nonlinear"]["mean"] == pytest.approx(1 - share["linear"]["mean"])
        # the probe is least squares: over its own fit tokens ‖ê‖² + ‖e − ê‖² = ‖e‖²; on these
        # contexts (half fit, half held-out tokens) the sum stays close to 1
        assert 0.8 < share["linear"]["mean"] + share["nonlinear"]["mean"] < 1.2
        for group in ("ce", "kl", "ce_gap_closed", "sq_norm_share"):
            for stat in s[group].values():
                lo, hi = stat["ci"]
                assert lo <= stat["mean"] <= hi, (group, stat)
        assert s["kl"]["sae"]["mean"] > 0  # (a random model's CE may even drop: it is ~ln V)
        assert set(s["ce"]) == set(PER_SAE)


def test_figures_written(spliced_run):
    _, out, result, _ = spliced_run
    for rel in result["figures"].values():
        assert (out / rel).read_bytes()[:8] == PNG_MAGIC


def test_random_controls_have_exact_norms():
    torch.manual_seed(0)
    d, m = 16, 50
    sae = TopKSAE(d, 32, 4, generator=torch.Generator().manual_seed(1))
    probe = LinearProbe(
        torch.randn(d, d, dtype=torch.float64) * 0.1, torch.randn(d, dtype=torch.float64)
    )
    x = torch.randn(m, d) * 3
    u = random_directions(np.array([5, 9]), 25, d, seed=3).reshape(m, d)
    np.testing.assert_allclose(u.norm(dim=1).numpy(), 1.0, atol=1e-6)
    new, sq = interventions(x, sae, probe, u)
    x_hat = sae(x).detach()
    e = x - x_hat
    lin = probe.predict(x)
    torch.testing.assert_close(sq["err_sq"], e.square().sum(1))
    pairs = {"sae+random@error": (x_hat, e), "sae+linear+random@nonlinear": (x_hat + lin, e - lin),
             "sae+nonlinear+random@linear": (x_hat + e - lin, lin)}
    for key, (base, part) in pairs.items():
        added = new[key] - base
        torch.testing.assert_close(added.norm(dim=1), part.norm(dim=1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(added / added.norm(dim=1, keepdim=True), u, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        new["sae+linear"] + (new["sae+nonlinear"] - x_hat), x, rtol=1e-5, atol=1e-5
    )
    # a pure function of (seed, context): the same vectors in any batch composition
    again = random_directions(np.array([9]), 25, d, seed=3)[0]
    torch.testing.assert_close(again, u[25:])
    assert not torch.allclose(random_directions(np.array([9]), 25, d, seed=4)[0], again)


def test_bootstrap_interval_contains_point_and_shrinks():
    rng = np.random.default_rng(0)
    n, t = 40, 10
    avg = np.ones((n, t), bool)
    base = rng.normal(3, 0.3, (n, t)).astype(np.float32)
    pt = {"clean/ce": base, "shared/x/ce": base, "shared/x/kl": 0 * base}
    for k in ("zero", "mean"):
        pt[f"shared/{k}/ce"], pt[f"shared/{k}/kl"] = base + 2, base * 0 + 1
    gaps = {"sae": 1.0, "sae+linear": 0.4, "sae+nonlinear": 0.6}
    for k in PER_SAE:
        pt[f"s/{k}/ce"] = base + gaps.get(k, 1.2) + rng.normal(0, 0.05, (n, t)).astype(np.float32)
        pt[f"s/{k}/kl"] = np.full((n, t), gaps.get(k, 1.2), np.float32)
    for p, v in (("err_sq", 1.0), ("linear_sq", 0.6), ("nonlinear_sq", 0.4)):
        pt[f"s/{p}"] = np.full((n, t), v, np.float32)
    res = summarize(pt, avg, ["s"], n_boot=500, seed=0)["saes"]["s"]
    lin = res["ce_gap_closed"]["sae+linear"]
    assert lin["ci"][0] <= lin["mean"] <= lin["ci"][1]
    assert lin["mean"] == pytest.approx(0.6, abs=0.02) and lin["ci"][1] - lin["ci"][0] < 0.05
    assert res["kl_gap_closed"]["sae+nonlinear"]["mean"] == pytest.approx(0.4)
    assert res["sq_norm_share"]["linear"]["mean"] == pytest.approx(0.6)
    assert res["fvu_gap_closed"]["linear"]["mean"] == pytest.approx(0.6)


def test_wrong_split_settings_are_refused(spliced_run, lm):
    _, out, _, _ = spliced_run
    with pytest.raises(DarkMatterError, match="SplitConfig"):
        downstream_analysis(
            out,
            lm=lm,
            cfg=DownstreamConfig(n_contexts=1, target_half_width=None),
            split=SplitConfig(seed=7),
            progress=False,
        )


FAMILIES = {  # config, and the hooked modules found by hand: (layer list, attn_out, mlp_out)
    "gpt2": (
        lambda: GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=101, n_positions=64),
        lambda m: m.transformer.h,
        "attn",
        "mlp",
    ),
    "neox": (
        lambda: GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=101,
            use_parallel_residual=True,
        ),
        lambda m: m.gpt_neox.layers,
        "attention",
        "mlp",
    ),
    "gemma2": (
        lambda: Gemma2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=101,
        ),
        lambda m: m.model.layers,
        "post_attention_layernorm",
        "post_feedforward_layernorm",
    ),
}


def _zero_late(value):
    first = (value[0] if isinstance(value, tuple) else value).clone()
    first[:, 2:] = 0
    return (first, *value[1:]) if isinstance(value, tuple) else first


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_splicer_on_other_families(family):
    """Identity is bit-exact and a zero splice at positions >= 2 equals a plain forward hook
    (a forward pre-hook on the MLP's input for mlp_in)."""
    config, layers, attn, mlp = FAMILIES[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config()).eval()
    lm = LoadedModel(model, None, family, 3, 32, torch.device("cpu"))
    ids = torch.randint(0, 101, (3, 12))
    for hook, module in (
        ("resid_post.1", layers(model)[1]),
        ("attn_out.1", getattr(layers(model)[1], attn)),
        ("mlp_out.2", getattr(layers(model)[2], mlp)),
        ("mlp_in.1", layers(model)[1].mlp),
    ):
        splicer = HookSplicer(lm, hook)
        x, clean = splicer.clean(ids)
        assert torch.equal(splicer.splice(ids, x.clone()), clean), hook
        new = x.clone()
        new[:, 2:] = 0
        spliced = splicer.splice(ids, new)
        if hook.startswith("mlp_in"):
            handle = module.register_forward_pre_hook(lambda _m, args: _zero_late(args))
        else:
            handle = module.register_forward_hook(lambda _m, _a, out: _zero_late(out))
        try:
            with torch.no_grad():
                ref = model(input_ids=ids).logits
        finally:
            handle.remove()
        torch.testing.assert_close(spliced, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(spliced[:, :2], clean[:, :2]) and not torch.allclose(
            spliced[:, 2:], clean[:, 2:]
        )


def test_a_run_harvested_on_a_gpu_is_spliced_on_the_device_asked_for(tiny_model_dir, tmp_path):
    """The store records the harvest's device ('cuda' here, by editing its manifest); downstream
    loads the LM where the analysis runs instead, so the run can be analysed on a CPU."""
    import json

    out = make_run(tiny_model_dir, tmp_path / "run", "resid_post.2", n_contexts=32)
    manifest = out / "store" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["meta"]["config"]["model"]["device"] = "cuda"
    manifest.write_text(json.dumps(data))
    cfg = DownstreamConfig(n_contexts=2, batch_size=2, n_boot=10, target_half_width=None)
    if not torch.cuda.is_available():
        with pytest.raises(DarkMatterError, match="cuda"):
            downstream_analysis(out, cfg=cfg, progress=False)
    result = downstream_analysis(out, cfg=cfg, device="cpu", progress=False)
    assert result["check"]["identity_vs_clean_max_abs"] == 0.0
