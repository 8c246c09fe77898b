"""The error hierarchy: every error embfactor raises on bad input is an EmbfactorError.

Each subclass also subclasses the built-in exception a user would catch without knowing embfactor
(ValueError, TypeError, FileNotFoundError, IndexError, KeyError), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class EmbfactorError(Exception):
    """Base class of all errors embfactor raises on purpose."""


class ConfigError(EmbfactorError, ValueError):
    """A configuration value is outside its allowed range."""


class InvalidInputError(EmbfactorError, ValueError):
    """A tensor, text or file given by the user cannot be used (NaN, wrong shape, empty, ...)."""


class InvalidTypeError(EmbfactorError, TypeError):
    """An argument has the wrong type."""


class UnknownMethodError(EmbfactorError, KeyError, ValueError):
    """A name looked up in a registry (method, model, task) is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(EmbfactorError, FileNotFoundError):
    """A model name or path does not point to a usable model."""


class SurgeryError(EmbfactorError, ValueError):
    """A model cannot be factorized as asked; the model was left untouched."""


class CorruptFileError(EmbfactorError, ValueError):
    """A saved file is truncated, corrupt or from an incompatible version."""


class VerificationError(EmbfactorError, RuntimeError):
    """A written model, loaded back as users load it, is far worse than the model that was compressed."""


class TokenIndexError(EmbfactorError, IndexError):
    """A token id is outside the vocabulary."""


def some_names(names: list[str], shown: int = 8) -> str:
    """The first ``shown`` names for an error message, and how many more there are: ``"a, b, ... (3 more)"``."""
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def a_or_an(word: str) -> str:
    """The word with its indefinite article: ``"an encoder"``, ``"a decoder"``."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"
