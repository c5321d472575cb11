"""TopK sparse autoencoder with SAELens's parameter layout and encode order.

Parameters follow SAELens: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``,
``b_dec [d_out]``, where ``d_out = d_in`` except in a transcoder's sparse part
(``saes.transcoder``), whose decoder writes to another hook. Encoding matches SAELens's
``TopKSAE`` with ``rescale_acts_by_decoder_norm`` off and ``normalize_activations="none"``:
``pre = (x - b_dec) @ W_enc + b_enc``, keep the top ``k`` pre-activations, then ReLU on the
kept values (SAELens's topk->ReLU order; sparsify uses ReLU->topk, which keeps the same set but
can differ when fewer than k are positive).

Each class also says how it is written to and read from a SAELens folder (``saes.io``): its
``cfg.json`` architecture name, its tensors beyond the four shared ones and the config keys only
it has.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

LATENT_BLOCK = 1 << 26  # dense latents held at once: 256 MB in float32, whatever the width


def latent_rows(d_sae: int) -> int:
    """Rows to encode at once so that their dense latents ``[rows, d_sae]`` stay within
    ``LATENT_BLOCK`` elements: 4,096 rows of a 16k-wide SAE, 64 of a 1M-wide one."""
    return max(1, LATENT_BLOCK // d_sae)


class AffineSAE(nn.Module):
    """Shared parameters and affine maps of SAELens-style SAEs; subclasses define ``encode``.

    ``apply_b_dec_to_input`` subtracts ``b_dec`` from the input before the encoder, as
    SAELens's option of the same name does (Gemma Scope SAEs turn it off); it needs
    ``d_out == d_in``. ``d_out`` (default ``d_in``) is the decoder's width.
    """

    saelens_architecture: ClassVar[str]  # cfg.json "architecture"; unset: no SAELens form
    extra_tensors: ClassVar[tuple[str, ...]] = ()  # [d_sae] tensors besides the shared four
    saelens_names: ClassVar[dict[str, str]] = {}  # our tensor name -> SAELens's, where they differ

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        d_out: int | None = None,
        apply_b_dec_to_input: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        d_out = d_in if d_out is None else d_out
        if d_in < 1 or d_sae < 1 or d_out < 1:
            raise ValueError(f"d_in, d_sae and d_out must be positive, got d_in={d_in}, "
                             f"d_sae={d_sae}, d_out={d_out}")
        if apply_b_dec_to_input and d_out != d_in:
            raise ValueError(f"apply_b_dec_to_input subtracts b_dec [{d_out}] from the input "
                             f"[{d_in}]: it needs d_out == d_in")
        w_dec = torch.randn(d_sae, d_out, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        w_enc = w_dec.T if d_out == d_in else torch.randn(d_sae, d_in, generator=generator).T
        self.W_enc = nn.Parameter(w_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.apply_b_dec_to_input = apply_b_dec_to_input

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_out(self) -> int:
        """Width of the decoder's output (``d_in`` for an SAE)."""
        return self.W_dec.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_dec.shape[0]

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the parameters' dtype, minus ``b_dec`` when ``apply_b_dec_to_input``."""
        x = x.to(self.W_enc.dtype)
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations ``[n, d_sae]`` (before the nonlinearity)."""
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Dense latents ``[n, d_sae]`` -> reconstruction ``[n, d_out]``."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``x_hat`` of ``x [..., d_in]``, ``latent_rows`` rows at a time
        (a 1M-wide SAE's dense latents of 8,192 rows would take 34 GB)."""
        flat = x.reshape(-1, x.shape[-1])
        step = latent_rows(self.d_sae)
        if flat.shape[0] <= step:
            return self.reconstruct(x)
        return torch.cat([self.reconstruct(b) for b in flat.split(step)]).reshape(
            *x.shape[:-1], self.d_out
        )

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` in one piece (``forward`` splits large inputs)."""
        return self.decode(self.encode(x))

    def extra_repr(self) -> str:
        out = f", d_out={self.d_out}" if self.d_out != self.d_in else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}{out}"

    @classmethod
    def for_config(
        cls, d_in: int, d_sae: int, cfg: dict[str, Any], *, d_out: int | None = None,
        apply_b_dec_to_input: bool = True,
    ) -> AffineSAE:
        """An SAE of this class for a SAELens config (the keys only this class reads)."""
        return cls(d_in, d_sae, d_out=d_out, apply_b_dec_to_input=apply_b_dec_to_input)

    def config_fields(self) -> dict[str, Any]:
        """The ``cfg.json`` keys only this class writes."""
        return {}

    @classmethod
    def adapt_saelens_state(cls, cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        """Bring a SAELens state dict (our tensor names) to this class's conventions, in place."""


class TopKSAE(AffineSAE):
    """A TopK SAE: exactly ``k`` latents are selected per token (ReLU may zero some of them)."""

    saelens_architecture = "topk"

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        *,
        d_out: int | None = None,
        apply_b_dec_to_input: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        super().__init__(d_in, d_sae, d_out=d_out, apply_b_dec_to_input=apply_b_dec_to_input,
                         generator=generator)
        self._k = k

    @property
    def k(self) -> int:
        return self._k

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse latents: ``(values [n, k], indices [n, k])``, values >= 0."""
        values, indices = torch.topk(self.pre_activations(x), self._k, dim=-1, sorted=False)
        return values.relu(), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``[n, d_sae]`` with at most ``k`` nonzeros per row."""
        values, indices = self.encode_topk(x)
        z = torch.zeros(*values.shape[:-1], self.d_sae, dtype=values.dtype, device=values.device)
        return z.scatter_(-1, indices, values)

    def decode_topk(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Reconstruction from sparse latents without materialising ``[n, d_sae]``.

        ``embedding_bag`` gathers the k decoder rows and sums them weighted by ``values``;
        it is exact and 1.4-2x faster than the dense product on CPU (measurements.md).
        """
        lead = values.shape[:-1]
        out = F.embedding_bag(
            indices.reshape(-1, self._k),
            self.W_dec,
            per_sample_weights=values.reshape(-1, self._k),
            mode="sum",
        )
        return out.reshape(*lead, self.d_out) + self.b_dec

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_topk(*self.encode_topk(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"

    @classmethod
    def for_config(
        cls, d_in: int, d_sae: int, cfg: dict[str, Any], *, d_out: int | None = None,
        apply_b_dec_to_input: bool = True,
    ) -> AffineSAE:
        return cls(d_in, d_sae, int(cfg["k"]), d_out=d_out,
                   apply_b_dec_to_input=apply_b_dec_to_input)

    def config_fields(self) -> dict[str, Any]:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def adapt_saelens_state(cls, cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        """Fold ``rescale_acts_by_decoder_norm`` into the weights (SAELens's ``_fold_norm_topk``).

        With it the pre-activations are multiplied by ``||W_dec_i||`` and the latents divided by
        it before decoding; unit-norm decoder rows with that norm folded into the encoder give
        the same map.
        """
        if cfg.get("rescale_acts_by_decoder_norm", False):
            norms = state["W_dec"].norm(dim=1).clamp(min=1e-8)
            state["b_enc"] = state["b_enc"] * norms
            state["W_enc"] = state["W_enc"] * norms
            state["W_dec"] = state["W_dec"] / norms[:, None]
