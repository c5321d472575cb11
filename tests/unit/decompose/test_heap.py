"""``limited_heap_growth``: large buffers go back to the OS during a streaming pass, and stay in
glibc's heap for reuse (no fresh page faults) outside it. Run in a fresh interpreter: the heap
state the rest of the suite leaves behind would blur the RSS readings."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

SCRIPT = """
import os, torch
from sae_darkmatter import _io

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def returned_on_free(n_bytes):
    buf = torch.ones(n_bytes // 4)
    held = rss()
    del buf
    return held - rss()

MB = 1 << 20
with _io.limited_heap_growth() as ok:
    with _io.limited_heap_growth():  # nested passes keep the outer setting
        inner = returned_on_free(8 * MB)
    outer = returned_on_free(8 * MB)
after = [returned_on_free(8 * MB) for _ in range(2)]
print(ok, inner, outer, *after, _io._limited_depth)
"""


def test_the_pass_returns_large_buffers_and_restores_the_steady_threshold_when_left():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True).stdout.split()
    ok, inner, outer, after1, after2, depth = out
    mb = 1 << 20
    assert ok == "True" and depth == "0"
    assert int(inner) > 6 * mb and int(outer) > 6 * mb  # unmapped on free
    assert int(after1) < 2 * mb and int(after2) < 2 * mb  # kept in the heap for reuse
