"""Transcoders in a run beyond the trained sweep (``test_pipeline``): spliced at the MLP output
(the transcoder_downstream analysis against plain forward hooks, the splicer's source capture
on a sandwich-norm family), and pretrained ones named in ``[transcoders] pretrained``."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, Gemma2Config

from helpers import tiny_run_config
from sae_darkmatter import ModelConfig, open_transcoder, run
from sae_darkmatter.analyses.downstream import TRANSCODER_PER_TOKEN_FILE, downstream_analysis
from sae_darkmatter.analyses.splice import PER_SAE, HookSplicer
from sae_darkmatter.errors import DarkMatterError
from sae_darkmatter.models import LoadedModel, forward_capture, load_model
from sae_darkmatter.run_dir import RunDir, error_probe
from sae_darkmatter.store import ActivationStore

NAMES = [f"{kind}-batchtopk-w{w}-k8" for kind in ("transcoder", "skip-transcoder")
         for w in (64, 128, 256)]


def _manual_ce(model, ids: torch.Tensor, mask: torch.Tensor, replace) -> np.ndarray:
    """Per-token CE [B, T-1] with a forward hook on layer 2's MLP that puts ``replace(its
    input)`` in place of its output at ``mask``."""
    mlp = model.model.layers[2].mlp

    def hook(_m, args, out):
        return torch.where(mask[..., None], replace(args[0]), out)

    handle = mlp.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    return np.stack([F.cross_entropy(logits[b, :-1], ids[b, 1:], reduction="none").numpy()
                     for b in range(ids.shape[0])])


def test_run_splices_its_transcoders_at_the_mlp_output(tiny_run, tiny_model_dir):
    out, metrics = tiny_run
    result = metrics["analyses"]["transcoder_downstream"]
    assert (result["replaces"], result["source"], result["hook"]) == (
        "transcoder", "mlp_in.2", "mlp_out.2")
    check = result["check"]
    assert check["reference"] == "recomputed" and check["clean_vs_reference_max_abs"] < 2e-5
    assert check["identity_vs_clean_max_abs"] == 0.0  # the identity splice replays clean tensors
    assert sorted(t["sae"] for t in result["table"]) == sorted(NAMES)
    assert {s["name"]: (s["width"], s["k"], s["skip"]) for s in result["saes"]} == {
        n: (int(n.split("-w")[1].split("-")[0]), 8, n.startswith("skip")) for n in NAMES}
    for rel in result["figures"].values():
        assert (out / rel).is_file()

    # every transcoder's ŷ and ŷ + ê equal a plain forward hook that computes them from the
    # MLP's own input (first-round contexts: every intervention ran there)
    pt = load_file(out / TRANSCODER_PER_TOKEN_FILE)
    first = result["target"]["first_round"]
    store = ActivationStore.open(out / "store")
    tokens = store.column("tokens").reshape(-1, store.context_length)
    ids = torch.from_numpy(tokens[pt["contexts"][:first]].astype(np.int64))
    mask = torch.from_numpy(pt["spliced"][:first])
    model = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu")).model
    run_dir = RunDir.of(out)
    for d in run_dir.transcoder_decompositions:
        tc, probe = open_transcoder(out / "transcoders" / d.name).transcoder, error_probe(d)
        replacements = {
            "sae": tc,
            "sae+linear": lambda x, tc=tc, probe=probe: (
                tc(x) + probe.predict(x.reshape(-1, x.shape[-1])).reshape(x.shape)),
        }
        for key, compute in replacements.items():
            ref = _manual_ce(model, ids, mask, compute)
            ours = pt[f"{d.name}/{key}/ce"][:first, :-1]
            # the splice replays the clean layers before the MLP: float32 rounding only
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4, err_msg=f"{d.name} {key}")
        # the splice replaces positions: where none are spliced, CE is the clean CE
        untouched = ~pt["spliced"][:first].any(1)
        if untouched.any():
            np.testing.assert_array_equal(pt[f"{d.name}/sae/ce"][:first][untouched],
                                          pt["clean/ce"][:first][untouched])
    # a plain transcoder's error costs loss: ŷ alone is worse than the clean model
    for s in result["saes"]:
        assert s["ce_increase"]["sae"]["mean"] > 0, s["name"]
        assert set(s["ce"]) == set(PER_SAE)


def test_bad_requests_are_refused(tmp_path, tiny_run):
    with pytest.raises(DarkMatterError, match="no transcoder decompositions"):
        downstream_analysis(tmp_path, of="transcoders", progress=False)
    with pytest.raises(DarkMatterError, match="one of"):
        downstream_analysis(tiny_run[0], of="crosscoders", progress=False)


def test_source_capture_on_a_sandwich_norm_model():
    """Gemma 2's MLP output hook is post_feedforward_layernorm's output, another module than the
    MLP whose input is mlp_in: the splicer's clean pass captures both, equal to a plain capture."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=101)).eval()
    lm = LoadedModel(model, None, "gemma2", 3, 32, torch.device("cpu"))
    ids = torch.randint(0, 101, (2, 10))
    splicer = HookSplicer(lm, "mlp_out.1", source="mlp_in.1")
    y, clean = splicer.clean(ids)
    plain, _ = forward_capture(lm, ids, ["mlp_in.1", "mlp_out.1"], with_loss=False)
    assert splicer.source_acts is not None
    torch.testing.assert_close(splicer.source_acts, plain["mlp_in.1"], rtol=0, atol=1e-6)
    torch.testing.assert_close(y, plain["mlp_out.1"], rtol=0, atol=1e-6)
    assert not torch.allclose(splicer.source_acts, y)
    assert torch.equal(splicer.splice(ids, y.clone()), clean)


def test_a_run_decomposes_pretrained_transcoders(tiny_run, tiny_model_dir, tmp_path):
    """``[transcoders] pretrained``: the run harvests the hooks the transcoder's metadata names
    and decomposes it on its SAEs' held-out tokens; with the tiny run's harvest settings that is
    exactly the tiny run's decomposition of the same transcoder, and it is spliced downstream."""
    out, _ = tiny_run
    name = "skip-transcoder-batchtopk-w128-k8"
    cfg = tiny_run_config(tiny_model_dir)
    cfg = replace(cfg, transcoders=replace(cfg.transcoders, pretrained=(str(out / "transcoders"
                                                                            / name),)),
                  cross_layer=replace(cfg.cross_layer, enabled=False),
                  error_saes=replace(cfg.error_saes, enabled=False),
                  pursuit=replace(cfg.pursuit, enabled=False))
    metrics = run(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "transcoders").exists()  # nothing trained
    assert list(ActivationStore.open(tmp_path / "run" / "store").hooks) == [
        "resid_post.2", "mlp_in.2", "mlp_out.2"]
    ours, theirs = (json.loads((folder / "decompose" / "transcoders" / f"{name}.json").read_text())
                    for folder in (tmp_path / "run", out))
    assert ours["transcoder"] == {"hook_in": "mlp_in.2", "hook_out": "mlp_out.2", "skip": True}
    assert ours["data"] == theirs["data"]
    for key in ("fvu", "fvu_linear", "fvu_nonlinear", "l0"):
        assert ours["metrics"][key] == pytest.approx(theirs["metrics"][key], rel=1e-9), key
    assert [r["name"] for r in metrics["analyses"]["transcoders"]["rows"]
            if r["kind"] != "SAE"] == [name]
    down = metrics["analyses"]["transcoder_downstream"]
    assert [s["name"] for s in down["saes"]] == [name] and down["check"]["identity_max_kl"] < 1e-6
