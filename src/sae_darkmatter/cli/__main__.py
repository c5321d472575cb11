"""``python -m sae_darkmatter.cli``: the ``darkmatter`` command."""

from sae_darkmatter.cli import app

app()
