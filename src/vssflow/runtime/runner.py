"""A planned batch run to its end: each item's output written, one report row per item.

    rows = run_local(session, planned, options, skip_existing=True)      # in item order, lazily
    for row in rows: report.write(row)

An item ends `ok` (its output written, complete: `output.write_output` renames a finished
temporary file into place), `skipped` (`skip_existing` and its output exists) or `failed` (its
`error`, one line, and the `exit_code` a single `vssflow-run` of it would have given; `output`
None, as nothing was written). One
bad item never stops the others. `--ray` (`ray_batch.py`) makes the same rows.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time
from collections.abc import Iterable, Iterator
from typing import IO

from .errors import OutputError, describe
from .items import Planned
from .output import make_folder, write_output

# The exit code of a batch in which some items failed (every other item ok or skipped); each
# failed row holds the code a single run of it would have given. Not one a single run gives.
EXIT_SOME_FAILED = 20

# Every row has every key (None where it does not apply), in this order.
ROW_KEYS = ("index", "input", "output", "status", "error", "exit_code", "seconds", "nfe", "wall", "notes")


def row(p: Planned, status: str, **fields) -> dict:
    return {"index": p.index, "input": p.input, "output": p.output, "status": status, "error": None,
            "exit_code": None, "seconds": None, "nfe": None, "wall": None, "notes": None} | fields


def failed(p: Planned, e: BaseException, wall: float | None = None) -> dict:
    """The row of an item that raised `e`: its one-line message and the exit code it would give
    alone; no `output`, as nothing was written."""
    message, code = describe(e)
    return row(p, "failed", output=None, error=message, exit_code=code, wall=wall)


def finish(p: Planned, outcome, wall: float) -> dict:
    """Write a `Result` to the item's output (or take its error) and give its row."""
    if isinstance(outcome, BaseException):
        return failed(p, outcome, round(wall, 3))
    try:
        make_folder(p.plan)
        samples = write_output(p.plan, [outcome.audio], outcome.sample_rate)
    except Exception as e:                       # OutputError (exit 5), or a bug while writing
        return failed(p, e, round(wall, 3))
    return row(p, "ok", seconds=round(samples / outcome.sample_rate, 3), nfe=outcome.nfe, wall=round(wall, 3),
               notes=[*outcome.notes, *p.plan.notes])


def split(planned: Iterable[Planned], skip_existing: bool) -> tuple[dict[int, dict], list[Planned]]:
    """(rows known before anything runs, by index: items that failed planning or are skipped; the items to run)."""
    known, todo = {}, []
    for p in planned:
        if p.error is not None:
            known[p.index] = failed(p, p.error)
        elif skip_existing and p.plan.path.exists():
            known[p.index] = row(p, "skipped")
        else:
            todo.append(p)
    return known, todo


def merge(planned: list[Planned], known: dict[int, dict], rows: Iterator[dict]) -> Iterator[dict]:
    """Every item's row in order: `known` ones in place, the others from `rows` (in order)."""
    for p in planned:
        yield known[p.index] if p.index in known else next(rows)


def run_local(session, planned: list[Planned], options, *, skip_existing: bool = False, batch: int | None = None,
              workers: int = 1, progress=None) -> Iterator[dict]:
    """The batch in this process, one Session (`Session.generate_many`); rows in item order.

    `wall` of a row: the seconds from the previous row to this one, so the rows add up to the run."""
    known, todo = split(planned, skip_existing)

    def rows() -> Iterator[dict]:
        outcomes = session.generate_many([p.item for p in todo], options, batch=batch, workers=workers,
                                         progress=progress)
        t0 = time.perf_counter()
        for p, outcome in zip(todo, outcomes):
            r = finish(p, outcome, time.perf_counter() - t0)
            t0 = time.perf_counter()
            yield r
    return merge(planned, known, rows())


def summary(rows: list[dict], wall: float) -> dict:
    """The line after the rows: counts, seconds of audio written, the run's wall time and exit code."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    return {"summary": True, "items": len(rows), **counts,
            "seconds": round(sum(r["seconds"] or 0 for r in rows), 3), "wall": round(wall, 3),
            "exit_code": EXIT_SOME_FAILED if counts["failed"] else 0}


class Report:
    """JSON Lines to a file and/or stdout, each row written through as it comes (the file
    unbuffered: an interrupted batch's report holds the rows done, and nothing is left in a buffer
    to fail later). A report file that cannot be written (a full disk) raises OutputError (exit 5):
    the rows before stay, and so do the outputs finished.

    The file is locked (`flock`) while open: a second run on the same report is refused (exit 5)
    instead of interleaving with the first. `append` (a rerun with --skip-existing) adds this
    run's rows after the earlier run's, whose figures stay; otherwise the file is emptied."""

    def __init__(self, path: os.PathLike | None, stdout: IO | None, *, append: bool = False):
        self.path, self.stdout = path, stdout
        self.file: IO[bytes] | None = None
        if path is not None:
            self.file = _open_locked(path, append)

    def write(self, line: dict) -> None:
        text = json.dumps(line) + "\n"
        if self.file is not None:
            data = memoryview(text.encode())
            try:
                while data:                                 # a raw write may take part of it
                    data = data[self.file.write(data):]
            except OSError as e:
                raise OutputError(f"{self.path}: cannot write the report ({e.strerror or e}); its rows before "
                                  "this one and the outputs finished are kept") from None
        if self.stdout is not None:
            self.stdout.write(text)
            self.stdout.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _open_locked(path: os.PathLike, append: bool) -> IO[bytes]:
    """`path` open for writing, unbuffered, under an exclusive lock taken before anything is
    emptied; appending after a last line cut short (a kill) starts on a line of its own."""
    try:
        fd = os.open(path, (os.O_RDWR | os.O_APPEND if append else os.O_WRONLY) | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"{path}: cannot write the report ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{path}: another vssflow-run is writing this report; wait for it to end, "
                              "or choose another --report") from None
        except OSError:                          # a filesystem without locks: written unlocked
            pass
        if stat.S_ISREG(os.fstat(fd).st_mode):
            if not append:
                os.ftruncate(fd, 0)
            elif os.fstat(fd).st_size and os.pread(fd, 1, os.fstat(fd).st_size - 1) != b"\n":
                os.write(fd, b"\n")
        return open(fd, "wb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
