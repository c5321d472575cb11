"""SAE training kernels and losses: sparse products and gradients against dense autograd, and
BatchTopK selection and penalised losses against sae_lens."""

from __future__ import annotations

import pytest
import torch

from helpers import training_sae
from sae_darkmatter.saes.archs.base import total_variance
from sae_darkmatter.saes.archs.topk import AUXK_COEF
from sae_darkmatter.saes.train_kernels import Codes, gather_pre, scatter_rows, sparse_decode


def _sae_lens_state(sae) -> dict[str, torch.Tensor]:
    """Our training SAE's tensors under SAELens's names (it holds ``W_enc.T`` as ``W_enc_t``)."""
    state = {n: p.detach().clone() for n, p in sae.named_parameters()}
    state["W_enc"] = state.pop("W_enc_t").T.contiguous()
    return state


def _grads(sae, xb, dead, progress=1.0):
    sae.zero_grad()
    fw = sae(xb)
    sae.loss(fw, total_variance(xb), dead, progress).backward()
    return fw, {n: p.grad.clone() for n, p in sae.named_parameters()}


# --------------------------------------------------------------------------- kernels and losses


def test_sparse_kernels_equal_dense_products():
    gen = torch.Generator().manual_seed(0)
    xc, w_rows = torch.randn(6, 5, generator=gen), torch.randn(9, 5, generator=gen)
    b_enc, w_dec = torch.randn(9, generator=gen), torch.randn(9, 5, generator=gen)
    mask = torch.rand(6, 9, generator=gen) < 0.3
    mask[2] = False  # an empty row
    codes = Codes.from_mask(mask)
    assert codes.offsets.tolist() == (mask.sum(1).cumsum(0) - mask.sum(1)).tolist()
    weights = torch.randn(6, 5, generator=gen)

    leaves = [t.clone().requires_grad_() for t in (xc, w_rows, b_enc, w_dec)]
    pre = torch.addmm(leaves[2], leaves[0], leaves[1].T)
    out = sparse_decode(gather_pre(*leaves[:3], pre.detach(), codes) ** 2, codes, leaves[3])
    (out * weights).sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (xc, w_rows, b_enc, w_dec)]
    ref_pre = ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]
    ref = (ref_pre**2 * mask) @ ref_leaves[3]
    (ref * weights).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)


def test_scatter_rows_equals_the_coalesced_sparse_product_bit_for_bit():
    """The weight-gradient kernel sums what ``torch.sparse.mm`` of the coalesced COO matrix sums,
    in the same order: equal to the last bit, with repeated pairs and never-selected rows."""
    gen = torch.Generator().manual_seed(1)
    n_out, n_in, nnz = 300, 200, 5000
    out_idx = torch.randint(0, n_out - 20, (nnz,), generator=gen)  # the last 20 rows stay empty
    in_idx = torch.randint(0, n_in, (nnz,), generator=gen)
    weights, dense = torch.randn(nnz, generator=gen), torch.randn(n_in, 48, generator=gen)
    coo = torch.sparse_coo_tensor(torch.stack([out_idx, in_idx]), weights, (n_out, n_in),
                                  check_invariants=True)
    ours = scatter_rows(out_idx, in_idx, weights, dense, n_out)
    assert torch.equal(ours, torch.sparse.mm(coo, dense))
    assert not ours[-20:].any()
    empty = torch.zeros(0, dtype=torch.int64)
    assert torch.equal(scatter_rows(empty, empty, torch.zeros(0), dense, 7), torch.zeros(7, 48))


def test_topk_gradients_equal_dense_autograd():
    sae = training_sae("topk")
    xb = torch.randn(40, 20)
    dead = torch.arange(50) % 3 == 0
    _, sparse_grads = _grads(sae, xb, dead)

    # dense reference: the same loss written with plain autograd ops
    sae.zero_grad()
    pre = (xb - sae.b_dec) @ sae.W_enc_t.T + sae.b_enc
    top = pre.topk(5, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    residual = xb - (z @ sae.W_dec + sae.b_dec)
    fvu = residual.pow(2).sum() / (xb - xb.mean(0)).pow(2).sum()
    k_aux = min(10, int(dead.sum()))
    aux = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, aux.indices, aux.values)
    r = residual.detach()
    auxk = (z_aux @ sae.W_dec - r).pow(2).sum() / (r - r.mean(0)).pow(2).sum()
    (fvu + AUXK_COEF * auxk).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_batchtopk_selects_like_sae_lens(sae_lens):
    ours = training_sae("batchtopk", sparsity=4)
    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=20, d_sae=50, k=4, decoder_init_norm=None)
    theirs = sae_lens.BatchTopKTrainingSAE(cfg)
    theirs.load_state_dict(_sae_lens_state(ours) | {"topk_threshold": theirs.topk_threshold},
                           strict=True)
    xb = torch.randn(30, 20)
    fw = ours(xb)
    dense = torch.zeros(30, 50).index_put_((fw.codes.rows, fw.codes.cols), fw.values.detach())
    with torch.no_grad():
        expected = theirs.encode(xb)
    assert torch.equal(dense > 0, expected > 0)  # the same k * n latents
    torch.testing.assert_close(dense, expected, rtol=1e-6, atol=1e-6)
    assert fw.codes.cols.numel() == 4 * 30


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
@pytest.mark.parametrize("dense", [False, True])
def test_penalised_gradients_equal_sae_lens(arch, dense, sae_lens):
    """Loss and gradients (L1 with decoder norms / L0 with straight-through estimators) match
    SAELens's training SAEs, through our sparse kernels and through the dense path."""
    ours = training_sae(arch)
    ours.dense_above = 1.0 if not dense else 0.0
    coef = 0.7
    if arch == "relu":
        cfg = sae_lens.StandardTrainingSAEConfig(d_in=20, d_sae=50, l1_coefficient=coef,
                                                 decoder_init_norm=None)
        theirs, key = sae_lens.StandardTrainingSAE(cfg), "l1"
    else:
        cfg = sae_lens.JumpReLUTrainingSAEConfig(d_in=20, d_sae=50, l0_coefficient=coef,
                                                 jumprelu_bandwidth=0.05,
                                                 decoder_init_norm=None)
        theirs, key = sae_lens.JumpReLUTrainingSAE(cfg), "l0"
    ours.sparsity = coef
    theirs.load_state_dict(_sae_lens_state(ours))
    xb = torch.randn(200, 20) * 3
    fw, grads = _grads(ours, xb, torch.zeros(50, dtype=torch.bool))
    assert (fw.codes is None) == dense
    from sae_lens.saes.sae import TrainStepInput

    out = theirs.training_forward_pass(TrainStepInput(xb, {key: coef}, None, 0, False))
    out.loss.backward()
    ours_loss = ours.loss(ours(xb), total_variance(xb), torch.zeros(50, dtype=torch.bool), 1.0)
    torch.testing.assert_close(ours_loss, out.loss.detach(), rtol=1e-5, atol=1e-5)
    if arch == "jumprelu":
        assert grads["threshold"].abs().sum() > 0  # some pre-activations lie in the band
    grads["W_enc"] = grads.pop("W_enc_t").T
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5)
