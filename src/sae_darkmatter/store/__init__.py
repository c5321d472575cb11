"""On-disk activation store: one safetensors file per appended batch, plus a JSON manifest.

Layout of a store folder::

    store/
      manifest.json               the only truth about what is committed
      shard_000000.safetensors    one per append, in context order
      shard_000001.safetensors
      ...

Any safetensors reader opens a shard without this library::

    from safetensors.numpy import load_file      # float32 stores
    from safetensors.torch import load_file      # float32 or bfloat16 stores
    x = load_file("store/shard_000000.safetensors")["resid_post.15"]

Modules: ``manifest`` (the format: shard contents, manifest fields, validation), ``verify``
(per-shard size, header and sha256 checks), ``reader`` (:class:`StoreReader`, reads by rows and
chunks), ``writer`` (:class:`ActivationStore`, the reader plus appends, the writer lock, staging
for distributed harvests and crash cleanup). Callers use :class:`ActivationStore` for both
reading (``ActivationStore.open``) and writing (``ActivationStore.create_or_resume``).
"""

from sae_darkmatter.store.manifest import (
    COLUMNS,
    FORMAT,
    LOCK_FILE,
    MANIFEST,
    SHARD_PATTERN,
    STAGED_PATTERN,
    STAGED_SUFFIX,
    VERSION,
)
from sae_darkmatter.store.reader import StoreReader
from sae_darkmatter.store.verify import ShardProblem
from sae_darkmatter.store.writer import ActivationStore

__all__ = [
    "COLUMNS",
    "FORMAT",
    "LOCK_FILE",
    "MANIFEST",
    "SHARD_PATTERN",
    "STAGED_PATTERN",
    "STAGED_SUFFIX",
    "VERSION",
    "ActivationStore",
    "ShardProblem",
    "StoreReader",
]
