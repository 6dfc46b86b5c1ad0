"""`vssflow-serve --model DIR`: the runtime as an HTTP service (see `vssflow.serve`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import click

from vssflow.runtime import extras
from vssflow.runtime.backends import BACKENDS
from vssflow.runtime.errors import VssflowError, VssflowInputError, describe
from vssflow.runtime.precision import PRECISIONS

from .limits import Limits

TOOL = "vssflow-serve"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vssflow", prog_name=TOOL, message="%(prog)s %(version)s")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model folder from vssflow-export.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; put a token on it with --token-file).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on; 0: a free one (the 'listening on' line says which).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="As vssflow-run's --backend.")
@click.option("--device", default=None, help="cpu or cuda[:N] (default: the best available).")
@click.option("--precision", type=click.Choice(("auto",) + PRECISIONS), default="auto", show_default=True,
              help="As vssflow-run's --precision.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A file holding the bearer token every /v1 request must send (Authorization: Bearer TOKEN).")
@click.option("--max-upload-mb", type=click.FloatRange(0, None, min_open=True), default=100, show_default=True,
              help="Largest request body (the video, the voice and the fields), in MB; larger ones get 413.")
@click.option("--max-concurrent", type=click.IntRange(1, None), default=4, show_default=True,
              help="Requests handled at once (uploading, waiting for the model or generating); more get 503.")
@click.option("--request-timeout", type=click.FloatRange(0, None), default=900, show_default=True,
              help="Seconds a request may wait for the model and run, from its upload read to its answer's start "
                   "(/v1/stream: its first chunk); past them it gets 504 and its work is cancelled. 0: no limit.")
@click.option("--max-seconds", type=click.FloatRange(0, None, min_open=True), default=300, show_default=True,
              help="The longest video taken, in seconds; longer ones get 422 before the model runs.")
@click.option("--max-transcript", type=click.IntRange(1, None), default=2000, show_default=True,
              help="The longest transcript taken, in characters; longer ones get 422.")
@click.option("--batch", type=click.IntRange(1, None), default=None,
              help="Requests to /v1/generate whose windows run together in one flow-step call, from those "
                   "waiting when the model is free (never waiting for more). Default: as vssflow-run's batches "
                   "(1 on a CPU, the model folder's most on a GPU).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve through Ray Serve: the same API from replicas (one per GPU of the cluster, or --replicas "
                   "CPU ones), on a local Ray instance on 127.0.0.1 unless --ray-address says where. Needs "
                   "pip install 'vssflow[serve-ray]'.")
@click.option("--ray-address", default=None, metavar="HOST:PORT",
              help="With --ray: the Ray cluster's head to join (or 'auto'), instead of a local instance.")
@click.option("--replicas", type=click.IntRange(1, None), default=None,
              help="With --ray: replicas to run (default: one per GPU of the cluster; 1 without GPUs).")
def main(model_dir, host, port, backend, device, precision, token_file, max_upload_mb, max_concurrent,
         request_timeout, max_seconds, max_transcript, batch, use_ray, ray_address, replicas):
    """Serve VSSFlow over HTTP: POST /v1/generate (multipart: a `video` file, an optional
    `ref_audio` file, and vssflow-run's options as fields) answers with the file vssflow-run
    would write; POST /v1/stream (the same form) answers with a WAV as it is made, chunk by
    chunk; GET /healthz says what is loaded. Stop it with SIGTERM or Ctrl-C: it stops
    accepting, finishes the requests in flight, and exits 0.

    \b
    Example:
      vssflow-serve --model models/vssflow --port 8000
      curl -F video=@clip.mp4 -F format=wav -F seed=3 http://127.0.0.1:8000/v1/generate -o clip.wav
      curl -N -F video=@clip.mp4 http://127.0.0.1:8000/v1/stream | ffplay -nodisp -autoexit -
      vssflow-serve --model models/vssflow --ray --ray-address HEAD:6379   # replicas on a Ray cluster
    """
    logging.basicConfig(level=logging.INFO, format=f"[{TOOL}] %(message)s", stream=sys.stderr)
    if not use_ray and (ray_address is not None or replicas is not None):
        click.echo(f"{TOOL}: error: --ray-address and --replicas go with --ray", err=True)
        sys.exit(2)
    try:
        extras.require("serve", TOOL)
        token = _read_token(token_file) if token_file is not None else None
        # `batch` is resolved against the loaded model (here, or in each Ray Serve replica)
        limits = Limits(int(max_upload_mb * 2**20), max_concurrent, request_timeout=request_timeout or None,
                        max_seconds=max_seconds, max_transcript=max_transcript)
        if use_ray:
            _serve_on_ray(model_dir, dict(backend=backend, device=device,
                                          precision=None if precision == "auto" else precision),
                          limits, batch, token, host=host, port=port, address=ray_address, replicas=replicas)
            sys.exit(0)
        session = _session(model_dir, backend, device, None if precision == "auto" else precision)
        batch = resolve_batch(session, batch)
        logging.getLogger("vssflow.serve").info(
            "/v1/generate: the windows of up to %d waiting request%s run together", batch, "s" if batch > 1 else "")
        sock = _listen(host, port)                  # once the model is ready: no client waits on a load
    except VssflowError as e:
        message, code = describe(e)
        click.echo(f"{TOOL}: error: {message}", err=True)
        sys.exit(code)
    if token is None and host not in LOOPBACK:
        logging.getLogger("vssflow.serve").warning(
            "warning: listening on %s without --token-file: anyone who can reach this machine can use it", host)
    from .app import create_app
    app = create_app(session, dataclasses.replace(limits, batch=batch), token)
    try:
        _serve(app, sock, host)
    finally:
        app.state.batcher.close()
        session.close()
    sys.exit(0)


def _read_token(path: Path) -> bytes:
    try:
        token = path.read_bytes().strip()
    except OSError as e:
        raise VssflowInputError(f"{path}: cannot read the token file ({e.strerror or e})") from None
    if not token:
        raise VssflowInputError(f"{path}: the token file is empty")
    return token


def _session(model_dir: Path, backend: str, device: str | None, precision: str | None):
    from vssflow.runtime.cli import announce
    from vssflow.runtime.session import Session
    session = Session(model_dir, backend=backend, device=device, precision=precision)
    announce(session, logging.getLogger("vssflow.serve").info)
    return session


def resolve_batch(session, batch: int | None) -> int:
    """`--batch`, or the Session's default; over the folder's most: one line (exit 2)."""
    if batch is None:
        return session.default_batch
    try:
        _check_batch(session.folder, batch)
    except VssflowInputError:
        session.close()
        raise
    return batch


def _check_batch(folder, batch: int | None) -> None:
    from vssflow.runtime.batch import most_windows
    most = most_windows(folder)
    if batch is not None and batch > most:
        raise VssflowInputError(f"--batch {batch}: this model folder's graphs take at most {most} windows at once")


def _serve_on_ray(model_dir: Path, session: dict, limits, batch: int | None, token: bytes | None, **where) -> None:
    """`--ray`: what the replicas would refuse is refused here first (the folder, --batch), then
    `ray_serve.serve_on_ray`."""
    from vssflow.runtime.model_folder import ModelFolder

    from .ray_serve import serve_on_ray
    _check_batch(ModelFolder.open(model_dir), batch)
    serve_on_ray(model_dir, session, limits, batch, token, **where)


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)      # create_server's own text repeats the address
        raise VssflowInputError(f"cannot listen on {host} port {port} ({why})") from None


def _serve(app, sock: socket.socket, host: str) -> None:
    """Run `app` under uvicorn on `sock` until SIGTERM or SIGINT; then it stops accepting,
    finishes the requests in flight, and returns."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                bound = sock.getsockname()
                logging.getLogger("vssflow.serve").info(
                    "listening on http://%s:%d (%s)", host if ":" not in host else f"[{host}]", bound[1],
                    "Ctrl-C or SIGTERM stops it")

    # uvicorn raises the signal that stopped it again once it has shut down, to the handler found
    # before it started: a clean stop is exit 0, not death by SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                            lifespan="off")
    Server(config).run(sockets=[sock])
    logging.getLogger("vssflow.serve").info("stopped")


if __name__ == "__main__":
    main()
