"""Training transcoders and skip transcoders: the grid's folders load in sae_lens with the same
outputs, its recorded scores are the saved module's, and the skip term learns a linear map."""

from __future__ import annotations

import json

import pytest
import torch

from sae_darkmatter.config import SAETrainConfig
from sae_darkmatter.errors import DarkMatterError, ShapeMismatchError
from sae_darkmatter.saes.train import train_grid
from sae_darkmatter.saes.transcoder_formats import open_transcoder

D_IN, D_OUT, N = 24, 16, 6000
META = {"model_name": "tiny", "hook_name": "mlp_in.3", "hook_name_out": "mlp_out.3"}


def _pairs(seed: int = 0, linear: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x``, and ``y = linear * x A^T + relu(x B^T - 1) C + 0.5``: a linear map plus sparse
    features (``A`` returned)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=gen)
    a = torch.randn(D_OUT, D_IN, generator=gen) / D_IN**0.5
    b = torch.randn(48, D_IN, generator=gen) / D_IN**0.5
    c = torch.randn(48, D_OUT, generator=gen)
    y = linear * x @ a.T + (x @ b.T - 1).relu() @ c + 0.5
    return x, y, a


def _cfg(architecture: str = "batchtopk", **kw) -> SAETrainConfig:
    sparsity = {"ks": (6,)} if architecture in ("batchtopk", "topk") else (
        {"l0_coefficients": (0.05,)} if architecture == "jumprelu" else {"l1_coefficients": (0.1,)})
    settings = {"widths": (48,), "train_tokens": 24_000, "batch_size": 256, **sparsity, **kw}
    return SAETrainConfig(architecture=architecture, device="cpu", checkpoint_every=1000,
                          **settings)  # type: ignore[arg-type]


def _fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    y, y_hat = y.double(), y_hat.double()
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize("architecture", ["batchtopk", "relu"])  # the two SAELens classes
def test_trained_transcoders_load_in_sae_lens_with_their_scores(tmp_path, sae_lens, architecture):
    x, y, _ = _pairs()
    folders = train_grid(x, _cfg(architecture), tmp_path, metadata=META, y=y, progress=False)
    assert [f.name for f in folders] == [
        f"{kind}-{architecture}-w48-{tag}" for kind in ("transcoder", "skip-transcoder")
        for tag in [{"batchtopk": "k6", "jumprelu": "l0_5e-02", "relu": "l1_1e-01"}[
            architecture]]]
    for folder, skip in zip(folders, (False, True), strict=True):
        ours = open_transcoder(folder)
        assert (ours.hook_in, ours.hook_out, ours.transcoder.has_skip) == (
            "mlp_in.3", "mlp_out.3", skip)
        theirs = sae_lens.SAE.load_from_disk(folder)
        assert type(theirs).__name__ == {
            (False, False): "JumpReLUTranscoder", (False, True): "JumpReLUSkipTranscoder",
            (True, False): "Transcoder", (True, True): "SkipTranscoder"}[
                (architecture == "relu", skip)]
        with torch.no_grad():
            want = theirs(x)
            torch.testing.assert_close(ours.transcoder(x), want, rtol=1e-5, atol=1e-5)
        record = json.loads((folder / "training.json").read_text())
        # training.json's score is the saved module's, as sae_lens computes it (float32 sums)
        assert record["final_train_fvu"] == pytest.approx(_fvu(y, want), rel=1e-4)
        assert record["transcoder"]["skip"] is skip
        assert record["final_train_fvu"] < 0.6  # it learned (the mean alone leaves 1.0)


def test_the_skip_term_learns_the_linear_part(tmp_path):
    """On a target that is mostly linear in ``x`` the skip transcoder beats the plain one
    and its ``W_skip`` points along the true map."""
    x, y, a = _pairs(seed=1, linear=4.0)
    folders = train_grid(x, _cfg(), tmp_path, metadata=META, y=y, progress=False)
    plain, skip = (open_transcoder(f).transcoder for f in folders)
    with torch.no_grad():
        fvu_plain, fvu_skip = _fvu(y, plain(x)), _fvu(y, skip(x))
    assert fvu_skip < 0.5 * fvu_plain, (fvu_skip, fvu_plain)
    assert skip.W_skip is not None
    cos = torch.nn.functional.cosine_similarity(skip.W_skip.flatten(), a.flatten(), dim=0)
    assert cos > 0.9, float(cos)


def test_a_finished_transcoder_grid_is_reused(tmp_path):
    x, y, _ = _pairs()
    cfg = _cfg(widths=(32,))
    first = train_grid(x, cfg, tmp_path, metadata=META, y=y, skips=(True,), progress=False)
    stamp = (first[0] / "training.json").stat().st_mtime_ns
    again = train_grid(x, cfg, tmp_path, metadata=META, y=y, skips=(True,), progress=False)
    assert again == first and (first[0] / "training.json").stat().st_mtime_ns == stamp
    # other targets are another transcoder: retrained, not reused
    train_grid(x, cfg, tmp_path, metadata=META, y=y * 2, skips=(True,), progress=False)
    assert (first[0] / "training.json").stat().st_mtime_ns != stamp


def test_bad_transcoder_grids_are_refused_before_training(tmp_path):
    x, y, _ = _pairs()
    with pytest.raises(DarkMatterError, match="SAELens has no topk transcoder.*batchtopk"):
        train_grid(x, _cfg("topk"), tmp_path, metadata=META, y=y, progress=False)
    with pytest.raises(ShapeMismatchError, match="one row per input row: x has 6000 rows, y 10"):
        train_grid(x, _cfg(), tmp_path, metadata=META, y=y[:10], progress=False)
    with pytest.raises(DarkMatterError, match="hook_name_out"):
        train_grid(x, _cfg(), tmp_path, metadata={"hook_name": "mlp_in.3"}, y=y,
                   progress=False)
    with pytest.raises(DarkMatterError, match="skips must hold"):
        train_grid(x, _cfg(), tmp_path, metadata=META, y=y, skips=(), progress=False)
    assert not any(tmp_path.iterdir())
