"""Errors the export side raises for a user to read: one line, naming the file and the problem.

They share the runtime's root (`vssflow.runtime.errors.VssflowError`), so one `except` serves both.
"""

from vssflow.runtime.errors import VssflowError


class CheckpointError(VssflowError):
    """A checkpoint that is not the authors' layout, is unsafe to load, or is damaged."""

    exit_code = 3


class ExportError(VssflowError):
    """An export that cannot be done as asked (options, a missing package, a graph that fails its check)."""

    exit_code = 4
