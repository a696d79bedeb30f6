"""Exception types of :mod:`data_prep`: every bad-input error derives from :class:`DataPrepError`."""
from __future__ import annotations


class DataPrepError(Exception):
    """Base class of every error :mod:`data_prep` raises for bad input files or options."""


class FactFileError(DataPrepError):
    """A fact HDF5 file is of another format version, truncated, or missing a dataset."""


class MissingDatasetError(DataPrepError, FileNotFoundError):
    """A dataset expected on disk is absent or incomplete; the message names the expected layout."""
