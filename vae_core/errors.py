"""The one base class of every error this project raises on purpose.

An error that derives from ``VaeError`` is something a person can fix from its message alone (a
bad parameter, a malformed file, a registry action that does not apply, an unreachable
service), so the command line prints it as one line. Anything else is a bug or a library's
failure and keeps its traceback.
"""

from __future__ import annotations


class VaeError(Exception):
    """Base class of the project's own errors: a message that names what is wrong and where."""
