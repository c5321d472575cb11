"""The ``darkmatter`` command line: ``run`` the whole pipeline or each stage alone.

``common`` holds the typer app and what the commands share; ``stages`` the pipeline's commands,
``decompose`` the decomposition of stored SAEs, prefixes or transcoders, ``stream`` the
store-free decomposition, ``sweep`` a run per value of one setting, ``tools``
the others, ``autointerp`` the auto-interpretability command. Importing this package registers
them all on ``app`` (the console script's entry point).
"""

from __future__ import annotations

from sae_darkmatter.cli import decompose, stages, stream, sweep, tools
from sae_darkmatter.cli.autointerp import register as _register_autointerp
from sae_darkmatter.cli.common import app

__all__ = ["app", "decompose", "stages", "stream", "sweep", "tools"]

_register_autointerp(app)  # needs the [autointerp] extra only when it runs
