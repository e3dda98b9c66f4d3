"""The data pipeline's one error type, in a module of its own so that every data module can raise it."""

from __future__ import annotations


class DataError(ValueError):
    """A data folder that does not match docs/data.md; the message names the file."""
