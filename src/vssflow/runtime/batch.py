"""Many clips through one Session: `Session.generate_many`.

    for k, out in enumerate(session.generate_many(["a.mp4", Item("b.mp4", seed=3), "c.mp4"], steps=25)):
        if isinstance(out, Exception): ...        # that item's error; the others go on
        else: out.audio                            # a Result, as generate() gives it

The pipeline, two sides and a bounded queue between them:

* **workers** (threads, `workers` of them) take the items in order: each checks and reads its
  item's inputs (`inputs.prepare`: probe, transcript, reference voice) and decodes its
  windows, resized to uint8 frames and their digests taken (`video.VideoWindow`), into the
  queue. At most `capacity` windows wait there (52 MB each at full size; two per batch row, fewer
  where `memory.MemoryPlan.queue_windows`, the bytes budget, says so), and workers stay at most
  `lookahead` items ahead, so memory is flat whatever the number of items. A worker may always
  hand over a window of the item the model is waiting for, so the bound never deadlocks.
* **the model** (the caller's thread) takes `batch` windows at a time, in item order, of one
  item or several, and runs them through every stage together: the encoders over all their
  distinct frames and segments (`features.Encoders`: padding, still frames and the CLIP frames
  of overlapping windows encoded once), the condition stage for each, the ODE with the `B`
  windows as one `flow_step` batch, the VAE and the vocoder likewise (`window.generate_rows`,
  with the guard; `window.Runs` keeps each window's record with its own item). An item's result
  is yielded once its last window is done and every earlier item's outcome has been.

Windows batch only when they take the same times: the same fixed-step solver, steps and guidance
(dopri5 chooses its steps per window, so it runs one window at a time). Every item's result
equals a single `generate` of it within 1e-5; `tests/batch` checks it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from . import window
from .errors import VssflowInputError
from .inputs import Item, Prepared, as_item, frame_windows, prepare, speaker_embedding
from .results import Result
from .timeline import HOP_SAMPLES, audio_length, crossfade_windows, cut_audio, window_phone_ids
from .window import Run

__all__ = ["Item", "as_item", "default_batch", "generate_many", "max_batch"]


# Windows per flow-step call where no `batch` is given. On the CPU (ONNX Runtime, 2 cores) a
# batch of windows costs what the same windows cost one by one (small model, one flow_step call:
# 461 ms for 1 window, 883 ms for 2, 1829 ms for 4, i.e. 461 / 441 / 457 ms a window; README,
# "Many clips"), so 1 there; on a GPU the contracts' maximum, where one window leaves most of the
# device idle (not measured here: no GPU at hand).
CPU_BATCH = 1


def default_batch(session) -> int:
    """`CPU_BATCH` for a backend on the CPU, else the most windows the folder's contracts allow."""
    return max_batch(session) if session.backend.on_gpu else CPU_BATCH


def max_batch(session) -> int:
    """The most windows every batched stage's contract takes at once (axis `B`)."""
    return most_windows(session.folder)


def most_windows(folder) -> int:
    """`max_batch` of a model folder, before any Session loads it."""
    contracts = folder.contracts
    return min(contracts[s].axes["B"][2] for s in ("flow_step", "vae_decoder", "vocoder"))


def generate_many(session, items: Iterable, options=None, *, keep_intermediates: bool = False,
                  progress: Callable[[dict], None] | None = None, batch: int | None = None, workers: int = 1,
                  capacity: int | None = None, **fields) -> Iterator:
    """`Session.generate_many`: a `Result` or the item's exception per item, in input order."""
    items = [as_item(x) for x in items]
    limit = max_batch(session)
    batch = session.default_batch if batch is None else batch
    if not 1 <= batch <= limit:
        raise VssflowInputError(f"batch must be between 1 and {limit} (this model folder's contracts), got {batch}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    capacity = capacity or min(max(2, 2 * batch), session.memory.queue_windows)
    model = _Model(session, batch, keep_intermediates, progress)
    prefetch = _Prefetch(session, items, options, fields, model.new_run, workers, capacity)
    try:
        for event in prefetch:
            model.take(event)
            yield from model.ready()
        model.flush()
        yield from model.ready()
    finally:
        prefetch.close()


# --- the workers ---------------------------------------------------------------------------------

@dataclasses.dataclass
class _Event:
    kind: str                   # "ready" (prepared, run), "window" (window, seconds), "end", "failed" (error)
    item: int
    value: object = None
    seconds: float = 0.0


class _Stopped(Exception):
    """The consumer went away (closed, interrupted): a worker ends."""


class _Prefetch:
    """Items prepared and their windows decoded by `workers` threads, handed over in item order."""

    def __init__(self, session, items: list[Item], options, fields: dict, new_run: Callable[[int], Run],
                 workers: int, capacity: int):
        self.session, self.items, self.options, self.fields, self.new_run = session, items, options, fields, new_run
        self.capacity, self.lookahead = capacity, capacity + workers
        self._cond = threading.Condition()
        self._events: dict[int, collections.deque[_Event]] = {}
        self._head = self._next = self._buffered = 0
        self._stop = False
        self._threads = [threading.Thread(target=self._work, name=f"vssflow-prefetch-{i}", daemon=True)
                         for i in range(min(workers, len(items)))]
        for t in self._threads:
            t.start()

    def __iter__(self) -> Iterator[_Event]:
        for k in range(len(self.items)):
            while True:
                with self._cond:
                    while not self._events.get(k):
                        self._cond.wait()
                    event = self._events[k].popleft()
                    if event.kind == "window":
                        self._buffered -= 1
                    if event.kind in ("end", "failed"):
                        del self._events[k]
                        self._head = k + 1
                    self._cond.notify_all()
                yield event
                if event.kind in ("end", "failed"):
                    break

    def close(self) -> None:
        """Stop the workers (each ends at its next hand-over) and drop what they prepared."""
        with self._cond:
            self._stop = True
            self._events.clear()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stop and self._next < len(self.items) and self._next >= self._head + self.lookahead:
                    self._cond.wait()
                if self._stop or self._next >= len(self.items):
                    return
                k, self._next = self._next, self._next + 1
                self._events[k] = collections.deque()
            try:
                self._item(k)
            except _Stopped:
                return

    def _item(self, k: int) -> None:
        item, session = self.items[k], self.session
        try:
            fields = {**self.fields, **item.fields()}
            prepared = prepare(session, item.video, self.options, ref_audio=item.ref_audio, noise=item.noise,
                               **fields)
            self._put(_Event("ready", k, (prepared, self.new_run(k))))
            seconds = []
            for w in frame_windows(prepared.source, session.frames_device, seconds.append):
                if hasattr(w, "clip_digests"):             # hash the frames here, not on the model's thread
                    w.clip_digests, w.synch_digests
                self._put(_Event("window", k, w, seconds[-1]))
            self._put(_Event("end", k, None, seconds[-1]))
        except _Stopped:
            raise
        except Exception as e:                     # the item's error, for its row; the batch goes on
            self._put(_Event("failed", k, e))

    def _put(self, event: _Event) -> None:
        with self._cond:
            is_window = event.kind == "window"
            while (not self._stop and is_window and self._buffered >= self.capacity
                   and event.item != self._head):
                self._cond.wait()
            if self._stop:
                raise _Stopped
            self._events[event.item].append(event)
            self._buffered += is_window
            self._cond.notify_all()


# --- the model -----------------------------------------------------------------------------------

@dataclasses.dataclass
class _Pending:
    """An item between its first window and its result."""

    prepared: Prepared
    run: Run
    speaker: np.ndarray | None = None
    windows: list[list[np.ndarray]] = dataclasses.field(default_factory=list)   # audio pieces per window
    length: list[int] = dataclasses.field(default_factory=list)
    ended: bool = False
    queued: int = 0                                # its windows waiting in the current batch


class _Model:
    """The caller's side: windows into batches, batches through the stages, results in order."""

    def __init__(self, session, batch: int, keep_intermediates: bool, progress):
        self.session, self.batch, self.keep, self.progress = session, batch, keep_intermediates, progress
        self.pending: dict[int, _Pending] = {}
        self.group: list[tuple[int, object]] = []             # (item, window) waiting for a batch
        self.outcomes: dict[int, object] = {}
        self.next_out = 0

    def new_run(self, k: int) -> Run:
        report = None if self.progress is None else (lambda event, k=k: self.progress({"item": k, **event}))
        return Run.new(self.keep, report)

    def take(self, event: _Event) -> None:
        k = event.item
        if k in self.outcomes or k < self.next_out:           # failed already (its batch did)
            return
        if event.kind == "ready":
            prepared, run = event.value
            self.pending[k] = _Pending(prepared, run)
        elif event.kind == "window":
            p = self.pending[k]
            p.run.spent("frames", event.seconds)
            if self.group and (len(self.group) >= self._limit(k) or self._key(k) != self._key(self.group[0][0])):
                self.flush()
            self.group.append((k, event.value))
            p.queued += 1
            if len(self.group) >= self._limit(k):
                self.flush()
        elif event.kind == "end":
            self.pending[k].run.spent("frames", event.seconds)
            self.pending[k].ended = True
            self._finish(k)
        else:                                                 # failed: before or while decoding
            self._fail([k], event.value)

    def ready(self) -> Iterator:
        """The outcomes that follow every earlier one, in order."""
        while self.next_out in self.outcomes:
            yield self.outcomes.pop(self.next_out)
            self.next_out += 1

    def flush(self) -> None:
        """Run the waiting windows as one batch."""
        group, self.group = self.group, []
        if not group:
            return
        items = sorted({k for k, _ in group})
        try:
            self._run(group)
        except Exception as e:       # a failure of the batch's calls: its items fail, the rest go on
            self._fail(items, e)
            return
        for k in items:
            self.pending[k].queued -= sum(kk == k for kk, _ in group)
            self._finish(k)

    # --- steps ---------------------------------------------------------------------------------
    def _key(self, k: int) -> tuple:
        o = self.pending[k].prepared.info.options
        return (o.solver, o.steps, o.cfg)

    def _limit(self, k: int) -> int:
        return 1 if self.pending[k].prepared.info.options.solver == "dopri5" else self.batch

    def _run(self, group: list[tuple[int, object]]) -> None:
        session = self.session
        rows = [self.pending[k] for k, _ in group]
        windows = [w for _, w in group]
        kept: list[int | None] = []                  # each row's samples its clip keeps (None: all)
        for p, w in zip(rows, windows):
            p.run.window = w.index
            if p.speaker is None:
                p.speaker = speaker_embedding(session.backend, p.prepared.crops, session.sizes.speaker_dim, p.run)
            if w.last:
                p.length.append(audio_length(p.prepared.info.video, w, p.run))
            kept.append(max(0, p.length[0] - w.index * HOP_SAMPLES) if w.last else None)
        options = rows[0].prepared.info.options
        noise = np.stack([p.prepared.noise_of(w.index) for p, w in zip(rows, windows)])
        pieces = window.generate_rows(session.backend, [p.run for p in rows], windows,
                                      [window_phone_ids(p.prepared.track, w.index) for p, w in zip(rows, windows)],
                                      [p.speaker for p in rows], noise, solver=options.solver, steps=options.steps,
                                      cfg=options.cfg, encoders=session.encoders, fp32_encoders=session.fp32_encoders,
                                      samples=kept)
        for p, row in zip(rows, pieces):
            p.windows.append(row)

    def _finish(self, k: int) -> None:
        """Item `k`'s result, once it has ended and none of its windows wait."""
        p = self.pending.get(k)
        if p is None or not p.ended or p.queued:
            return
        del self.pending[k]
        pieces = list(cut_audio(crossfade_windows(iter(p.windows)), p.length, p.run))
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        self.outcomes[k] = Result.of(audio, p.prepared.info, p.run)

    def _fail(self, items: list[int], error: Exception) -> None:
        for k in items:
            self.pending.pop(k, None)
            self.outcomes[k] = error
        self.group = [(k, w) for k, w in self.group if k not in items]
