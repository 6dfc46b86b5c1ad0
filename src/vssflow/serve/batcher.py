"""The windows of concurrent `/v1/generate` requests generated together (`Session.generate_many`).

One thread runs `/v1/generate`'s model work. A request's job waits in a queue; whenever the thread
is free it takes the jobs waiting (at most `batch`), groups them by what a batch shares (solver,
steps, cfg: `batch_key`), and runs each group through `generate_many`, which puts their windows
into the same flow-step, VAE and vocoder calls; each job's transcript, speech interval, seed and
voice travel with its item. Nothing waits on a timer: a request alone starts at once, and the
requests that come while the model is busy go together as soon as it is free. Each result is
the one the request would get alone (batched windows equal single runs: `tests/batch`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from collections.abc import Hashable

from vssflow.runtime.inputs import GenerateOptions, Item

_PER_ITEM = ("transcript", "speech_start", "speech_end", "seed")


def batch_key(options: GenerateOptions) -> Hashable:
    """What every request of one batch must share: the options an `Item` cannot set."""
    return dataclasses.replace(options, **{k: None for k in _PER_ITEM})


def job_item(job) -> Item:
    """A request's clip and its own options, as `generate_many` takes them."""
    o = job.options
    return Item(job.video, transcript=o.transcript, speech_start=o.speech_start, speech_end=o.speech_end,
                seed=o.seed, ref_audio=job.ref_audio)


class Batcher:
    """`submit(job)` -> a future of the job's `Result` (or its exception); `close()` ends the thread
    once the jobs taken are done."""

    def __init__(self, session, batch: int):
        self.session, self.batch = session, batch
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.batches: list[int] = []               # jobs per group run, in order (for tests)
        self._thread = threading.Thread(target=self._loop, name="vssflow-serve-model", daemon=True)
        self._thread.start()

    def submit(self, job) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future

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
            for job, future in taken:
                groups.setdefault(batch_key(job.options), []).append((job, future))
            for key, group in groups.items():
                self._run(key, group)

    def _run(self, options: GenerateOptions, group: list) -> None:
        self.batches.append(len(group))
        futures = [f for _, f in group]
        try:
            results = self.session.generate_many([job_item(job) for job, _ in group], options,
                                                 batch=min(self.batch, len(group)))
            for future, result in zip(futures, results):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        except BaseException as e:                  # the group as a whole failed: each request hears why
            for future in futures:
                if not future.done():
                    future.set_exception(e)
            if not isinstance(e, Exception):
                raise
