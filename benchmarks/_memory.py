"""Peak anonymous memory of a block of code, for the benchmarks (imported by their scripts).

``RssAnon`` rather than RSS: file pages that store reads map or cache are the kernel's to drop
and would make RSS track the store size instead of what the code holds.
"""

from __future__ import annotations

import threading


def rss_anon_mb() -> float:
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


class PeakAnon:
    """Peak ``RssAnon`` while the block runs, sampled by a thread every 10 ms."""

    def __enter__(self) -> PeakAnon:
        self.base = self.peak = rss_anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_anon_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_mb())
