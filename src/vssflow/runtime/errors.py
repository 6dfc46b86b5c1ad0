"""Errors vssflow raises for a user to read: one line, naming the input and the problem.

One root, `VssflowError`: the command-line tools print any of them without a traceback and exit
with its `exit_code`. The export's errors (`vssflow.export.errors`) derive from it too.
`vssflow-serve` answers the same line as JSON, with the HTTP status `HTTP_STATUS` gives its code.
"""


EXIT_INTERNAL = 1          # an error no check foresaw: a bug, or the machine out of memory


class VssflowError(Exception):
    """Base of every error meant for a user."""

    exit_code = EXIT_INTERNAL


def describe(e: BaseException) -> tuple[str, int]:
    """Any error as one line and the exit code a run ends with: ours say themselves; memory
    running out and errors no check foresaw (bugs) exit `EXIT_INTERNAL`."""
    message = " ".join(str(e).split())
    if isinstance(e, VssflowError):
        return message, e.exit_code
    if isinstance(e, MemoryError):
        return "out of memory (try a shorter video, --backend ort, or a smaller model)", EXIT_INTERNAL
    return f"internal error: {type(e).__name__}: {message}", EXIT_INTERNAL


class VssflowInputError(VssflowError):
    """An input (video, transcript, reference voice, option) that cannot be used as given."""

    exit_code = 2


class VideoError(VssflowInputError):
    """A video file that has no video stream, is corrupt or truncated, or has no frames."""

    exit_code = 10


class TranscriptError(VssflowInputError):
    """A transcript or speech interval that cannot be turned into phoneme ids."""

    exit_code = 11


class AudioError(VssflowInputError):
    """A reference-voice file that cannot be read or holds no usable audio."""

    exit_code = 12


class ModelFolderError(VssflowInputError):
    """A model folder that is missing, altered, damaged, or from a newer format."""

    exit_code = 3


class BackendError(VssflowInputError):
    """No backend can run the model as asked (a missing package, GPU or engine)."""

    exit_code = 4


class OutputError(VssflowInputError):
    """An output path that cannot be written (type, folder, disk)."""

    exit_code = 5


class NonFiniteError(ModelFolderError):
    """A window whose latent or mel is not finite even in FP32: the model's weights overflow, and
    nothing sound can be written."""


# The HTTP status `vssflow-serve` answers each exit code with: what the client sent cannot be used
# (an option, the video, the transcript, the voice, a format that cannot hold the video) is 422;
# the server's own model folder or backend failing, and bugs, are 500. An error raised by the
# server itself (a malformed request, no token, too large, busy) carries its own `http_status`.
HTTP_STATUS = {
    EXIT_INTERNAL: 500,
    VssflowInputError.exit_code: 422,
    VideoError.exit_code: 422,
    TranscriptError.exit_code: 422,
    AudioError.exit_code: 422,
    ModelFolderError.exit_code: 500,
    BackendError.exit_code: 500,
    OutputError.exit_code: 422,
}


def http_status(e: BaseException) -> int:
    """The HTTP status of an error's answer: its own `http_status`, else its exit code's."""
    status = getattr(e, "http_status", None)
    return status if status is not None else HTTP_STATUS.get(describe(e)[1], 500)
