"""Small HTML pieces shared by the report and each analysis's report section."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

esc = html.escape

PAGE_STYLE = """<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
/* a wide table scrolls inside itself, not the page */
table { border-collapse: collapse; display: block; max-width: 100%; overflow-x: auto; }
td, th { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; } img { max-width: 100%; }
figure { margin: 1.5em 0; } code { background: #f4f4f4; padding: 0 3px; }
</style>"""  # the look of every report page


def _rel(path: str, out_dir: Path) -> str:
    p = Path(path)
    return str(p.relative_to(out_dir)) if p.is_absolute() and p.is_relative_to(out_dir) else str(p)


def figures_html(paths: dict[str, str], out_dir: Path) -> str:
    """<figure> tags for figure paths (made relative to the report folder)."""
    return "".join(
        f'<figure><img src="{esc(_rel(p, out_dir))}" alt="{esc(k)}"></figure>'
        for k, p in paths.items()
    )


def ci_text(value: float, ci: Any) -> str:
    """``value [low, high]`` with 4 significant digits."""
    return f"{value:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]"


def num(value: Any, fmt: str) -> str:
    """A formatted number, or a dash where there is none (e.g. an L0 outside a sweep)."""
    return "–" if value is None else fmt.format(value)
