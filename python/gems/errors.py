"""Exceptions gems raises at its boundaries, each with a message that says what to do."""


class GemsError(Exception):
    """Base class of every gems-specific error."""


class MissingResourceError(GemsError, FileNotFoundError):
    """A package, model or data file gems needs is not installed or not found (message says how to get it)."""


class BackendUnavailableError(GemsError, RuntimeError):
    """An explicitly requested backend (triton, cuda) cannot run here; the message gives the reason."""


class DataError(GemsError, ValueError):
    """Input data is malformed: missing columns, empty splits, unknown ids."""
