"""A `POST /v1/generate` request read: the multipart upload streamed to a private folder, and its
fields turned into what `vssflow-run` would run with the same options.

The fields are `vssflow-run`'s options of one clip, by the same names, converted by the CLI's own
click parameters (their types, choices and defaults) and then `GenerateOptions.check`, so a value
is refused with the CLI's words; nothing here lists the solvers, formats or ranges again.

File parts (`video`, `ref_audio`) go to disk as they arrive, never whole in memory; the body is
counted as it streams, and refused past its limit (413) without reading more.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path

import click

from vssflow.runtime import cli as run_cli
from vssflow.runtime.errors import VssflowInputError
from vssflow.runtime.session import GenerateOptions

FILE_PARTS = ("video", "ref_audio")
# field -> the vssflow-run parameter it is (`format` is the CLI's --format, held as `out_format`)
FIELDS = {"transcript": "transcript", "speech_start": "speech_start", "speech_end": "speech_end", "seed": "seed",
          "steps": "steps", "solver": "solver", "cfg": "cfg", "format": "out_format", "input_audio": "input_audio"}
MAX_FIELD_BYTES = 64 * 1024           # a transcript or a number; files are parts, not fields
_PARAMS = {p.name: p for p in run_cli.main.params}
_EXTENSION = re.compile(r"\.[a-z0-9]{1,8}")


class RequestError(VssflowInputError):
    """A request the server cannot read (not multipart, an unknown or repeated field, no video):
    the HTTP status says which, the exit code is an option's (2)."""

    def __init__(self, message: str, http_status: int = 400):
        super().__init__(message)
        self.http_status = http_status


@dataclasses.dataclass(frozen=True)
class Job:
    """One request as vssflow-run would take it: `vssflow-run VIDEO --ref-audio REF_AUDIO [options]`."""

    video: Path
    ref_audio: Path | None
    options: GenerateOptions
    format: str | None                  # None: the input's container, as the CLI's default name
    input_audio: str


async def read_job(stream: AsyncIterator[bytes], content_type: str, folder: Path, max_bytes: int) -> Job:
    """The request body (`stream`), its file parts written into `folder`, read as a `Job`."""
    form = await read_form(stream, content_type, folder, max_bytes)
    if "video" not in form.files:
        raise RequestError("no video: send the clip as the multipart file part 'video'")
    values = {field: _convert(field, form.fields.get(field)) for field in FIELDS}
    options = GenerateOptions(values["transcript"], values["speech_start"], values["speech_end"], values["solver"],
                              values["steps"], values["cfg"], values["seed"])
    options.check()
    return Job(form.files["video"], form.files.get("ref_audio"), options, values["format"], values["input_audio"])


def _convert(field: str, value: str | None):
    """`value` as the CLI's parameter of `field` converts it (None: the CLI's default)."""
    param = _PARAMS[FIELDS[field]]
    if value is None:
        return param.default
    try:
        return param.type.convert(value, param, None)
    except click.BadParameter as e:
        e.param_hint = f"'{field}'"
        raise VssflowInputError(e.format_message()) from None


@dataclasses.dataclass
class Form:
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    files: dict[str, Path] = dataclasses.field(default_factory=dict)


async def read_form(stream: AsyncIterator[bytes], content_type: str, folder: Path, max_bytes: int) -> Form:
    """Parse a multipart/form-data body as it streams: file parts into `folder`, fields in memory."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise RequestError("send the request as multipart/form-data (curl -F video=@clip.mp4 ...)")
    parts = _Parts(folder)
    parser = MultipartParser(params[b"boundary"], parts.callbacks())
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > max_bytes:
                raise RequestError(f"the upload is larger than this server's limit of {megabytes(max_bytes)}", 413)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as e:
        raise RequestError(f"the multipart body cannot be read ({e})") from None
    finally:
        parts.close()
    if not parts.complete:
        raise RequestError("the multipart body ends before its last part does")
    return parts.form


def megabytes(n: int) -> str:
    """An upload size as the server's limits are given (--max-upload-mb): `1 MB`, `2.5 MB`."""
    return f"{n / 2**20:g} MB"


class _Parts:
    """python-multipart's callbacks: each part's headers, then its data, to a file or a field."""

    def __init__(self, folder: Path):
        self.folder, self.form, self.complete = folder, Form(), False
        self._header, self._value, self._headers = b"", b"", {}
        self._name, self._file, self._field = "", None, bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_part_end": self._end, "on_end": self._finished}

    def _begin(self) -> None:
        self._headers, self._field, self.complete = {}, bytearray(), False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header.lower()] = self._value
        self._header, self._value = b"", b""

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name not in FILE_PARTS and name not in FIELDS:
            raise RequestError(f"unknown field {name!r}: the parts are {', '.join(FILE_PARTS)} (files) and "
                               f"{', '.join(FIELDS)}")
        if name in self.form.files or name in self.form.fields:
            raise RequestError(f"the field {name!r} is given twice")
        self._name = name
        if name in FILE_PARTS:
            # the client's extension, where it is a plain one: the CLI's default output is the input's container
            ext = Path(params.get(b"filename", b"").decode("utf-8", "replace")).suffix.lower()
            path = self.folder / f"{name}{ext if _EXTENSION.fullmatch(ext) else ''}"
            self._file = open(path, "xb")
            self.form.files[name] = path

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
        else:
            self._field += data[start:end]
            if len(self._field) > MAX_FIELD_BYTES:
                raise RequestError(f"the field {self._name!r} is longer than {MAX_FIELD_BYTES // 1024} KB")

    def _end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            return
        try:
            self.form.fields[self._name] = self._field.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"the field {self._name!r} is not UTF-8 text") from None

    def _finished(self) -> None:
        self.complete = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
