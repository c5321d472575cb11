"""The streaming decomposition's public names; it lives in ``sae_darkmatter.decompose.stream``."""

from sae_darkmatter.decompose.stream import (
    CALIBRATION_TOKENS,
    STREAM_VERSION,
    StreamResult,
    stream_decompose,
)
from sae_darkmatter.decompose.stream_run import CHECKPOINT_EVERY
from sae_darkmatter.splits import split_contexts

__all__ = [
    "CALIBRATION_TOKENS",
    "CHECKPOINT_EVERY",
    "STREAM_VERSION",
    "StreamResult",
    "split_contexts",
    "stream_decompose",
]
