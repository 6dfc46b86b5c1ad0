"""A batch's progress on a terminal, one line redrawn in place:

    [3/10] clips/b.mp4: flow_step 12/25 (window 1/2) · 2 ok, 0 skipped, 1 failed · ETA 0:42

Items done of total, the current item and its stage (the `progress` events of
`Session.generate_many`), and the time left: the mean time of the items generated so far times
the items left to generate. Redrawn at most `every` seconds; `-q` or a non-terminal draws nothing.
"""

from __future__ import annotations

import threading
import time
from typing import IO


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class BatchProgress:
    """`event(e)` for each generation event, `row(r)` for each item's row; `close()` clears the line."""

    def __init__(self, names: list[str], to_run: list[int], stream: IO, *, steps: int | None = None,
                 every: float = 0.2):
        self.names, self.stream, self.steps, self.every = names, stream, steps, every
        self.to_run = to_run                       # the items that will be generated, by their index
        self.total = len(names)
        self.counts = {"ok": 0, "skipped": 0, "failed": 0}
        self.generated = 0
        self.current = ""
        self._start = time.perf_counter()
        self._drawn = 0.0
        self._width = 0
        self._lock = threading.Lock()

    def event(self, e: dict) -> None:
        k = self.to_run[e["item"]] if e.get("item") is not None else None
        name = self.names[k] if k is not None else "?"
        if e["kind"] == "step":
            stage = f"flow_step {e['step'] + 1}" + (f"/{self.steps}" if self.steps else "")
        else:
            stage = e["stage"]
        self.current = f"{name}: {stage} (window {e['window'] + 1})"
        self._draw()

    def row(self, r: dict) -> None:
        self.counts[r["status"]] += 1
        if r["status"] != "skipped" and r["index"] in self.to_run:
            self.generated += 1
        self.current = ""
        self._draw(force=True)

    def line(self) -> str:
        done = sum(self.counts.values())
        head = f"[{done}/{self.total}]" + (f" {self.current}" if self.current else "")
        parts = [head, ", ".join(f"{n} {s}" for s, n in self.counts.items())]
        left = len(self.to_run) - self.generated
        if self.generated and left:
            per_item = (time.perf_counter() - self._start) / self.generated
            parts.append(f"ETA {clock(per_item * left)}")
        return " · ".join(parts)

    def _draw(self, force: bool = False) -> None:
        with self._lock:
            now = time.perf_counter()
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
