"""Errors the library raises for bad input; the CLI prints them without a traceback."""


class DarkMatterError(Exception):
    """Base class: a problem with the user's input or files, with a message saying what to do."""


class ConfigError(DarkMatterError, ValueError):
    """A config file or value that cannot be used (unknown key, wrong table)."""


class HookError(DarkMatterError, KeyError):
    """An unknown or unsupported hook point; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelNotAvailableError(DarkMatterError):
    """A model cannot be loaded (offline and not cached, missing file, missing package)."""


class EmptyCorpusError(DarkMatterError):
    """A text source produced no usable text; the message names the source."""


class CorruptStoreError(DarkMatterError):
    """An activation store fails validation; the message names the bad file."""


class StoreLockedError(DarkMatterError):
    """Another process holds an activation store's writer lock."""


class ShapeMismatchError(DarkMatterError, ValueError):
    """Sizes that must agree do not (e.g. SAE d_in vs stored activation width)."""
