"""`vssflow-serve --ray`: the same application (`app.create_app`) as Ray Serve replicas.

Each replica holds one `Session` and the whole application (`__serve_build_asgi_app__`): the same
routes, limits, token, batching and errors as one process, so a client cannot tell the two apart
but for the answers coming from several machines. Ray Serve's proxy listens on `host:port` and
routes each request to a replica; a replica takes at most `--max-concurrent` requests, plus one it
answers 503 itself (Ray queues the rest until a replica has room).

Replicas: one per GPU of the cluster, each holding its GPU, where the cluster has GPUs and the
device is not `cpu`; else `--replicas` CPU replicas (default 1). A local instance runs on
127.0.0.1 as `vssflow-run --ray` starts it (`ray_batch.ray_instance`); `--ray-address` joins a
running cluster instead. SIGTERM or Ctrl-C: Serve is shut down (its replicas finish the requests
they hold, up to `GRACE_SECONDS`) and the command exits 0.

Each replica's one line per request goes to the terminal through Ray's log forwarding, marked
with the replica.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from pathlib import Path

from vssflow.runtime import extras
from vssflow.runtime.errors import BackendError

from .limits import Limits

log = logging.getLogger("vssflow.serve")
APP_NAME = "vssflow"
DRAIN_SECONDS = 2
GRACE_SECONDS = 600                     # a replica's requests in flight at shutdown: as long as a long clip


def require_serve():
    """`ray.serve` (Ray itself already imported: `ray_instance`), or the error (exit 4) naming the
    install line."""
    try:
        from ray import serve
    except ImportError as e:            # Ray without its serve extra: grpc, fastapi, aiohttp, ...
        raise BackendError(f"vssflow-serve --ray needs Ray Serve, which cannot be imported ({e}): "
                           "pip install 'vssflow[serve-ray]'") from None
    return serve


class Replica:
    """One Ray Serve replica: a `Session` and the application around it."""

    def __init__(self, model_dir: str, session: dict, limits: Limits, batch: int | None, token: bytes | None):
        logging.basicConfig(level=logging.INFO, format="[vssflow-serve] %(message)s", force=True)
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from vssflow.runtime.session import Session

        from .app import create_app
        from .cli import resolve_batch
        self.session = Session(model_dir, **session)
        self._app = create_app(self.session, dataclasses.replace(limits, batch=resolve_batch(self.session, batch)),
                              token)
        log.info("replica ready: %s", self.session.describe())

    def __serve_build_asgi_app__(self):
        return self._app

    def __del__(self):
        batcher = getattr(getattr(self.__dict__.get("_app"), "state", None), "batcher", None)
        if batcher is not None:
            batcher.close()
        if getattr(self, "session", None) is not None:
            self.session.close()


def serve_on_ray(model_dir: Path, session: dict, limits: Limits, batch: int | None, token: bytes | None, *,
                 host: str, port: int, address: str | None, replicas: int | None) -> None:
    """Deploy the application on Ray Serve and serve until SIGTERM or SIGINT."""
    from vssflow.runtime.ray_batch import ray_instance
    extras.require("ray", "--ray")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    # The proxies keep draining their connections this long once Serve shuts down (Ray's default: 30 s,
    # past the controller's own 30-s wait); read by a local instance's processes.
    for name in ("RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        os.environ.setdefault(name, str(DRAIN_SECONDS))
    log.info("starting Ray" if address is None else f"connecting to Ray at {address}")
    with ray_instance(address, log_to_driver=True) as ray:
        serve = require_serve()
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        options = _placement(ray, session.get("device"), replicas)
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        try:
            deployment = serve.deployment(
                serve.ingress()(Replica), name="vssflow", max_ongoing_requests=limits.max_concurrent + 1,
                graceful_shutdown_timeout_s=GRACE_SECONDS, **options)
            try:
                serve.run(deployment.bind(str(model_dir), session, limits, batch, token), name=APP_NAME,
                          route_prefix="/")
            except Exception as e:         # a replica that could not start: its reason, not Ray's trace
                raise BackendError(f"the Ray Serve replicas did not start: {_reason(e)}") from None
            log.info("listening on http://%s:%d through Ray Serve, %d replica%s (%s); Ctrl-C or SIGTERM stops it",
                     host if ":" not in host else f"[{host}]", port, options["num_replicas"],
                     "s" if options["num_replicas"] > 1 else "",
                     "a GPU each" if options["ray_actor_options"].get("num_gpus") else "on CPUs")
            stop.wait()
            log.info("stopping: the replicas finish the requests they hold")
        finally:
            serve.shutdown()
    log.info("stopped")


def _placement(ray, device: str | None, replicas: int | None) -> dict:
    """Replicas and what each holds: a GPU each where the cluster has them (and the device is not
    the CPU), else one CPU each."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    on_gpu = gpus > 0 and (device is None or device.startswith("cuda"))
    if on_gpu:
        count = replicas or gpus
        if count > gpus:
            raise BackendError(f"--replicas {count}: the Ray cluster has {gpus} GPU{'s' if gpus > 1 else ''}, "
                               "one for each replica")
        return {"num_replicas": count, "ray_actor_options": {"num_gpus": 1}}
    if device is not None and device.startswith("cuda"):
        raise BackendError(f"--device {device}: the Ray cluster has no GPU")
    return {"num_replicas": replicas or 1, "ray_actor_options": {"num_cpus": 1}}


def _reason(e: BaseException) -> str:
    """The last line of a replica's error (Ray wraps it in its own trace)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line or "error:" in line]
    return (errors or lines or [type(e).__name__])[-1]
