"""The registry of SAE architectures: one module each, holding everything about it.

An architecture module has the inference class (how the SAE encodes, and how it is saved as and
loaded from a SAELens folder), the training SAE (loss, step constraints, export) and an
``Architecture`` record (name, sparsity axis, cache algorithm, learning rate). Adding one is its
module, its line below and its name in ``SAETrainConfig.SPARSITY_FIELDS`` (the config checks
names before any work starts and must not import ``saes``); importing this registry fails if
the two disagree.
"""

from __future__ import annotations

from sae_darkmatter.config import SAETrainConfig
from sae_darkmatter.saes.archs import batchtopk, jumprelu, matryoshka, relu, topk
from sae_darkmatter.saes.archs.base import Architecture
from sae_darkmatter.saes.archs.gated import GatedSAE
from sae_darkmatter.saes.archs.jumprelu import JumpReLUSAE
from sae_darkmatter.saes.archs.relu import ReLUSAE
from sae_darkmatter.saes.topk import AffineSAE, TopKSAE

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (topk.ARCHITECTURE, batchtopk.ARCHITECTURE, relu.ARCHITECTURE, jumprelu.ARCHITECTURE,
              matryoshka.ARCHITECTURE)
}
# SAELens architecture name -> the class save_sae writes and load_sae builds (in isinstance
# order: no class here subclasses another)
SAE_CLASSES: dict[str, type[AffineSAE]] = {
    cls.saelens_architecture: cls for cls in (TopKSAE, ReLUSAE, JumpReLUSAE, GatedSAE)
}

if {a.name: a.sparsity_field for a in ARCHITECTURES.values()} != SAETrainConfig.SPARSITY_FIELDS:
    raise ImportError(
        "saes.archs and SAETrainConfig.SPARSITY_FIELDS disagree on the trainable architectures "
        "or their sparsity fields"
    )
if any(a.sae_class not in SAE_CLASSES.values() for a in ARCHITECTURES.values()):
    raise ImportError("an architecture exports to a class missing from saes.archs.SAE_CLASSES")

__all__ = ["ARCHITECTURES", "SAE_CLASSES", "Architecture"]
