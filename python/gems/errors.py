"""Exceptions gems raises at its boundaries, each with a message that says what to do."""


class GemsError(Exception):
    """Base class of every gems-specific error."""


class MissingResourceError(GemsError, FileNotFoundError):
    """A model or data file gems needs (or the registry wheel carrying it) is not installed or not found
    (message says how to get it)."""


class MissingDependencyError(GemsError, ImportError):
    """An optional Python package a feature needs cannot be imported; the message names the gems extra that
    installs it and ends in the pip command (:func:`gems.resources.require`). An ImportError, so the usual
    ``except ImportError`` around an optional import catches it."""


class BackendUnavailableError(GemsError, RuntimeError):
    """An explicitly requested backend (triton, cuda) cannot run here; the message gives the reason."""


class DataError(GemsError, ValueError):
    """Input data is malformed: missing columns, empty splits, unknown ids."""
