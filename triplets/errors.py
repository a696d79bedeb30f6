"""Exception types of :mod:`triplets`: every bad-input error derives from :class:`TripletsError`."""
from __future__ import annotations


class TripletsError(Exception):
    """Base class of every error :mod:`triplets` raises for bad input, configs or runs."""


class ConfigError(TripletsError, ValueError):
    """A configuration file or ``--set`` override is invalid (unknown key, wrong type)."""


class RunFolderError(TripletsError, FileNotFoundError):
    """A run folder is missing, incomplete, or does not match the data or model given."""
