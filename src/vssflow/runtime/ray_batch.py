"""`vssflow-run ... --ray`: the batch as a Ray Data pipeline of Session actors.

    with ray_instance(num_cpus=2):                      # a local instance on 127.0.0.1, or address=...
        for row in run_ray(planned, known, todo, model_dir, options):
            ...                                         # the rows `runner.run_local` gives, in item order

The item list goes in (paths and a row's options: a few hundred bytes per item) and one report
row comes out per item. A pool of actors, each holding one `Session` for its life (one per GPU
with `num_gpus=1`, else CPU actors), takes blocks of `batch` items; each actor runs its block
through `Session.generate_many` (its worker threads decode the next clips while its model
runs, windows of several clips share calls) and writes each output itself, atomically, into
the output folder: a filesystem every node shares, on a cluster.

Frames never cross the object store. A 10-second window prepared for the encoders is 52.7 MB
of uint8 frames (349 MB as their float32 input) against a few MB of MP4, so decoding and frame
preparation run as threads beside the model in each actor, not as separate CPU tasks: shipping
their output would cost more than making it where it is used.

An item never raises: a bad clip ends as a `failed` row with the exit code a single run would
have given. An actor's constructor that fails loses its error's class in Ray, so the model
folder is opened in the driver first (exit 3 there). Ray is optional (`pip install
'vssflow[ray]'`) and imported only here, after the environment a local instance needs is set.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import pickle
import secrets
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from . import extras, runner
from .errors import EXIT_INTERNAL, BackendError
from .items import Planned
from .model_folder import ModelFolder

NO_RESULT = ("no result came back: the worker died on this item twice (a crash, or killed for memory); "
             "Ray's logs say more")


def check_ray() -> None:
    """Raise the error `--ray` exits with (4, the install line) when Ray is not installed, without
    importing it (a local instance's environment must be set before the first import)."""
    extras.require("ray", "--ray")


def require_ray():
    """`ray` with Ray Data, or the error `--ray` exits with (4) naming the install line."""
    check_ray()
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise BackendError(f"--ray needs Ray Data, which cannot be imported ({e}): "
                           f"{extras.install_hint('ray', [])}") from None
    return ray


# --- the actors ----------------------------------------------------------------------------------
class SessionWorker:
    """A Ray Data actor: one `Session` for its life; each call runs a block of items through
    `Session.generate_many` and writes their outputs. Takes and gives column batches."""

    def __init__(self, model_dir: str, options, session: dict, batch: int | None = None):
        from .session import Session
        self.session = Session(model_dir, **session)
        self.options, self.batch = options, batch

    def __call__(self, block: dict) -> dict:
        """`block["planned"]`: one pickled list of `items.Planned` -> a JSON row per item."""
        planned = pickle.loads(block["planned"][0])
        rows = runner.run_local(self.session, planned, self.options, batch=self.batch)
        return {"row": [json.dumps(r) for r in rows]}


# --- the batch -----------------------------------------------------------------------------------
def run_ray(planned: list[Planned], known: dict[int, dict], todo: list[Planned], model_dir: Path, options, *,
            session: dict | None = None, address: str | None = None, workers: int | None = None,
            batch: int | None = None, num_cpus: int | None = None,
            status: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Every item's row, in item order: `known` ones (planning failures, skipped) in place, the
    others from the actors as they finish. `session`: each actor's `Session` keywords (backend,
    device, preprocess, precision). Starts (or connects to) Ray, and ends it, itself; `status`
    hears what it is doing until rows come (the actors send no finer progress)."""
    status = status or (lambda text: None)
    session = dict(session or {})
    ModelFolder.open(model_dir, verify_hashes=session.pop("verify_hashes", False))   # exit 3 here, not in an actor
    if not todo:
        yield from runner.merge(planned, known, iter(()))
        return
    status("starting Ray" if address is None else f"connecting to Ray at {address}")
    with ray_instance(address, num_cpus=num_cpus) as ray:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        workers = workers or max(1, gpus)
        status(f"generating on {min(workers, len(todo))} Ray actor(s): rows come as their items finish")
        rows = _rows(ray, todo, model_dir, options, workers=workers, gpus_per_worker=1 if gpus else 0,
                     session=session, batch=batch)
        by_index = {p.index: p for p in todo}
        yield from runner.merge(planned, known, in_order(rows, [p.index for p in todo], by_index))


def in_order(rows: Iterator[dict], order: Sequence[int], planned: dict[int, Planned]) -> Iterator[dict]:
    """Rows arriving in any order, yielded in `order` as soon as every earlier one has come; an
    item whose row never came (its actor died twice) gets a failed row at the end."""
    pending: dict[int, dict] = {}
    position = 0
    for r in rows:
        pending[r["index"]] = r
        while position < len(order) and order[position] in pending:
            yield pending.pop(order[position])
            position += 1
    for k in order[position:]:
        yield pending.pop(k) if k in pending else runner.row(planned[k], "failed", output=None, error=NO_RESULT,
                                                              exit_code=EXIT_INTERNAL)


def _rows(ray, todo: list[Planned], model_dir: Path, options, *, workers: int, gpus_per_worker: int,
          session: dict, batch: int | None) -> Iterator[dict]:
    from ray.data import ActorPoolStrategy
    per_call = batch or 1                                # items per actor call: their windows may share calls
    blocks = [todo[a:a + per_call] for a in range(0, len(todo), per_call)]
    # One block per actor call, so the pool shares the items out evenly. An item that kills its
    # actor (a crash, an out-of-memory kill) is tried once more, then its block is given up and
    # the rest go on: Ray Data's defaults would retry it for ever (max_task_retries=-1) or end the batch.
    with _data_context(enable_progress_bars=False, print_on_execution_start=False, max_errored_blocks=-1):
        ds = ray.data.from_items([{"planned": pickle.dumps(b)} for b in blocks], override_num_blocks=len(blocks))
        with warnings.catch_warnings():      # max_task_retries is a "ray_remote_arg", deprecated in 2.60
            warnings.simplefilter("ignore", DeprecationWarning)     # with no named replacement
            ds = ds.map_batches(
                SessionWorker, batch_size=1, compute=ActorPoolStrategy(size=min(workers, len(blocks))),
                num_cpus=1, num_gpus=gpus_per_worker, max_task_retries=1,
                fn_constructor_kwargs={"model_dir": str(model_dir), "options": options, "session": session,
                                       "batch": batch},
                batch_format="numpy")
        # iter_batches with no prefetch: a block's rows come as soon as it is done (iter_rows
        # would wait for the next block too).
        for out in ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"):
            yield from (json.loads(r) for r in out["row"])


@contextlib.contextmanager
def _data_context(**fields) -> Iterator[None]:
    """Ray Data's (process-wide) current context with `fields` changed, for the block."""
    from ray.data import DataContext
    ctx = DataContext.get_current()
    old = {k: getattr(ctx, k) for k in fields}
    for k, v in fields.items():
        setattr(ctx, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(ctx, k, v)


# --- the Ray instance ----------------------------------------------------------------------------
@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the block (processes started inside keep them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _stderr_to(path: Path | None) -> Iterator[None]:
    """File descriptor 2 (where Ray's C++ code logs) appended to `path` for the block; None: unchanged."""
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved, fd = os.dup(2), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def _no_colour_at_exit() -> None:
    """Ray's autoscaler CLI logger runs `colorama.init()` on import, whose exit handler writes a
    colour reset (ESC [0m) to a terminal's stdout after everything vssflow printed: unregistered."""
    for name in ("colorama.initialise", "ray.thirdparty_files.colorama.initialise"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "reset_all"):
            atexit.unregister(module.reset_all)


def local_environ(home: Path) -> dict[str, str]:
    """What a local instance needs to stay on this machine, and quiet.

    * every process binds to 127.0.0.1, not the machine's network address (Ray reads this when
      it is first imported: import it through this module, not before);
    * no usage statistics; and `home` as HOME for Ray's processes, holding an empty
      `ray_bootstrap_config.yaml`: without that file the usage-statistics process asks the cloud
      metadata address (169.254.169.254) which cloud it runs on, statistics off or not;
    * a token made for this instance, passed in the environment: Ray turns token authentication
      on for a new local instance and would otherwise write one to `~/.ray/auth_token`.
    """
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(home)}
    if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return env


@contextlib.contextmanager
def ray_instance(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
                 object_store_memory: int | None = None, quiet: bool = True,
                 log_to_driver: bool | None = None) -> Iterator[object]:
    """Ray for one batch: connect to the cluster at `address` (``host:port`` of its head, or
    ``auto``), or start a local instance on 127.0.0.1; disconnected (a local instance stopped,
    every process of it ended) on exit.

    A local instance keeps its session (logs, sockets) in a fresh ``/tmp/vssflow-ray-XXXX``: a
    short path, because Unix socket paths must fit in 107 bytes. Removed on a clean exit; kept,
    for its logs, when the block raised. `log_to_driver`: what Ray's workers print shown here
    (default: unless `quiet`).
    """
    local = address is None
    own_dir = Path(tempfile.mkdtemp(prefix="vssflow-ray-", dir="/tmp")) if local else None
    try:
        if local:
            (own_dir / "home").mkdir()
        env = local_environ(own_dir / "home") if local else {}
        if quiet and not log_to_driver:  # the driver's core worker logs to stderr; its log file keeps it all
            env["RAY_BACKEND_LOG_LEVEL"] = "fatal"     # (each of Ray's processes says so where it logs to here)
        with _environ(env):
            ray = require_ray()
            if ray.is_initialized():
                raise BackendError("Ray is already initialised in this process; use run_ray's parts directly")
            kwargs = {}
            if local:
                kwargs = {"num_cpus": num_cpus, "num_gpus": num_gpus, "include_dashboard": False,
                          "object_store_memory": object_store_memory, "_temp_dir": str(own_dir / "s")}
            on_sigterm = signal.getsignal(signal.SIGTERM)
            # The driver's core worker says on stderr that it read RAY_BACKEND_LOG_LEVEL
            # (logging.cc:303) before that level holds: into the session's log instead.
            with _stderr_to(own_dir / "driver.err" if local and quiet else None):
                ray.init(address=address or "local", logging_level=logging.ERROR if quiet else logging.INFO,
                         log_to_driver=not quiet if log_to_driver is None else log_to_driver, **kwargs)
            _no_colour_at_exit()
        if callable(on_sigterm):        # ray.init replaced it with sys.exit(15): keep the caller's own
            signal.signal(signal.SIGTERM, on_sigterm)
        if quiet:                       # Ray Data's INFO lines and warnings still go to its log file
            logging.getLogger("ray.data").setLevel(logging.ERROR)
            logging.getLogger("ray").setLevel(logging.ERROR)
        try:
            yield ray
        finally:
            with _stderr_to(own_dir / "driver.err" if local and quiet else None):
                ray.shutdown()
    except Exception:
        own_dir = None                  # keep the logs of a run that failed
        raise
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
