"""The paper's claims as checkable statements, and the verdict an interval gives each.

A claim says where a quantity should lie (``Region``); ours comes with a 95 % interval per item
(per SAE, per source, ...). An item **agrees** when its interval lies inside the region,
**disagrees** when it lies wholly outside, and is **inconclusive** when it straddles an edge or
has no interval. A claim agrees (disagrees) when every item does; otherwise it is inconclusive
and says how its items split. The regions of qualitative claims ("about half", "roughly
constant") are stated next to each verdict: they are our reading, chosen before looking at our
numbers, not fitted to them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

AGREES, DISAGREES, INCONCLUSIVE, NOT_RUN = "agrees", "disagrees", "inconclusive", "not run"
VERDICTS = (AGREES, DISAGREES, INCONCLUSIVE)


@dataclass(frozen=True)
class Region:
    """Where a claim puts a quantity: ``low <= value <= high`` (either end may be infinite)."""

    low: float = -math.inf
    high: float = math.inf
    text: str = ""  # how the claim's words were read, shown with the verdict

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"a region needs low < high, got [{self.low}, {self.high}]")


@dataclass(frozen=True)
class Item:
    """One estimate of ours: ``value`` with its 95 % interval ``ci`` (None: none computed)."""

    name: str
    value: float
    ci: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with non-finite numbers as None (strict JSON)."""
        def num(v: float) -> float | None:
            return v if math.isfinite(v) else None
        return {"name": self.name, "value": num(self.value),
                "ci": None if self.ci is None else [num(v) for v in self.ci]}


def item_verdict(item: Item, region: Region) -> str:
    """``agrees`` / ``disagrees`` / ``inconclusive`` from the interval alone."""
    if item.ci is None or not all(math.isfinite(v) for v in item.ci):
        return INCONCLUSIVE
    low, high = min(item.ci), max(item.ci)
    if region.low <= low and high <= region.high:
        return AGREES
    if high < region.low or low > region.high:
        return DISAGREES
    return INCONCLUSIVE


def claim_verdict(items: Sequence[Item], region: Region) -> tuple[str, str]:
    """The claim's verdict over its items and a line saying how they split."""
    if not items:
        return INCONCLUSIVE, "no estimate"
    verdicts = [item_verdict(i, region) for i in items]
    counts = Counter(verdicts)
    no_ci = sum(i.ci is None for i in items)
    if len(counts) == 1:
        verdict = verdicts[0]
        detail = f"all {len(items)}" if len(items) > 1 else "the one estimate"
        if verdict == INCONCLUSIVE and no_ci:
            detail += f" (no interval computed for {no_ci})"
        return verdict, detail
    split = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])
    return INCONCLUSIVE, f"{split} (of {len(items)})"


def interval_difference(
    a: Item | tuple[float, tuple[float, float] | None],
    b: Item | tuple[float, tuple[float, float] | None],
) -> tuple[float, tuple[float, float] | None]:
    """``a − b`` and the interval of differences of the two intervals' ends: it covers the
    difference whenever both cover their values (so at least 90 % of the time, Bonferroni;
    wider than needed for independent estimates). For estimates whose joint resampling was not
    kept."""
    va, ca = (a.value, a.ci) if isinstance(a, Item) else a
    vb, cb = (b.value, b.ci) if isinstance(b, Item) else b
    if ca is None or cb is None:
        return va - vb, None
    return va - vb, (min(ca) - max(cb), max(ca) - min(cb))
