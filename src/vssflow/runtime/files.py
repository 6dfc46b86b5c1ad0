"""Files and folders that appear only complete: the one way vssflow writes what it keeps.

A file is written under a hidden temporary name beside its target and renamed over it only
when complete (`atomic_output`); a model folder is built under a temporary name and swapped in
(`atomic_folder`). On any error or interrupt the temporary file or folder is removed, so a
reader never sees half a result and an existing one survives a failed write.

Only SIGKILL (or a crash) can leave a temporary file: `.NAME.HOST-PID-TOKEN.partial.EXT`, named
after its writer's machine and process, so that the next run into that folder removes it once
that process is gone (`remove_stale_partials`), and never a live run's.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write; rename it to `path` on
    success (mode 644), delete it otherwise. Raises OutputError if the folder does not exist.

    The temporary file is created inside the `try`: an interrupt at any point leaves nothing."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"{path}: the folder {path.parent} does not exist")
    tmp = partial_path(path)
    try:
        tmp.touch(mode=0o600, exist_ok=False)
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# This machine in a partial file's name (no dots: the name is split on them); on a shared
# filesystem a process of another machine is never taken for gone.
HOST = socket.gethostname().replace(".", "_") or "localhost"
PARTIAL = re.compile(r"^\.(?P<stem>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)-[0-9a-f]{12}\.partial(\.[^.]*)?$")


def partial_path(path: str | os.PathLike, pid: int | None = None) -> Path:
    """The hidden temporary name `path` is written under by process `pid` (default: this one)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{HOST}-{os.getpid() if pid is None else pid}-"
                          f"{secrets.token_hex(6)}.partial{path.suffix}")


def remove_stale_partials(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the partial files in `folder` (and below, if `recursive`) whose writer, a process of
    this machine, is gone (a SIGKILL); those of live processes, or of other machines, stay."""
    removed = []
    for root, dirs, files in os.walk(folder):
        if not recursive:
            dirs.clear()
        for name in files:
            m = PARTIAL.match(name)
            if m and m["host"] == HOST and not _alive(int(m["pid"])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
                    removed.append(Path(root, name))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):      # another user's live process; a pid no process has
        return True
    return True


def check_writable(folder: str | os.PathLike) -> None:
    """Raise OutputError unless a file can be made in `folder`, the existing folder or its
    nearest existing parent (a file is made and removed: permission bits do not tell root's
    case, a read-only mount's or an immutable folder's)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".vssflow-check-", dir=folder)
    except OSError as e:
        raise OutputError(f"{folder}: cannot write in this folder ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """`path` holding `data` (text is written as UTF-8), or left as it was."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out` (mode 755) to fill; on success it becomes
    `out`, replacing an existing one only if `replace` (which the caller checked); on failure
    it is removed and `out` stays as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)        # mkdtemp makes it private; a model folder is ordinary data
        yield tmp
        if out.exists() and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
