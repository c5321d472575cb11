"""Synthetic activation models with a known ground truth (paper §5, Fig. 15, Table 1).

Activations are sparse sums of unit feature directions, ``x = codes @ D``. A stand-in "SAE"
knows the true dictionary minus the least active features and adds its own noise:

- ``x' = x + N(0, σ_act²)`` (activation noise: the dense, linearly predictable part);
- ``recon = (codes ⊙ mask) @ D + N(0, σ_rec²)`` (unlearned features + introduced error);
- ``e = x' − recon``; a linear probe ``e ≈ [x', 1] W`` gives ``ê`` and
  ``FVU_recon = FVU(x', recon)``, ``FVU_lin = FVU(x', recon + ê)``,
  ``est_linear = FVU_recon − FVU_lin``, ``est_nonlinear = FVU_lin``.

Because the truth is known, the report checks that activation noise moves the linear estimate
and reconstruction noise the nonlinear one (the paper's Table 1), and how the probe's fitting
mode biases the estimates.

Conventions and differences from the paper's ``synthetic_simulation.py``:

- FVU is pooled ``Σ‖y − ŷ‖² / Σ‖y − ȳ‖²`` with the per-dimension mean ȳ, as everywhere in this
  library; the paper's synthetic script subtracts one global scalar mean instead.
- Noise levels are stds in units of the clean activations' per-coordinate RMS about their
  per-dimension mean (``sqrt(TV(x) / (N·d))``), so level 1 adds as much variance as ``x`` has.
  The paper used absolute stds 0..4 on Gemma-2-9B activations.
- The probe has a bias column (the paper's script had none). Fit modes: ``in_sample`` fits and
  scores on all tokens (the paper: OLS then explains ≈ (d+1)/N of pure noise, inflating the
  linear estimate); ``held_out`` fits on a seeded half and scores on the other half (the probe's
  estimation noise then inflates the residual by ≈ (d+1)/(N_fit − d − 2) for Gaussian
  regressors, more for sparse heavy-tailed ones: 1.36-1.48x instead of 1.28x measured at d=64,
  N_fit=300); ``debiased`` divides the in-sample residual by ``1 − (d+1)/N`` (exact in
  expectation for noise the probe cannot predict).
- True components are shares of ``TV(x')``: absent (ablated) features and activation noise are
  centred sums of squares, reconstruction noise its raw sum of squares (it enters the error
  uncentred and has mean zero). Absent features are not perfectly linear in ``x'`` (they are
  sparse, in superposition), so part of them lands in ``est_nonlinear``: the estimate is an
  upper bound on the introduced error, as the paper argues.
"""

from sae_darkmatter.synthetic.data import (
    FREQUENCIES,
    MAGNITUDES,
    SyntheticConfig,
    SyntheticData,
    feature_probabilities,
    generate,
)
from sae_darkmatter.synthetic.evaluate import (
    FITS,
    evaluate,
    evaluate_fits,
    known_features,
    split_halves,
    table1,
)
from sae_darkmatter.synthetic.run import (
    RECOVERED_COSINE,
    check_config,
    run_grid,
    run_synthetic,
    trained_sae_check,
)

__all__ = [
    "FITS",
    "FREQUENCIES",
    "MAGNITUDES",
    "RECOVERED_COSINE",
    "SyntheticConfig",
    "SyntheticData",
    "check_config",
    "evaluate",
    "evaluate_fits",
    "feature_probabilities",
    "generate",
    "known_features",
    "run_grid",
    "run_synthetic",
    "split_halves",
    "table1",
    "trained_sae_check",
]
