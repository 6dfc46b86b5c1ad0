"""Progress on a terminal, one line redrawn in place:

    [3/10] clips/b.mp4: flow_step 12/25 (window 1/2) · 2 ok, 0 skipped, 1 failed · ETA 0:42
    clip.mp4: flow_step 12/25 (window 1/2) · ETA 0:03                         (a single run)

Items done of total, the current item and its stage (the `progress` events of `Session.stream`
and `Session.generate_many`), and the time left, from measured progress: the flow steps left
(windows × steps, less those done) times the mean time of a step so far, plus each window's other
stages (encoders, condition, VAE, vocoder) at the mean time they took so far. An item whose
windows are not known yet counts as many as the items begun have on average (at least one). So the ETA falls as
steps are done and rises only on news (an item with more windows, a stage first seen); it is
shown once a step has been timed. Redrawn at most `every` seconds; `-q` or a non-terminal draws
nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import IO


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class BatchProgress:
    """`event(e)` for each generation event, `row(r)` for each item's row; `close()` clears the line.

    `to_run`: the indices of the items that will be generated (events name them by position in
    it); `windows`: their window counts where known (a single run's); `now`: the clock."""

    def __init__(self, names: list[str], to_run: list[int], stream: IO, *, steps: int | None = None,
                 windows: Sequence[int | None] | None = None, every: float = 0.2,
                 now: Callable[[], float] = time.perf_counter):
        self.names, self.stream, self.steps, self.every, self.now = names, stream, steps, every, now
        self.to_run = to_run                       # the items that will be generated, by their index
        self.total = len(names)
        self.counts = {"ok": 0, "skipped": 0, "failed": 0}
        self.current = ""
        n = len(to_run)
        self._windows = list(windows) if windows is not None else [None] * n    # known counts
        self._seen = [0] * n                       # windows seen of each item
        self._steps_done: dict[tuple[int, int], int] = {}      # (item, window) -> its steps done
        self._stage_spent = [0.0] * n              # seconds of its stages other than flow steps
        self._finished = [False] * n
        self._step_seconds, self._steps_timed = 0.0, 0
        self._stage_seconds: dict[str, float] = {}          # per stage name: seconds, windows it ran for
        self._stage_windows: dict[str, set] = {}
        self._last_step: float | None = None       # when the last event, a step, came
        self._drawn = 0.0
        self._width = 0
        self._lock = threading.Lock()

    def event(self, e: dict) -> None:
        k = e.get("item") or 0                     # a single run's events name no item
        if not 0 <= k < len(self.to_run):
            return
        t = self.now()
        w = e.get("window", 0)
        self._seen[k] = max(self._seen[k], w + 1)
        if e["kind"] == "step":
            self._steps_done[k, w] = max(self._steps_done.get((k, w), 0), e["step"] + 1)
            if self._last_step is not None:        # a step right after a step: its time alone
                self._step_seconds += t - self._last_step
                self._steps_timed += 1
            self._last_step = t
            stage = f"flow_step {e['step'] + 1}" + (f"/{self.steps}" if self.steps else "")
        else:
            self._last_step = None
            if e["kind"] == "stage":
                name, seconds = e["stage"], e.get("seconds", 0.0)
                self._stage_seconds[name] = self._stage_seconds.get(name, 0.0) + seconds
                self._stage_windows.setdefault(name, set()).add((k, w))
                self._stage_spent[k] += seconds
            stage = e.get("stage", e["kind"])
        of = self._windows[k]
        self.current = f"{self.names[self.to_run[k]]}: {stage} (window {w + 1}{f'/{of}' if of else ''})"
        self._draw()

    def note(self, text: str) -> None:
        """What the run does before any item's events come (starting Ray, say), drawn at once."""
        self.current = text
        self._draw(force=True)

    def row(self, r: dict) -> None:
        self.counts[r["status"]] += 1
        if r["index"] in self.to_run:
            self._finished[self.to_run.index(r["index"])] = True
        self._last_step = None
        self.current = ""
        self._draw(force=True)

    def eta(self) -> float | None:
        """Seconds left, from the steps and stages measured so far; None before a step is timed."""
        if not self.steps or not self._steps_timed:
            return None
        step = self._step_seconds / self._steps_timed
        stages = sum(seconds / len(self._stage_windows[name]) for name, seconds in self._stage_seconds.items())
        seen = [n for n in self._seen if n]             # items begun: at least this many windows each
        usual = max(1, round(sum(seen) / len(seen))) if seen else 1
        left = 0.0
        for k in range(len(self.to_run)):
            if self._finished[k]:
                continue
            windows = self._windows[k] or max(self._seen[k], usual)
            steps_done = sum(n for (i, _), n in self._steps_done.items() if i == k)
            left += max(0, windows * self.steps - steps_done) * step
            left += max(0.0, windows * stages - self._stage_spent[k])
        return left

    def line(self) -> str:
        eta = self.eta()
        tail = [f"ETA {clock(eta)}"] if eta is not None and not all(self._finished) else []
        if self.total == 1:                        # a single run: the stage and the ETA
            return " · ".join([self.current or self.names[0], *tail])
        done = sum(self.counts.values())
        head = f"[{done}/{self.total}]" + (f" {self.current}" if self.current else "")
        return " · ".join([head, ", ".join(f"{n} {s}" for s, n in self.counts.items()), *tail])

    def _draw(self, force: bool = False) -> None:
        with self._lock:
            now = self.now()
            if not force and now - self._drawn < self.every:
                return
            self._drawn = now
            text = self.line()
            self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
            self.stream.flush()
            self._width = len(text)

    def close(self) -> None:
        with self._lock:
            if self._width:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
                self._width = 0

    def say(self, text: str) -> None:
        """A line of its own above the progress line."""
        with self._lock:
            if self._width:
                self.stream.write("\r" + " " * self._width + "\r")
                self._width = 0
            self.stream.write(text + "\n")
            self.stream.flush()
