"""The windows of concurrent `/v1/generate` requests generated together (`Session.generate_many`).

One thread runs `/v1/generate`'s model work. A request's job waits in a queue; whenever the thread
is free it takes the jobs waiting (at most `batch`), groups them by what a batch shares (solver,
steps, cfg: `batch_key`), and runs each group through `generate_many`, which puts their windows
into the same flow-step, VAE and vocoder calls; each job's transcript, speech interval, seed and
voice travel with its item. Nothing waits on a timer: a request alone starts at once, and the
requests that come while the model is busy go together as soon as it is free. Each result is
the one the request would get alone (batched windows equal single runs: `tests/batch`).

A job comes with a `threading.Event` its request sets when nobody wants the answer any more (the
client left, or `--request-timeout` passed): a job cancelled while it waits is never run, and a
group whose every job is cancelled stops at its next stage call or solver step
(`RequestCancelled` raised from `generate_many`'s progress). A group that still has a live job
runs on: its windows share every call, so the cancelled ones cost little more.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Hashable

from vssflow.runtime.errors import VssflowError
from vssflow.runtime.inputs import GenerateOptions, Item

log = logging.getLogger("vssflow.serve")
_PER_ITEM = ("transcript", "speech_start", "speech_end", "seed")


class RequestCancelled(VssflowError):
    """Nobody waits for this job's answer any more: it was not run, or its run was stopped."""

    exit_code = 130                                 # as an interrupted command
    http_status = 499                               # nginx's "client closed request": never sent


def batch_key(options: GenerateOptions) -> Hashable:
    """What every request of one batch must share: the options an `Item` cannot set."""
    return dataclasses.replace(options, **{k: None for k in _PER_ITEM})


def job_item(job) -> Item:
    """A request's clip and its own options, as `generate_many` takes them."""
    o = job.options
    return Item(job.video, transcript=o.transcript, speech_start=o.speech_start, speech_end=o.speech_end,
                seed=o.seed, ref_audio=job.ref_audio)


class Batcher:
    """`submit(job, cancel)` -> a future of the job's `Result` (or its exception); `close()` ends the
    thread once the jobs taken are done; `waiting()`: the jobs not taken yet."""

    def __init__(self, session, batch: int, on_batch: Callable[[int], None] | None = None):
        self.session, self.batch, self.on_batch = session, batch, on_batch
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.batches: list[int] = []               # jobs per group run, in order (for tests)
        self._thread = threading.Thread(target=self._loop, name="vssflow-serve-model", daemon=True)
        self._thread.start()

    def submit(self, job, cancel: threading.Event | None = None) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((job, future, cancel or threading.Event()))
        return future

    def waiting(self) -> int:
        return self._jobs.qsize()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (first := self._jobs.get()) is not None:
            taken = [first]
            while len(taken) < self.batch:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:                     # closing: finish what was taken, then stop
                    self._jobs.put(None)
                    break
                taken.append(nxt)
            groups: dict[Hashable, list] = {}
            for job, future, cancel in taken:
                if cancel.is_set():
                    future.set_exception(RequestCancelled("cancelled before it ran"))
                    log.info("a request dropped before it ran: nobody waits for its answer")
                else:
                    groups.setdefault(batch_key(job.options), []).append((job, future, cancel))
            for key, group in groups.items():
                self._run(key, group)

    def _run(self, options: GenerateOptions, group: list) -> None:
        self.batches.append(len(group))
        if self.on_batch is not None:
            self.on_batch(len(group))
        futures = [f for _, f, _ in group]
        cancels = [c for _, _, c in group]

        def unless_all_cancelled(event: dict) -> None:
            if all(c.is_set() for c in cancels):
                raise RequestCancelled("cancelled while it ran")
        try:
            results = self.session.generate_many([job_item(job) for job, _, _ in group], options,
                                                 batch=min(self.batch, len(group)), progress=unless_all_cancelled)
            stopped = 0
            for future, result in zip(futures, results):
                stopped += isinstance(result, RequestCancelled)
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            if stopped:
                log.info("a batch of %d request%s stopped: nobody waits for its answers", stopped,
                         "s" if stopped > 1 else "")
        except BaseException as e:                  # the group as a whole failed: each request hears why
            for future in futures:
                if not future.done():
                    future.set_exception(e)
            if not isinstance(e, Exception):
                raise
