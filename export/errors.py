"""Errors the export side raises for a user to read: one line, naming the file and the problem."""


class VssflowError(Exception):
    """Base of every error meant for a user; the CLIs print it without a traceback."""

    exit_code = 1


class CheckpointError(VssflowError):
    """A checkpoint that is not the authors' layout, is unsafe to load, or is damaged."""

    exit_code = 3
