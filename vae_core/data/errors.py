"""Exceptions raised by the data layer.

Every data problem is a ``DataError`` (a ``VaeError`` and a ``ValueError``), so a command-line
entry point can catch one class, print the message and exit without a traceback. The
subclasses let callers and tests tell the failure modes apart.

``SourceUnavailable`` is deliberately not a ``DataError``: a source that could not be reached
says nothing about the data, so it is the one failure worth trying again (the orchestrator's
retries do that; bad input is never retried).
"""

from __future__ import annotations

from vae_core.errors import VaeError


class DataError(VaeError, ValueError):
    """Base class: the data on disk or the data settings are not what was expected."""


class IdxFormatError(DataError):
    """An IDX file is malformed: magic number, dtype, dimensions, size or compression."""


class ChecksumError(DataError):
    """A file's checksum differs from the published or recorded one."""


class DatasetMismatchError(DataError):
    """Arrays that belong together disagree: counts, shapes, dtypes or label range."""


class SourceError(DataError):
    """A data source is unknown, missing, empty or unsafe (for example a symlink escaping it)."""


class SourceUnavailable(VaeError):
    """A named source could not be reached this time (a network error, a timeout, a server's
    5xx): transient, so the fetch stage exits with its own status and the orchestrator
    retries it."""


class SplitError(DataError):
    """Split settings do not fit the data (for example a validation set as large as the data)."""


class ProcessedDataError(DataError):
    """A processed-data folder is missing a file or holds a file of the wrong shape or type."""
