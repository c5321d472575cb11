"""llama.cpp's OpenAI-compatible server on the embedded SmolLM2, for the autointerp tests: a real
endpoint that requires an API key."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sae_darkmatter.models import embedded_gguf_path

KEY_ENV = "DM_AUTOINTERP_TEST_KEY"
KEY = "sk-darkmatter-fake-5e1b7c93d04a"  # distinctive: grepped for in every file and log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    """llama.cpp's OpenAI-compatible server on the embedded SmolLM2, requiring KEY.

    One thread: on a shared 2-core machine two spinning llama.cpp threads made requests ~20x
    slower (16 s instead of 0.7 s each).
    """
    import llama_cpp  # noqa: F401  (the [autointerp] extra: a missing package fails here, never skips)
    import openai  # noqa: F401

    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(embedded_gguf_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--n_threads",
            "1",
            "--n_threads_batch",
            "1",
            "--api_key",
            KEY,
            "--verbose",
            "False",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama.cpp server exited: {log_path.read_text()[-2000:]}")
        try:
            request = urllib.request.Request(
                f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}
            )
            with urllib.request.urlopen(request, timeout=2) as answer:
                if answer.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"llama.cpp server did not answer in 90 s: {log_path.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
