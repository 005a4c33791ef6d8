"""Errors of the data layer. Each message says what happened and what to do about it."""

from __future__ import annotations

import pickle


class DataError(Exception):
    """Base class: the CLI prints these without a traceback."""


class LayoutError(DataError, ValueError):
    """A source folder is not laid out as expected (the message says what was expected and found)."""


class SourceUnavailableError(DataError, RuntimeError):
    """A source could not be downloaded: no network, no credentials, unknown handle."""


class CacheError(DataError, FileNotFoundError):
    """A prepared cache is missing, incomplete or from an incompatible version."""


class UnsafePickleError(DataError, pickle.UnpicklingError):
    """A pickle asked for something a CIFAR-100 file never holds; nothing of it was executed."""
