"""``topk``: OpenAI TopK (Gao et al. 2024) as sparsify trains it.

Loss: FVU + AuxK (1/32) on latents dead for ``dead_after`` tokens; unit-norm decoder (the
gradient parallel to the rows removed). Saved as SAELens ``topk`` (``saes.topk.TopKSAE``).
"""

from __future__ import annotations

import torch

from sae_darkmatter.saes.archs.base import Architecture, Forward, TrainingSAE, total_variance
from sae_darkmatter.saes.topk import AffineSAE, TopKSAE
from sae_darkmatter.saes.train_kernels import Codes, gather_pre, sparse_decode

AUXK_COEF = 1.0 / 32.0


class TopKTrainer(TrainingSAE):
    def select(self, pre: torch.Tensor) -> Codes | None:
        return Codes.from_topk(pre.topk(int(self.sparsity), dim=1, sorted=False).indices)

    def loss(self, fw: Forward, total_var: torch.Tensor, dead: torch.Tensor, progress: float
             ) -> torch.Tensor:
        loss = fw.residual.pow(2).sum() / total_var
        n_dead = int(dead.sum())
        if n_dead:
            loss = loss + AUXK_COEF * self._auxk_loss(fw, dead, n_dead)
        return loss

    def _auxk_loss(self, fw: Forward, dead: torch.Tensor, n_dead: int) -> torch.Tensor:
        """Normalised MSE of the residual predicted by the top ``d_in // 2`` dead latents.

        As in OpenAI's TopK paper (no ``b_dec``: the residual already excludes it), scaled down
        by ``n_dead / k_aux`` when fewer latents are dead than ``k_aux`` (sparsify).
        """
        k_aux_max = max(self.W_dec.shape[1] // 2, 1)
        k_aux = min(k_aux_max, n_dead)
        dead_ids = dead.nonzero().squeeze(1)
        idx = dead_ids[fw.pre[:, dead_ids].topk(k_aux, dim=1, sorted=False).indices]
        codes = Codes.from_topk(idx)
        values = gather_pre(fw.xc, self.W_enc_t, self.b_enc, fw.pre, codes)
        residual = fw.residual.detach()
        e_hat = sparse_decode(values, codes, self.W_dec)
        scale = min(n_dead / k_aux_max, 1.0)
        return scale * (e_hat - residual).pow(2).sum() / total_variance(residual)

    def export(self, scale: float, out_scale: float | None = None) -> AffineSAE:
        return self._fill(self._shell(TopKSAE, int(self.sparsity)), scale, out_scale)


ARCHITECTURE = Architecture(
    name="topk", trainer=TopKTrainer, sae_class=TopKSAE, sparsity_field="ks",
    sparsity_name="k", folder_tag="k", algorithm="topk-auxk-v1", base_lr=1.6e-3,
)
