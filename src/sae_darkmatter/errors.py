"""Errors the library raises for bad input; the CLI prints them without a traceback."""

from __future__ import annotations


class DarkMatterError(Exception):
    """Base class: a problem with the user's input or files, with a message saying what to do."""


class ConfigError(DarkMatterError, ValueError):
    """A config file or value that cannot be used (unknown key, wrong table)."""


class ConfigValueError(ConfigError):
    """A config value of the wrong type or out of range; names the key by its path in the file."""

    def __init__(self, where: str, key: str, detail: str, *, file: str | None = None) -> None:
        self.where, self.key, self.detail, self.file = where, key, detail, file
        text = f"{where}.{key} {detail}" if where else f"{key} {detail}"
        super().__init__(f"{file}: {text}" if file else text)

    def moved_to(self, where: str) -> ConfigValueError:
        """The same error for the table at ``where`` (the path the value was read from)."""
        return ConfigValueError(where, self.key, self.detail, file=self.file)

    def in_file(self, file: str) -> ConfigValueError:
        """The same error naming the config file it came from."""
        return ConfigValueError(self.where, self.key, self.detail, file=file)


class HookError(DarkMatterError, KeyError):
    """An unknown or unsupported hook point; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelNotAvailableError(DarkMatterError):
    """A model cannot be loaded (offline and not cached, missing file, missing package)."""


class EmptyCorpusError(DarkMatterError):
    """A text source produced no usable text; the message names the source."""


class CorpusEncodingError(DarkMatterError, ValueError):
    """A text file of the corpus is not UTF-8; the message names the file and byte offset."""


class CorruptStoreError(DarkMatterError):
    """An activation store fails validation; the message names the bad file."""


class CorruptSAEError(DarkMatterError):
    """An SAE file is truncated, unreadable or fails its checksum; the message names the file."""


class DiskFullError(DarkMatterError, OSError):
    """A write failed for lack of space (or a file-size limit); nothing half-written is kept."""


class StoreLockedError(DarkMatterError):
    """Another process holds an activation store's writer lock."""


class NonFiniteError(DarkMatterError, ValueError):
    """Activations, SAE outputs or losses hold NaN or ±inf; the message lists where.

    ``places`` are the first few bad tokens as ``(context, position, kind)`` (kind ``"nan"`` or
    ``"inf"``), ``n_bad`` counts all bad tokens among ``n_total``.
    """

    SHOWN = 5

    def __init__(self, what: str, places: list[tuple[int, int, str]], n_bad: int, n_total: int,
                 advice: str) -> None:
        self.places, self.n_bad, self.n_total = places, n_bad, n_total
        shown = ", ".join(f"context {c} position {p} ({k})" for c, p, k in places[: self.SHOWN])
        more = ", ..." if n_bad > len(places[: self.SHOWN]) else ""
        super().__init__(f"{what}: NaN or inf at {n_bad} of {n_total} tokens ({shown}{more}); "
                         f"{advice}")


class IncompatibleSAEError(DarkMatterError, ValueError):
    """An SAE whose parameters cannot run on the activations (non-float or mixed dtypes)."""


class ShapeMismatchError(DarkMatterError, ValueError):
    """Sizes that must agree do not (e.g. SAE d_in vs stored activation width)."""
