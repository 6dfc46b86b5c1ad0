"""The ASGI application of `vssflow-serve`: one `Session`, `POST /v1/generate`, `POST /v1/stream`
and `GET /healthz`.

A request is read into a private temporary folder (`form.py`), generated in a worker thread (the
Session is shared: its backend lock makes concurrent generations take turns stage by stage, and
the event loop never waits on the model), written by the CLI's own `plan_output`/`write_output`,
and answered with that file; the folder is removed once the answer is sent or has failed.

`/v1/stream` takes the same form and answers with the sound as it is made: a WAV of 32-bit float
mono samples whose header gives no length (`STREAM_WAV_HEADER`: the decoded frames, not the
container, decide it), each chunk sent as the Session yields it. Everything checked before the
model runs is refused with its status as in `/v1/generate`; a failure after the first bytes can
only end the stream unfinished (no terminating chunk), so a client never takes part of a sound
for all of it.

`GET /metrics` is Prometheus' text format (`metrics.py`): requests by path and status, their
seconds, the requests in flight, the seconds of audio made.

Errors are the CLI's one line as JSON, `{"error": ..., "exit_code": N}`, with the HTTP status
`errors.http_status` gives; an error no check foresaw is logged with its traceback and answered
500 without it. Every request ends in one log line.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import anyio.to_thread
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vssflow.runtime.errors import VssflowError, VssflowInputError, describe, http_status
from vssflow.runtime.output import plan_output, write_output

from .form import Job, RequestError, megabytes, read_job
from .metrics import Metrics

log = logging.getLogger("vssflow.serve")
RETRY_AFTER_SECONDS = 5                  # a 503's hint: about one short clip's turn
INTERNAL = "internal error (a bug): the server's log has its traceback"


class Busy(VssflowError):
    """More requests than --max-concurrent at once: come back later (503, Retry-After)."""

    exit_code = 75                       # sysexits.h EX_TEMPFAIL: a temporary failure, try again
    http_status = 503


@dataclasses.dataclass(frozen=True)
class Limits:
    max_upload_bytes: int
    max_concurrent: int


@dataclasses.dataclass(frozen=True)
class Answer:
    """A generated file and what its headers say."""

    path: Path
    media_type: str
    seconds: float
    nfe: int


def create_app(session, limits: Limits, token: bytes | None = None) -> Starlette:
    """The application around `session`; `token`: the bearer token every /v1 request must carry."""
    service = _Service(session, limits, token)
    app = Starlette(routes=[Route("/v1/generate", service.generate, methods=["POST"]),
                            Route("/v1/stream", service.stream, methods=["POST"]),
                            Route("/healthz", service.healthz, methods=["GET"]),
                            Route("/metrics", service.metrics.endpoint, methods=["GET"])],
                    exception_handlers={HTTPException: _http_exception})
    app.state.metrics = service.metrics
    return app


def generate_file(session, job: Job, folder: Path) -> Answer:
    """What `vssflow-run VIDEO [options]` writes, written into `folder` (the model runs here: call
    it from a worker thread)."""
    plan = plan_output(job.video, None, format=job.format, folder=folder, input_audio=job.input_audio)
    chunks, info = session.stream(job.video, job.options, ref_audio=job.ref_audio)
    samples = write_output(plan, chunks, info.sample_rate)
    return Answer(plan.path, plan.format.media_type, samples / info.sample_rate, chunks.nfe)


def wav_stream_header(sample_rate: int) -> bytes:
    """A WAV header for 32-bit float mono samples of a length not known yet: the RIFF and data sizes
    are 0xFFFFFFFF, as streaming writers (and readers such as ffmpeg and libsndfile) take it."""
    import struct
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 3, 1, sample_rate, sample_rate * 4, 4, 32)
            + b"data" + struct.pack("<I", unknown))


class _Service:
    def __init__(self, session, limits: Limits, token: bytes | None):
        self.session, self.limits, self.token = session, limits, token
        self.in_flight = 0               # requests admitted and not yet answered (the event loop's count)
        backend = session.backend
        self.metrics = Metrics(lambda: self.in_flight, {"model": session.folder.path.name, "backend": backend.name,
                                                        "precision": backend.precision})

    async def healthz(self, request: Request) -> Response:
        t0 = time.perf_counter()
        backend = self.session.backend
        answer = JSONResponse({"model": self.session.folder.path.name, "backend": backend.name,
                               "precision": backend.precision, "ready": True, "in_flight": self.in_flight,
                               "demo_model": self.session.folder.is_demo})
        _log(request, answer.status_code, t0)
        return answer

    async def generate(self, request: Request) -> Response:
        t0 = time.perf_counter()
        folder = tmp = None
        try:
            self._admit(request)
            self.in_flight += 1
            try:
                folder = tmp = Path(tempfile.mkdtemp(prefix="vssflow-serve-"))   # mode 700: this process's own
                job = await read_job(request.stream(), request.headers.get("content-type", ""), folder,
                                     self.limits.max_upload_bytes)
                answer = await anyio.to_thread.run_sync(generate_file, self.session, job, folder)
            finally:
                self.in_flight -= 1
            response = _FileThenRemove(answer.path, folder, request, t0, media_type=answer.media_type,
                                       filename=answer.path.name,
                                       headers={"X-Audio-Seconds": f"{answer.seconds:.3f}", "X-NFE": str(answer.nfe)})
            folder = None                                                      # the response removes it
            return response
        except ClientDisconnect:             # gone mid-upload: nobody to answer, and no bug
            _log(request, 499, t0, "the client left during the upload")
            return Response(status_code=400)
        except Exception as e:
            return self._error(request, e, t0, tmp)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    async def stream(self, request: Request) -> Response:
        t0 = time.perf_counter()
        folder = None
        admitted = False
        try:
            self._admit(request)
            self.in_flight += 1
            admitted = True
            folder = Path(tempfile.mkdtemp(prefix="vssflow-serve-"))
            job = await read_job(request.stream(), request.headers.get("content-type", ""), folder,
                                 self.limits.max_upload_bytes)
            if job.format not in (None, "wav"):
                raise RequestError(f"/v1/stream sends WAV only (format {job.format!r}): leave format out, or "
                                   "use /v1/generate for other formats", 422)
            chunks, info = await anyio.to_thread.run_sync(
                lambda: self.session.stream(job.video, job.options, ref_audio=job.ref_audio))
        except ClientDisconnect:
            self._done(admitted, folder)
            _log(request, 499, t0, "the client left during the upload")
            return Response(status_code=400)
        except Exception as e:
            self._done(admitted, folder)
            return self._error(request, e, t0, folder)
        return StreamingResponse(self._chunks(request, t0, chunks, info.sample_rate, folder), media_type="audio/wav",
                                 headers={"X-Sample-Rate": str(info.sample_rate)})

    async def _chunks(self, request: Request, t0: float, chunks, sample_rate: int, folder: Path):
        """The header, then each chunk as the model makes it (in a worker thread); the request's
        slot and folder released however it ends: done, failed, or the client gone."""
        samples, status, what = 0, 499, "the client left during the stream"
        try:
            yield wav_stream_header(sample_rate)
            while (chunk := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
                samples += len(chunk)
                yield np.ascontiguousarray(chunk, dtype="<f4").tobytes()
            status, what = 200, f"{samples / sample_rate:.3f} s of audio streamed, {chunks.nfe} NFE"
            request.app.state.metrics.audio(samples / sample_rate)
        except Exception as e:              # the status line has gone out: the stream ends unfinished
            message, code = describe(e)
            status, what = 500, f"stream ended unfinished: exit {code}: {message}"
            log.error("%s %s: %s", request.method, request.url.path, message,
                      exc_info=None if isinstance(e, VssflowError) else e)
            raise
        finally:
            chunks.close()                  # the decoder and the run: quick, and safe while cancelled
            self._done(True, folder)
            _log(request, status, t0, what)

    def _admit(self, request: Request) -> None:
        """Token, declared size and capacity, before anything is read."""
        self._authorize(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_upload_bytes:
            raise RequestError(f"the upload ({int(length) / 2**20:.1f} MB) is larger than this server's "
                               f"limit of {megabytes(self.limits.max_upload_bytes)}", 413)
        if self.in_flight >= self.limits.max_concurrent:
            raise Busy(f"the server is busy ({self.in_flight} requests in flight, at most "
                       f"{self.limits.max_concurrent}): try again later")

    def _done(self, admitted: bool, folder: Path | None) -> None:
        if admitted:
            self.in_flight -= 1
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
            raise RequestError("a valid token is needed: send the header 'Authorization: Bearer TOKEN'", 401)

    def _error(self, request: Request, e: Exception, t0: float, folder: Path | None) -> Response:
        message, code = describe(e)
        if folder is not None:               # the upload by its part's name, not the server's folder
            message = message.replace(f"{folder}{os.sep}", "")
        status = http_status(e)
        if not isinstance(e, VssflowError):
            log.error("%s %s: %s", request.method, request.url.path, message, exc_info=e)
            if not isinstance(e, MemoryError):
                message = INTERNAL
        headers = {}
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if status == 503:
            headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        answer = JSONResponse({"error": message, "exit_code": code}, status_code=status, headers=headers)
        _log(request, status, t0, f"exit {code}: {message}")
        return answer


class _FileThenRemove(FileResponse):
    """The generated file, sent from disk; its folder removed once it is sent, or the sending failed."""

    def __init__(self, path: Path, folder: Path, request: Request, t0: float, **kwargs):
        super().__init__(path, **kwargs)
        self.folder, self.request, self.t0 = folder, request, t0

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
            self.request.app.state.metrics.audio(float(self.headers["x-audio-seconds"]))
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            _log(self.request, self.status_code, self.t0,
                 f"{self.headers['x-audio-seconds']} s of audio, {self.headers['x-nfe']} NFE")


async def _http_exception(request: Request, e: HTTPException) -> Response:
    """Starlette's own refusals (no such path, a method a path does not take) in the same JSON."""
    _log(request, e.status_code, time.perf_counter(), e.detail)
    return JSONResponse({"error": f"{request.method} {request.url.path}: {e.detail}",
                         "exit_code": VssflowInputError.exit_code}, status_code=e.status_code, headers=e.headers)


def _log(request: Request, status: int, t0: float, what: str = "") -> None:
    """The request's one line: who, what, the status, how long, and the outcome (never a header);
    and its count and seconds in the metrics."""
    seconds = time.perf_counter() - t0
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.request(request.url.path, status, seconds)
    client = request.client.host if request.client else "-"
    log.info("%s %s %s %d %.2f s%s", client, request.method, request.url.path, status, seconds,
             f" ({what})" if what else "")
